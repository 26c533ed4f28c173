"""kiln run from a Hugging Face checkpoint in one step (converted and built into the cache once, then reused),
--streaming's readable text followed by the usual results, and --help: groups, a help line and the default for
every flag, hyphenated spellings through argparse's public API (issue 19)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fixtures_api import tiny_hf_dir
from kiln.cli.main import main as kiln_main, make_parser

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("cli_one_step") / "hf")


def run(capsys, *flags: str) -> tuple[int, str, str]:
    code = kiln_main(["run", "--device", "cpu", "--max_output_len", "6", "--ignore_eos", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_model_dir_builds_once_then_reuses(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    code, first, err = run(capsys, "--model_dir", str(hf_dir), "--dtype", "float32", "--input_text", "Hello, my name is")
    assert code == 0 and "converted and built" in err
    entry = next((tmp_path / "cache" / "engines").iterdir())
    code, second, err = run(capsys, "--model_dir", str(hf_dir), "--dtype", "float32", "--input_text",
                            "Hello, my name is")
    assert code == 0 and err.strip() == f"kiln: using the cached engine {entry} for {hf_dir}"
    assert first == second and 'Output [Text 0 Beam 0]: " is is is,,,"' in first
    code, explicit, _ = run(capsys, "--engine_dir", str(entry), "--input_text", "Hello, my name is")
    assert explicit == first


def test_one_step_flags_need_model_dir_alone(hf_dir, capsys):
    code, _, err = run(capsys, "--engine_dir", "somewhere", "--dtype", "float32")
    assert code == 2 and "--dtype applies to a one-step run from --model_dir alone" in err
    assert len(err.strip().splitlines()) == 1


def test_streaming_prints_readable_text_then_the_results(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "--model_dir", str(hf_dir), "--input_text", "Hello, my name is", "--streaming")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == " is is is,,,"  # the text as it came, no quotes or brackets, then the usual block
    assert lines[1:] == ['Input [Text 0]: "Hello, my name is"', 'Output [Text 0 Beam 0]: " is is is,,,"']
    code, out, _ = run(capsys, "--model_dir", str(hf_dir), "--input_text", "Hello, my name is", "Hello, my name is",
                       "--streaming", "--streaming_interval", "4")
    streamed = [line for line in out.splitlines() if line.startswith("[")]
    assert streamed[:2] == ["[0.0]  is is is,", "[1.0]  is is is,"]  # 4 tokens each
    assert sorted(streamed[2:]) == ["[0.0] ,, [length]", "[1.0] ,, [length]"]
    assert out.count('Output [Text 1 Beam 0]: " is is is,,,"') == 1


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices  # test-only read


def test_every_flag_has_help_and_run_is_grouped():
    for name, cmd in subcommands().items():
        for action in cmd._actions:
            if action.option_strings:
                assert action.help, f"kiln {name} {action.option_strings[0]} has no help"
    text = subcommands()["run"].format_help()
    for group in ("inputs:", "limits:", "sampling:", "outputs:", "parallelism and device:", "debug and profiling:"):
        assert f"\n{group}\n" in text
    sampling = text.split("\nsampling:\n")[1].split("\noutputs:\n")[0]
    assert "--temperature" in sampling and "--top_p" in sampling and "--output_json" not in sampling
    build = " ".join(subcommands()["build"].format_help().split())
    assert "sequences running at once (default: 8)" in build


def test_hyphen_spellings_parse_through_the_public_api():
    args = make_parser().parse_args(["run", "--max-output-len", "3", "--input-text", "a-b", "--top-k=5"])
    assert (args.max_output_len, args.input_text, args.top_k) == (3, ["a-b"], 5)
    build = make_parser().parse_args(["build", "--checkpoint-dir", "c", "--max-batch-size=4", "--tokens-per-block", "8"])
    assert (build.checkpoint_dir, build.max_batch_size, build.kv_block_size) == ("c", 4, 8)
    for source in (REPO / "kiln" / "cli").glob("*.py"):
        assert not re.search(r"\._(option_string_actions|actions)\b", source.read_text()), source


def test_model_dir_that_is_not_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run(capsys, "--model_dir", str(tmp_path / "nowhere"))
    assert code == 2 and "has no config.json" in err and len(err.strip().splitlines()) == 1
