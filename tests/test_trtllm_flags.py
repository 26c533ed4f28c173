"""TensorRT-LLM's flags in kiln's commands: TensorRT-only knobs accepted with one line saying so, features kiln lacks
refused by name, quantization refused in one place, the legacy Baichuan scripts' spellings (hf_baichuan_convert.py's
-i/-o/-t/-tp, build.py's one-step --model_dir), quantize.py's full_prec, and run.py's flags (word groups, early
stopping, special tokens, KV-cache size, no-repeat n-grams, profiling)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import kiln
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_tokenizers import build_baichuan_tokenizer_dir, build_neox_tokenizer_dir
from kiln.cli.main import main as kiln_main
from kiln.cli.main import make_parser
from kiln.cli.quant_flags import MESSAGE as QUANT_MESSAGE
from kiln.cli.run_cmd import early_stopping
from kiln.config import ConfigError


@pytest.fixture(scope="module")
def mpt(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MPT checkpoint (vocabulary 704, room for both test tokenizers) with a GPT-NeoX tokenizer.json, and its
    float32 engine."""
    root = tmp_path_factory.mktemp("mpt")
    cfg = mpt_published_config(vocab_size=704)
    hf = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, root / "hf")
    build_neox_tokenizer_dir(hf, chat_template=False)
    assert kiln_main(["convert", "--model_dir", str(hf), "--dtype", "float32", "--output_dir", str(root / "c")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(root / "c"), "--output_dir", str(root / "e"),
                      "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    return hf, root / "e"


def rank_bytes(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("rank*.safetensors"))]


def last_err_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_ignored_flags_do_nothing_and_say_so_in_one_line(tmp_path, mpt, capsys):
    hf, _ = mpt
    base = ["build", "--checkpoint_dir", str(tmp_path / "c"), "--max_input_len", "32", "--max_seq_len", "64"]
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(tmp_path / "c")]) == 0
    assert kiln_main([*base, "--output_dir", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert kiln_main([*base, "--output_dir", str(tmp_path / "e"), "--gemm_plugin", "float16", "--remove_input_padding",
                      "--paged_kv_cache", "disable", "--workers", "4", "--use_custom_all_reduce", "disable",
                      "--max_prompt_embedding_table_size", "0"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "accepted and ignored" in line]
    assert len(notes) == 1
    for part in ("--gemm_plugin", "--remove_input_padding", "--workers", "--use_custom_all_reduce",
                 "--paged_kv_cache (kiln's KV cache is always paged)", "--max_prompt_embedding_table_size"):
        assert part in notes[0]
    plain, flagged = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "e"))
    assert plain["build"] == flagged["build"] and rank_bytes(tmp_path / "plain") == rank_bytes(tmp_path / "e")


@pytest.mark.parametrize("argv, message", [
    (["build", "--checkpoint_dir", "c", "--lora_plugin", "float16"], "--lora_plugin is refused: LoRA adapters"),
    (["build", "--checkpoint_dir", "c", "--max_prompt_embedding_table_size", "16"],
     "--max_prompt_embedding_table_size is refused: prompt tables"),
    (["run", "--max_output_len", "2", "--medusa_choices", "[[0]]"], "--medusa_choices is refused: speculative"),
    (["run", "--max_output_len", "2", "--prompt_table_path", "t.npy"], "--prompt_table_path is refused: prompt"),
    (["run", "--max_output_len", "2", "--lora_dir", "a", "b"], "--lora_dir is refused: LoRA adapters"),
    (["convert", "--preset", "dbrx-tiny", "--hf_lora_dir", "x"], "--hf_lora_dir is refused: LoRA adapters"),
])
def test_refused_flags_name_the_flag_and_the_reason(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert kiln_main(argv) == 2
    assert last_err_line(capsys).startswith(f"kiln {argv[0]}: error: {message}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flags", [
    (["convert", "--preset", "dbrx-tiny", "--smoothquant", "0.5", "--per_group"], "--smoothquant, --per_group"),
    (["convert", "--preset", "dbrx-tiny", "-tp", "2", "-kv", "--per_channel"], "-kv, --per_channel"),
    (["quantize", "--model_dir", "m", "--qformat", "w4a8_awq", "--kv_cache_dtype", "fp8"],
     "--qformat w4a8_awq, --kv_cache_dtype"),  # (--qformat fp8 runs: tests/test_quant_fp8.py)
    (["convert", "--preset", "dbrx-tiny", "--group_size", "64"], "--group_size"),
    (["build", "--checkpoint_dir", "c", "--per_channel", "--use_smooth_quant"], "--per_channel, --use_smooth_quant"),
    (["quantize", "--model_dir", "m", "--qformat", "w4a8_awq", "--calib_size", "4"], "--qformat w4a8_awq, --calib_size"),
])
def test_quantization_is_refused_in_one_line(argv, flags, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert kiln_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kiln {argv[0]}: error: {flags}: {QUANT_MESSAGE}"]
    assert list(tmp_path.iterdir()) == []


def test_misspelled_flag_stays_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        kiln_main(["convert", "--preset", "mpt-tiny", "--tp_szie", "4"])
    assert exit_.value.code == 2 and "unrecognized arguments: --tp_szie 4" in capsys.readouterr().err


def test_hf_baichuan_convert_spellings_write_the_out_gpu_layout(tmp_path, mpt, capsys):
    """-i/-o/-t/-tp/-p as hf_baichuan_convert.py: OUT/2-gpu/, which build.py's --bin_model_dir then reads."""
    hf, _ = mpt
    out = tmp_path / "out"
    assert kiln_main(["convert", "-i", str(hf), "-o", str(out), "-t", "fp16", "-tp", "2", "-p", "4"]) == 0
    config = json.loads((out / "2-gpu" / "config.json").read_text())
    assert config["dtype"] == "float16" and config["mapping"]["tp_size"] == 2
    assert kiln_main(["build", "--bin_model_dir", str(out / "2-gpu") + "/", "--output_dir", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert kiln_main(["convert", "-i", str(hf), "-o", str(out), "-t", "fp16", "--dtype", "float32"]) == 2
    assert "disagree" in last_err_line(capsys)
    assert kiln_main(["convert", "-i", str(hf), "-o", str(out), "--output_dir", str(tmp_path / "x")]) == 2
    assert "not both" in last_err_line(capsys)


def test_legacy_one_step_build_equals_convert_then_build(tmp_path, mpt, capsys):
    hf, _ = mpt
    assert kiln_main(["build", "--model_dir", str(hf), "--dtype", "float16", "--world_size", "2", "--max_input_len",
                      "16", "--max_output_len", "8", "--use_gemm_plugin", "float16", "--parallel_build",
                      "--output_dir", str(tmp_path / "out" / "one")]) == 0
    engine = json.loads((tmp_path / "out" / "one" / "config.json").read_text())
    assert engine["dtype"] == "float16" and engine["mapping"]["tp_size"] == 2
    assert (engine["build"]["max_input_len"], engine["build"]["max_seq_len"]) == (16, 24)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["one"]  # the converted checkpoint is not left behind
    assert kiln_main(["convert", "--model_dir", str(hf), "--dtype", "float16", "--tp_size", "2",
                      "--output_dir", str(tmp_path / "c")]) == 0
    assert rank_bytes(tmp_path / "c") == rank_bytes(tmp_path / "out" / "one")
    cases = [(["--model_dir", str(hf), "--world_size", "2", "--tp_size", "1"], "--world_size 2 must equal"),
             (["--checkpoint_dir", str(tmp_path / "c"), "--dtype", "float32"], "--dtype applies only with --model_dir"),
             (["--model_dir", str(hf), "--max_seq_len", "30", "--max_output_len", "8"], "not both"),
             (["--checkpoint_dir", str(tmp_path / "c"), "--model_dir", str(hf)], "exactly one of")]
    for flags, message in cases:
        assert kiln_main(["build", *flags, "--output_dir", str(tmp_path / "bad")]) == 2
        assert message in last_err_line(capsys)
        assert not (tmp_path / "bad").exists()


def test_quantize_full_prec_writes_the_unquantized_checkpoint(tmp_path, mpt, capsys):
    hf, _ = mpt
    source = ["--model_dir", str(hf), "--dtype", "float16"]
    assert kiln_main(["quantize", *source, "--export_path", str(tmp_path / "q")]) == 0
    assert kiln_main(["convert", *source, "--output_dir", str(tmp_path / "c")]) == 0
    assert rank_bytes(tmp_path / "q") == rank_bytes(tmp_path / "c")
    assert kiln_main(["quantize", "--model_dir", str(hf), "--export_format", "hf"]) == 2
    assert "--export_format hf is refused" in last_err_line(capsys)


def run_json(tmp_path: Path, engine: Path, tok: Path, *flags: str) -> list[dict]:
    out = tmp_path / "out.json"
    assert kiln_main(["run", "--engine_dir", str(engine), "--tokenizer_dir", str(tok), "--max_output_len", "8",
                      "--ignore_eos", "--output_json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_stop_and_bad_words_are_grouped_per_prompt_as_run_py(tmp_path, mpt, capsys):
    """The same prompt twice, each with its own group: only the first prompt's words apply to it."""
    hf, engine = mpt
    prompts = ["--input_text", "hello world", "hello world"]
    plain = run_json(tmp_path, engine, hf, *prompts)
    text, ids = plain[0]["text"][0], plain[0]["output_ids"][0]
    assert text.startswith("dd") and len(ids) == 8  # this random model repeats "d"
    grouped = run_json(tmp_path, engine, hf, *prompts, "--stop_words", "dd", "--stop_words", "@@never@@")
    assert grouped[0]["text"][0] == "dd" and len(grouped[0]["output_ids"][0]) < 8  # ends with its stop word
    assert grouped[1]["output_ids"] == [ids]
    once = run_json(tmp_path, engine, hf, *prompts, "--stop_words", "@@never@@", "dd")  # one group: every prompt
    assert [r["text"][0] for r in once] == ["dd", "dd"]
    banned = kiln.LLM(engine, tokenizer_dir=hf).tokenizer.decode(ids[:1])
    bad = run_json(tmp_path, engine, hf, *prompts, "--bad_words", banned, "--bad_words", "@@never@@")
    assert bad[0]["output_ids"][0][0] != ids[0] and bad[1]["output_ids"] == [ids]
    assert kiln_main(["run", "--engine_dir", str(engine), "--tokenizer_dir", str(hf), *prompts, "--max_output_len", "2",
                      "--stop_words", "a", "--stop_words", "b", "--stop_words", "c"]) == 2
    assert "--stop_words is given 3 times for 2 prompts" in last_err_line(capsys)


def test_early_stopping_reads_run_py_integers():
    assert [early_stopping(v) for v in ("1", "0", "2", "-1", "never", "true")] == [True, False, "never", "never",
                                                                                  "never", True]
    assert make_parser().parse_args(["run", "--max_output_len", "1"]).streaming_interval == 5  # run.py's default


def test_special_tokens_and_hf_model_dir(tmp_path, mpt):
    _, engine = mpt
    tok = build_baichuan_tokenizer_dir(tmp_path / "tok", add_bos_token=True)
    with_bos = run_json(tmp_path, engine, tok, "--input_text", "hello")[0]["input_ids"]
    without = run_json(tmp_path, engine, tok, "--input_text", "hello", "--no_add_special_tokens")[0]["input_ids"]
    assert with_bos == [1, *without]
    out = tmp_path / "hf.json"
    assert kiln_main(["run", "--engine_dir", str(engine), "--hf_model_dir", str(tok), "--input_text", "hello",
                      "--max_output_len", "2", "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["input_ids"] == with_bos


def test_max_tokens_in_paged_kv_cache_caps_the_cache(tmp_path, mpt, capsys):
    _, engine = mpt
    assert kiln.LLM(engine, kv_cache_max_tokens=100).runner.num_blocks == 6  # 100 // 16 tokens per block
    assert kiln_main(["run", "--engine_dir", str(engine), "--input_file", str(_ids(tmp_path)), "--max_output_len", "2",
                      "--max_tokens_in_paged_kv_cache", "32"]) == 2
    assert "too little memory for the KV cache" in last_err_line(capsys)


def _ids(tmp_path: Path) -> Path:
    path = tmp_path / "ids.csv"
    path.write_text("5,6,7,8\n")
    return path


def test_no_repeat_ngram_size(tmp_path, mpt):
    hf, engine = mpt

    def bigrams_repeat(result: dict) -> bool:
        ids = result["input_ids"] + result["output_ids"][0]
        pairs = list(zip(ids, ids[1:]))
        return len(pairs) != len(set(pairs))

    text = ["--input_text", "Born in north-east France, Soyer trained as a", "--max_output_len", "24"]
    assert bigrams_repeat(run_json(tmp_path, engine, hf, *text)[0])  # this random model loops
    assert not bigrams_repeat(run_json(tmp_path, engine, hf, *text, "--no_repeat_ngram_size", "2")[0])


def test_profiling_log_level_and_ignored_run_flags(tmp_path, mpt, capsys):
    _, engine = mpt
    assert kiln_main(["run", "--engine_dir", str(engine), "--input_file", str(_ids(tmp_path)), "--max_output_len", "2",
                      "--run_profiling", "--log_level", "verbose", "--use_py_session", "--kv_cache_enable_block_reuse",
                      "--enable_chunked_context", "--no_prompt_template"]) == 0
    captured = capsys.readouterr()
    assert "batch_size: 1, avg latency of 10 iterations:" in captured.out
    notes = [line for line in captured.err.splitlines() if "accepted and ignored" in line]
    assert len(notes) == 1 and "--kv_cache_enable_block_reuse (kiln always reuses" in notes[0]
    assert logging.getLogger("kiln").level == logging.DEBUG
    logging.getLogger("kiln").setLevel(logging.NOTSET)


def test_compat_flag_tables_are_consistent():
    from kiln.cli.quant_flags import QUANT
    from kiln.cli.trtllm_flags import IGNORED, REFUSED

    spellings = [name for table in (IGNORED, REFUSED, QUANT) for flag in table.values() for name in flag.names]
    assert len(spellings) == len(set(spellings)), "a flag is in two tables"
    from kiln.cli.trtllm_flags import check_compat_flags

    args = make_parser().parse_args(["build", "--checkpoint_dir", "c", "--auto_parallel", "8"])
    with pytest.raises(ConfigError, match="--auto_parallel is refused"):
        check_compat_flags(args, "build")
