"""The examples shown in docs/api.md and README.md run as shown (issue 19): every python block of docs/api.md in
order in one session, and README's commands and Python on the shipped reference model models/mpt-books, from the
repository root with the engine cache in a temporary directory."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from kiln.cli.main import main as kiln_main

REPO = Path(__file__).resolve().parent.parent


def fenced_blocks(path: Path, language: str = "") -> list[str]:
    """The fenced code blocks of a Markdown file whose opening fence names `language` ('' for none)."""
    blocks, current, opened = [], None, ""
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, opened = [], line[3:].strip()
            else:
                if opened == language:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_python_block_of_docs_api_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    blocks = fenced_blocks(REPO / "docs" / "api.md", "python")
    assert len(blocks) >= 8
    session: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), session)  # noqa: S102 - the docs' own examples
    out = capsys.readouterr()
    assert "'Call me Ishmael.' -> " in out.out
    assert "this looks like a transformers BatchEncoding" in out.out
    assert "kiln: converted and built models/mpt-books into" in out.err


def readme_commands(needle: str) -> list[list[str]]:
    """README's `kiln ...` lines in the plain fenced blocks that mention `needle`, as argument lists."""
    lines = [line for block in fenced_blocks(REPO / "README.md") if needle in block for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("kiln ")]


def test_readme_reference_model_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "models").symlink_to(REPO / "models")
    monkeypatch.chdir(tmp_path)
    commands = readme_commands("models/mpt-books")
    assert [c[0] for c in commands] == ["convert", "build", "run", "bench", "run"]
    outs = []
    for argv in commands:
        assert kiln_main(argv + (["--device", "cpu"] if argv[0] in ("run", "bench") else [])) == 0, argv
        outs.append(capsys.readouterr().out)
    built, one_step = outs[2], outs[4]
    bench = json.loads((tmp_path / "mpt-bench.json").read_text())
    assert [c["batch_size"] for c in bench["cases"]] == [1, 4] and bench["error"] is None
    text = built.split('Output [Text 0 Beam 0]: "', 1)[1].rsplit('"', 1)[0]
    assert len(text) > 40 and 'Input [Text 0]: "Call me Ishmael."' in built
    # The one-step engine says the same as the one built by hand, streamed first (--streaming), then the block.
    assert one_step == text + "\n" + built


def test_readme_python_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    blocks = [b for b in fenced_blocks(REPO / "README.md", "python") if "models/mpt-books" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.strip()


CITED = re.compile(r"(?<![\w./-])((?:kiln|tests|docs|benchmarks|scripts|models|engine|executor|layers|kernels|quant|"
                   r"distributed|checkpoint|bench|eval|tokenizer|cli)/[\w./-]*\w)")


def test_repository_paths_cited_in_the_docs_exist():
    """A file the docs point to is there (kiln/..., tests/..., or a module named from inside kiln/, with or without
    .py); placeholders in capitals (models/NAME) and globs (kernels/triton_*) are not paths."""
    missing = []
    for md in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        for cited in set(CITED.findall(md.read_text())):
            if re.search(r"/[A-Z]+$|_$", cited):
                continue
            places = [REPO / cited, REPO / "kiln" / cited, md.parent / cited]
            if not any(p.exists() or p.with_name(p.name + ".py").exists() for p in places):
                missing.append(f"{md.relative_to(REPO)}: {cited}")
    assert missing == []


def example_commands() -> list[tuple[str, list[str]]]:
    """Every `kiln ...` line (or `torchrun ... -m kiln ...`) of the plain and bash blocks in README.md and docs/,
    except synopses: lines with [optional] parts, "...", $variables or CAPITAL placeholders."""
    from kiln.cli.main import COMMANDS

    found = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in fenced_blocks(md, "") + fenced_blocks(md, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                words = shlex.split(line) if line.startswith(("kiln ", "torchrun ")) else []
                words = words[words.index("kiln") + 1:] if "kiln" in words else []
                synopsis = any(m in line for m in ("[", "...", "$")) or re.search(r"\s[A-Z]+(\s|$)", line)
                if words and words[0] in COMMANDS and not synopsis:
                    found.append((f"{md.relative_to(REPO)}: {line}", words))
    return found


def test_every_example_command_in_the_docs_parses():
    from kiln.cli.main import make_parser

    examples = example_commands()
    assert len(examples) > 30
    for where, argv in examples:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                make_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: {err.getvalue().strip()}")
