"""`kiln --version`, and `kiln run`'s one-line note when sampling flags meet run.py's greedy --top_k 1 (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln
from kiln.cli.main import main as kiln_main, make_parser
from kiln.cli.run_checks import greedy_note


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kiln_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kiln {kiln.__version__}"


def note(*flags: str) -> str | None:
    return greedy_note(make_parser().parse_args(["run", "--max_output_len", "4", *flags]))


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "0.8"], "--temperature 0.8"),
    (["--top_p", "0.95"], "--top_p 0.95"),
    (["--num_return_sequences", "2"], "--num_return_sequences 2"),
    (["--temperature", "0.7", "--top_p", "0.9"], "--temperature 0.7, --top_p 0.9"),
])
def test_sampling_flags_under_greedy_top_k_are_named(flags, named):
    line = note(*flags)
    assert line is not None and "\n" not in line
    assert "greedy because --top_k is 1" in line and named in line and "--top_k 0" in line


@pytest.mark.parametrize("flags", [
    [],  # run.py's defaults: greedy, nothing asked
    ["--temperature", "0.8", "--top_k", "0"],  # samples
    ["--top_p", "0.9", "--top_k", "40"],
    ["--temperature", "0"],  # greedy asked for
    ["--top_p", "1"],  # keeps every token: not a request to sample
    ["--num_beams", "2", "--num_return_sequences", "2"],  # beam search returns distinct beams without sampling
])
def test_no_note_when_nothing_is_ignored(flags):
    assert note(*flags) is None


@pytest.fixture()
def dummy_engine(tmp_path) -> Path:
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--dtype", "float32", "--output_dir", str(tmp_path / "c")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "e"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--no_tune"]) == 0
    return tmp_path / "e"


def test_run_prints_the_note_once_and_stays_greedy(tmp_path, dummy_engine, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("1,2,3\n")
    base = ["run", "--engine_dir", str(dummy_engine), "--device", "cpu", "--input_file", str(prompts),
            "--max_output_len", "4", "--ignore_eos"]
    assert kiln_main(base) == 0
    greedy = capsys.readouterr()
    assert "decoding is greedy" not in greedy.err
    assert kiln_main([*base, "--temperature", "1.5", "--top_p", "0.5"]) == 0
    asked = capsys.readouterr()
    assert [line for line in asked.err.splitlines() if "decoding is greedy" in line] == [
        "kiln run: decoding is greedy because --top_k is 1 (run.py's default), which ignores --temperature 1.5, "
        "--top_p 0.5; pass --top_k 0 (no top-k limit) or --top_k N > 1 to sample"]
    assert asked.out == greedy.out  # run.py's default kept: the output is the greedy one
