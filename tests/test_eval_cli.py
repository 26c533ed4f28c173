"""`kiln summarize` and `kiln perplexity` end to end on tiny checkpoints (convert -> build -> evaluate): kiln and
transformers give identical summaries and ROUGE in fp32, the accuracy check passes and fails as it should, and bad
input is one line on stderr with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kiln
from fixtures_baichuan import make_baichuan_checkpoint
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_tokenizers import CORPUS, build_baichuan_tokenizer_dir, build_neox_tokenizer_dir
from kiln.cli import perplexity_cmd
from kiln.cli.main import main as kiln_main
from kiln.eval.perplexity import rolling_perplexity
from kiln.eval.rouge import rouge_scores
from kiln.tokenizer import load_tokenizer

SENTENCES = [s for s in dict.fromkeys(CORPUS) if s.isascii()]


def write_articles(path: Path, n: int = 4, highlights: list[str] | None = None) -> Path:
    rows = [{"id": f"doc{i}", "article": " ".join((SENTENCES * 2)[i: i + 1 + i % 2]),
             "highlights": highlights[i] if highlights else f"{SENTENCES[i]}\n{SENTENCES[i + 1]}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def convert_build(tmp: Path, model_dir: Path, *convert: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), *convert]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "96", "--max_seq_len", "128", "--max_batch_size", "4"]) == 0
    return tmp / "engine"


def make_model(tmp: Path, family: str) -> tuple[Path, Path, Path]:
    """(HF dir, engine, tokenizer dir) of a tiny fp32 model whose vocabulary holds the test tokenizer's."""
    if family == "dbrx":
        model_dir, _, _ = make_dbrx_checkpoint(tmp, seed=6, vocab_size=512)
        tok = build_neox_tokenizer_dir(tmp / "tok", chat_template=False)
        return model_dir, convert_build(tmp, model_dir), tok
    if family == "mpt":
        cfg = mpt_published_config(vocab_size=512)
        # seed 2: random MPT weights that write different outputs for different prompts (many seeds repeat one token)
        model_dir = save_checkpoint(published_state(hf_mpt_model(cfg, seed=2)), cfg, tmp / "hf")
        return model_dir, convert_build(tmp, model_dir), build_neox_tokenizer_dir(tmp / "tok", chat_template=False)
    model_dir, _, _ = make_baichuan_checkpoint(tmp, "v2_13b", seed=6, vocab_size=704)
    engine = convert_build(tmp, model_dir, "--dtype", "float32", "--model_version", "v2_13b")
    return model_dir, engine, build_baichuan_tokenizer_dir(tmp / "tok")


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_model(tmp_path_factory.mktemp("dbrx"), "dbrx")


def summarize(engine: Path, tok: Path, *extra: str) -> int:
    return kiln_main(["summarize", "--engine_dir", str(engine), "--tokenizer_dir", str(tok), "--max_ite", "2",
                      "--batch_size", "2", "--max_input_length", "64", "--output_len", "12", *extra])


@pytest.mark.parametrize("family", ["dbrx", "mpt"])
def test_summarize_kiln_equals_transformers_fp32(tmp_path, family, capsys):
    model_dir, engine, tok = make_model(tmp_path, family)
    data, out = write_articles(tmp_path / "d.jsonl"), tmp_path / "s.json"
    assert summarize(engine, tok, "--hf_model_dir", str(model_dir), "--test_kiln", "--test_hf", "--eval_ppl",
                     "--dataset_path", str(data), "--output_json", str(out)) == 0
    result = json.loads(out.read_text())
    kiln_run, hf_run = result["kiln"], result["hf"]
    assert kiln_run["examples"] == hf_run["examples"] == 4 and sorted(kiln_run["ids"]) == [f"doc{i}" for i in range(4)]
    assert kiln_run["summaries"] == hf_run["summaries"] and kiln_run["output_tokens"] == hf_run["output_tokens"]
    assert len(set(kiln_run["summaries"])) > 1  # prompts of different lengths and ends
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert kiln_run[key] == hf_run[key]
    references = {json.loads(line)["id"]: json.loads(line)["highlights"] for line in data.read_text().splitlines()}
    expected = rouge_scores(kiln_run["summaries"], [references[i] for i in kiln_run["ids"]])
    assert kiln_run["rouge1"] == pytest.approx(expected["rouge1"])
    assert kiln_run["perplexity"] == pytest.approx(hf_run["perplexity"], rel=1e-4)
    assert kiln_run["tokens_per_s"] > 0 and kiln_run["time_s"] > 0
    table = capsys.readouterr().out
    assert "rouge1" in table and "tokens/s" in table and "kiln" in table and "hf" in table


def test_check_accuracy_passes_and_fails(tmp_path, dbrx, capsys):
    _, engine, tok = dbrx
    first, short = tmp_path / "first.json", ["--max_ite", "1", "--output_len", "4"]  # the last flag wins
    assert summarize(engine, tok, *short, "--test_trt_llm", "--dataset_path", str(write_articles(tmp_path / "a.jsonl")),
                     "--output_json", str(first)) == 0
    run = json.loads(first.read_text())["kiln"]
    # References equal to what the engine writes: rouge1 is 100, so only the perplexity threshold can fail.
    by_id = dict(zip(run["ids"], run["summaries"]))
    data = write_articles(tmp_path / "b.jsonl", highlights=[by_id.get(f"doc{i}", "") for i in range(4)])
    base = [*short, "--test_kiln", "--dataset_path", str(data), "--check_accuracy", "--eval_ppl",
            "--tensorrt_llm_rouge1_threshold", "99.9"]
    capsys.readouterr()
    assert summarize(engine, tok, *base, "--kiln_ppl_threshold", "1e9") == 0
    assert summarize(engine, tok, *base, "--tensorrt_llm_ppl_threshold", "1.5") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "accuracy check FAILED: perplexity" in err and "--tensorrt_llm_ppl_threshold 1.5" in err
    assert summarize(engine, tok, *short, "--test_kiln", "--dataset_path", str(write_articles(tmp_path / "c.jsonl")),
                     "--check_accuracy", "--kiln_rouge1_threshold", "100") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "FAILED: rouge1" in err and "is not above --tensorrt_llm_rouge1_threshold 100" in err


def test_summarize_shipped_set_and_cnn_dailymail_dir(tmp_path, dbrx):
    _, engine, tok = dbrx
    out = tmp_path / "s.json"
    assert kiln_main(["summarize", "--engine_dir", str(engine), "--tokenizer_dir", str(tok), "--test_kiln",
                      "--max_ite", "1", "--batch_size", "2", "--max_input_length", "48", "--output_len", "4",
                      "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())["kiln"]["examples"] == 2
    root = tmp_path / "ds" / "ccdv" / "cnn_dailymail" / "3.0.0"
    root.mkdir(parents=True)
    pq.write_table(pa.table({"article": SENTENCES[:3], "highlights": SENTENCES[3:6], "id": ["x", "y", "z"]}),
                   root / "test-00000-of-00001.parquet")
    assert summarize(engine, tok, "--test_kiln", "--dataset_dir", str(tmp_path / "ds"), "--output_json",
                     str(out)) == 0
    assert sorted(json.loads(out.read_text())["kiln"]["ids"]) == ["x", "y", "z"]


def test_perplexity_cli_with_transformers(tmp_path, dbrx):
    model_dir, engine, tok = dbrx
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SENTENCES * 4))
    out = tmp_path / "p.json"
    assert kiln_main(["perplexity", "--engine_dir", str(engine), "--hf_model_dir", str(model_dir), "--tokenizer_dir",
                      str(tok), "--text_file", str(text), "--max_length", "48", "--stride", "16", "--max_tokens",
                      "100", "--output_json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 99 and result["hf_perplexity"] == pytest.approx(result["perplexity"], rel=1e-4)
    ids = load_tokenizer(tok).encode(text.read_text())[:100]
    direct = rolling_perplexity(ids, kiln.LLM(engine, device="cpu").score, 48, 16)
    assert result["perplexity"] == pytest.approx(direct.perplexity, rel=1e-9)


def test_baichuan_runs_kiln_alone_with_one_line(tmp_path, capsys):
    model_dir, engine, tok = make_model(tmp_path, "baichuan")
    out = tmp_path / "s.json"
    assert summarize(engine, tok, "--hf_model_dir", str(model_dir), "--test_kiln", "--test_hf", "--dataset_path",
                     str(write_articles(tmp_path / "d.jsonl")), "--output_json", str(out)) == 0
    assert list(json.loads(out.read_text())) == ["kiln"]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(SENTENCES))
    assert kiln_main(["perplexity", "--engine_dir", str(engine), "--hf_model_dir", str(model_dir), "--tokenizer_dir",
                      str(tok), "--text_file", str(text), "--max_length", "32", "--output_json", str(out)]) == 0
    assert "hf_perplexity" not in json.loads(out.read_text())
    err = capsys.readouterr().err
    assert err.count("no transformers comparison for Baichuan") == 2


def one_line_error(capsys, argv: list[str]) -> str:
    assert kiln_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra,message", [
    ([], "nothing to run: pass --test_kiln"),
    (["--test_kiln", "--dataset_path", "missing.jsonl"], "--dataset_path missing.jsonl does not exist"),
    (["--test_kiln", "--dataset_dir", "missing_dir"], "--dataset_dir missing_dir is not a directory"),
    (["--test_kiln", "--kiln_rouge1_threshold", "150"], "ROUGE is between 0 and 100"),
    (["--test_kiln", "--tensorrt_llm_ppl_threshold", "0"], "a perplexity threshold is a finite number >= 1"),
    (["--test_kiln", "--max_ite", "0"], "--max_ite is 0"),
    (["--test_hf"], "--test_hf needs --hf_model_dir"),
    (["--test_kiln", "--max_input_length", "200"], "exceeds the engine's max_input_len 96"),
    (["--test_kiln", "--output_len", "100"], "exceeds the engine's max_seq_len 128"),
])
def test_summarize_bad_input(dbrx, capsys, extra, message):
    _, engine, tok = dbrx
    err = one_line_error(capsys, ["summarize", "--engine_dir", str(engine), "--tokenizer_dir", str(tok),
                                  "--max_input_length", "64", "--output_len", "12", *extra])
    assert message in err


def test_perplexity_bad_input(tmp_path, dbrx, capsys, monkeypatch):
    _, engine, tok = dbrx
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    base = ["perplexity", "--engine_dir", str(engine), "--tokenizer_dir", str(tok)]
    monkeypatch.setattr(perplexity_cmd, "HELDOUT", tmp_path / "heldout.txt")
    assert "held-out text" in one_line_error(capsys, base)
    assert "does not exist" in one_line_error(capsys, [*base, "--text_file", str(tmp_path / "none.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    assert "holds no text" in one_line_error(capsys, [*base, "--text_file", str(tmp_path / "empty.txt")])
    base += ["--text_file", str(text)]
    assert "--stride is 32" in one_line_error(capsys, [*base, "--max_length", "32", "--stride", "32"])
    assert "exceeds the engine's max_seq_len 128" in one_line_error(capsys, [*base, "--max_length", "200"])
    assert "--max_tokens is 1" in one_line_error(capsys, [*base, "--max_tokens", "1"])
    assert "needs a tokenizer" in one_line_error(capsys, ["perplexity", "--engine_dir", str(engine), "--text_file",
                                                          str(text)])
    with pytest.raises(SystemExit):  # argparse: a threshold that is not a number
        kiln_main(["summarize", "--engine_dir", str(engine), "--kiln_rouge1_threshold", "high"])
