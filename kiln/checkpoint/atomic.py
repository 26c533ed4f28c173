"""Output directories appear complete or not at all: written under a temporary name, renamed when done."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


class OutputDirError(ValueError):
    """An output directory kiln will not write."""


def _is_kiln_artifact(path: Path) -> bool:
    try:
        return "kiln_format_version" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def atomic_output_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on error it is removed.

    An existing `path` is replaced only if it is empty or a kiln checkpoint/engine: never a directory of other files."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not _is_kiln_artifact(final))):
        raise OutputDirError(
            f"output directory {final} exists and is not a kiln checkpoint or engine; choose another path or remove it"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
