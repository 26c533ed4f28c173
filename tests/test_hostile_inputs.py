"""Run-time inputs that used to be silently accepted or fail late: truncation lengths, token ids beyond the
vocabulary, nonsense sampling values, input files that are not token ids, output paths found wrong only after
generating, devices, hostile chat templates, bad environment variables and engines whose files disagree with their
config. Each is refused before any work, in one line with exit code 2 (or a RequestError from the API, after which
the LLM still works)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import kiln
from fixtures_dbrx import dbrx_published_config
from fixtures_tokenizers import build_neox_tokenizer_dir
from kiln.cli.main import main as kiln_main
from kiln.config import ConfigError
from kiln.llm import RequestError
from kiln.tokenizer import TokenizerError, load_tokenizer, render_chat_template

VOCAB = 300


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A tiny fp32 DBRX engine of a 300-token vocabulary (smaller than the test tokenizer's 402), made once."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "config.json").write_text(json.dumps(dbrx_published_config()))
    assert kiln_main(["convert", "--config", str(root / "config.json"), "--output_dir", str(root / "c")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(root / "c"), "--output_dir", str(root / "e"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--no_tune"]) == 0
    build_neox_tokenizer_dir(root / "tok")
    return root


@pytest.fixture(scope="module")
def llm(made):
    return kiln.LLM(made / "e", device="cpu")


def run_fails(made: Path, capsys, *args: str) -> str:
    """`kiln run` on the tiny engine: exit 2, one line, nothing generated; returns the line."""
    argv = ["run", "--engine_dir", str(made / "e"), "--max_output_len", "2", "--device", "cpu", *args]
    assert kiln_main(argv) == 2
    out, err = capsys.readouterr()
    assert "Output [Text" not in out, "the run generated before failing"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln run: error: "), err
    return lines[0].removeprefix("kiln run: error: ")


def csv_file(tmp_path: Path, text: str | bytes, name: str = "p.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize("value", ["-3", "0"])
def test_max_input_length_must_be_positive(made, tmp_path, capsys, value):
    err = run_fails(made, capsys, "--input_file", csv_file(tmp_path, "1,2,3,4,5\n"), "--max_input_length", value)
    assert err == f"--max_input_length must be >= 1 (the number of last prompt tokens to keep), got {value}"


def test_token_ids_beyond_the_vocabulary(made, tmp_path, capsys, llm):
    err = run_fails(made, capsys, "--input_file", csv_file(tmp_path, "1,2\n5,300,7\n"))
    assert err == ("prompt 1 holds token id 300 at position 1, outside the model's vocabulary of 300 (0..299); is the "
                   "tokenizer this model's?")
    for bad in ([1, -1], [1, 2.0], []):
        with pytest.raises(RequestError):
            llm.generate([[1, 2], bad], kiln.SamplingParams(max_tokens=2))
    out = llm.generate([[1, 2]], kiln.SamplingParams(max_tokens=2, temperature=0))  # still usable
    assert len(out[0].outputs[0].token_ids) == 2


def test_tokenizer_larger_than_the_model(made, capsys):
    err = run_fails(made, capsys, "--tokenizer_dir", str(made / "tok"), "--input_text", "hello <|im_end|>")
    assert "token id 401 at position" in err and "outside the model's vocabulary of 300" in err


def test_end_id_beyond_the_vocabulary(made, tmp_path, capsys, llm):
    err = run_fails(made, capsys, "--input_file", csv_file(tmp_path, "1,2\n"), "--end_id", "300")
    assert err == "end_id 300 is outside the model's vocabulary of 300 (0..299); use an id of this model's tokenizer"
    with pytest.raises(RequestError, match="stop_token_ids 999 is outside"):
        llm.generate([[1, 2]], kiln.SamplingParams(max_tokens=2, stop_token_ids=[999]))


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_temperature_nonsense_refused_even_under_greedy(made, tmp_path, capsys, value):
    err = run_fails(made, capsys, "--input_file", csv_file(tmp_path, "1,2\n"), "--temperature", value)
    assert err == f"--temperature must be a finite number >= 0, got {float(value)}"


def test_npy_float_ids_refused(made, tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.array([[1.7, 2.2]]))
    err = run_fails(made, capsys, "--input_file", str(tmp_path / "p.npy"))
    assert err.endswith("holds float64 values; token ids must be an integer array (a float would be truncated into "
                        "another token)")
    np.save(tmp_path / "o.npy", np.array([[1, 2]], dtype=object), allow_pickle=True)
    assert "without Python objects" in run_fails(made, capsys, "--input_file", str(tmp_path / "o.npy"))


def test_csv_errors_name_file_and_row(made, tmp_path, capsys):
    path = csv_file(tmp_path, "1,2\n3,4,x5\n")
    assert run_fails(made, capsys, "--input_file", path) == (
        f"--input_file {path} row 2 column 3: 'x5' is not a token id (an integer)")
    path = csv_file(tmp_path, b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "g.csv")
    assert run_fails(made, capsys, "--input_file", path).startswith(f"--input_file {path} is not a text CSV file")


def test_outputs_checked_before_generating(made, tmp_path, capsys):
    prompt = csv_file(tmp_path, "1,2\n")
    assert run_fails(made, capsys, "--input_file", prompt, "--output_csv", str(tmp_path)) == (
        f"--output_csv {tmp_path} is a directory; name a file")
    missing = tmp_path / "nope" / "o.json"
    assert run_fails(made, capsys, "--input_file", prompt, "--output_json", str(missing)) == (
        f"--output_json {missing}: the directory {missing.parent} does not exist; create it first")
    same = str(tmp_path / "o.npy")
    assert "name the same file" in run_fails(made, capsys, "--input_file", prompt, "--output_npy", same,
                                             "--output_log_probs_npy", same)


@pytest.mark.parametrize("device, message", [
    ("meta", "--device 'meta': kiln runs on cpu or cuda (cuda:N), not meta"),
    ("tpu", "--device 'tpu' is not a device; use cpu, cuda or cuda:N"),
    ("no such device!", "--device 'no such device!' is not a device; use cpu, cuda or cuda:N"),
    ("cuda:7", "--device cuda:7: "),
])
def test_device_values(made, tmp_path, capsys, device, message):
    assert message in run_fails(made, capsys, "--input_file", csv_file(tmp_path, "1,2\n"), "--device", device)


def engine_copy(made: Path, tmp_path: Path) -> Path:
    engine = Path(shutil.copytree(made / "e", tmp_path / "e"))
    for f in engine.glob("rank*.safetensors"):
        f.chmod(0o644)
    return engine


def edit_engine_config(engine: Path, edit) -> None:
    config = json.loads((engine / "config.json").read_text())
    edit(config)
    (engine / "config.json").write_text(json.dumps(config))


def test_engine_dtype_disagreeing_with_its_files(made, tmp_path):
    engine = engine_copy(made, tmp_path)
    edit_engine_config(engine, lambda c: c.update(dtype="float16"))
    with pytest.raises(ConfigError, match=r"rank0.safetensors holds float32 tensors, but the engine's config.json says "
                                          r"float16; the config or the file was changed"):
        kiln.LLM(engine, device="cpu")


def test_engine_without_build_section(made, tmp_path, capsys):
    engine = engine_copy(made, tmp_path)
    edit_engine_config(engine, lambda c: c.pop("build"))
    assert kiln_main(["run", "--engine_dir", str(engine), "--max_output_len", "2", "--input_file",
                      csv_file(tmp_path, "1,2\n")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kiln run: error: {engine} is an engine without its build section in config.json; rebuild it with "
        "`kiln build`")


def test_rank_file_copied_from_another_rank(made, tmp_path, capsys):
    ckpt = tmp_path / "c2"
    assert kiln_main(["convert", "--config", str(made / "config.json"), "--tp_size", "2", "--output_dir",
                      str(ckpt)]) == 0
    (ckpt / "rank1.safetensors").unlink()
    shutil.copy(ckpt / "rank0.safetensors", ckpt / "rank1.safetensors")
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e2"), "--no_tune"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "rank1.safetensors holds rank 0's weights, not rank 1's; the engine's files were copied or renamed: rebuild "
        "it from its checkpoint")
    assert not (tmp_path / "e2").exists()


HOSTILE_TEMPLATES = [
    "{{ 'ab ' * 70000000 }}",
    "{{ 70000000 * 'ab ' }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'a'.ljust(10 ** 9) }}",
    "{{ ('a' * 1000000).replace('a', 'bbbbbbbbbbbb') }}",
    "{{ ('a' * 1000000) | replace('a', 'bbbbbbbbbbbb') }}",
    "{{ 7 ** 100000000 }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_output_is_bounded(template):
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="the chat template renders too much text"):
        render_chat_template(template, [{"role": "user", "content": "hi"}], True, {})
    assert time.monotonic() - start < 5


def test_chat_template_normal_output_and_cli(made, tmp_path, capsys):
    messages = [{"role": "user", "content": "y" * 3_000_000}]  # long messages are the messages' own budget
    assert len(render_chat_template("{{ messages[0]['content'] }}!", messages, True, {})) == 3_000_001
    tok = build_neox_tokenizer_dir(tmp_path / "tok")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = HOSTILE_TEMPLATES[0]
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError):
        load_tokenizer(tok).apply_chat_template(messages[:1])
    err = run_fails(made, capsys, "--tokenizer_dir", str(tok), "--chat", "--input_text", "hi")
    assert err.startswith("the chat template renders too much text (it would make 210,000,000 characters")


def test_bad_environment_variables_are_named(monkeypatch):
    from kiln.distributed.launch import launcher_env
    from kiln.envvars import env_float

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match=r"environment variable RANK='one' must be an integer; fix or unset it"):
        launcher_env()
    monkeypatch.setenv("KILN_DIST_INIT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match=r"KILN_DIST_INIT_TIMEOUT='soon' must be a number > 0"):
        env_float("KILN_DIST_INIT_TIMEOUT", 120.0)


@pytest.mark.parametrize("field, value, message", [
    ("kv_block_size", 0, "--kv_block_size must be >= 1, got 0"),
    ("max_batch_size", "8", "build field max_batch_size must be an integer, got '8'"),
    ("max_seq_len", 10**9, "exceeds the model's max_position_embeddings"),
])
def test_engine_build_section_edited(made, tmp_path, field, value, message):
    engine = engine_copy(made, tmp_path)
    edit_engine_config(engine, lambda c: c["build"].update({field: value}))
    with pytest.raises(ConfigError, match=message):
        kiln.LLM(engine, device="cpu")
