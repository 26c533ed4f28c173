"""Output directories appear complete or not at all: written under a temporary name, renamed when done."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from kiln.checkpoint.output_guard import (MARKER, OutputDirError, check_output_dir, clean_stale_temp_dirs,
                                          write_marker)

__all__ = ["OutputDirError", "atomic_output_dir"]


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on error (or an interrupt) it is
    removed.

    `path` is checked first (output_guard.check_output_dir): an existing `path` is replaced only if it is empty or a
    kiln checkpoint/engine holding nothing but kiln's own files, and never when it is the current directory or
    holds one of `inputs`. Temporary directories that dead kiln processes left beside it are removed."""
    final = Path(path)
    check_output_dir(final, inputs)
    final = final.resolve()  # "out/" and "out" name the same directory; the temporary name needs the real one
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_marker(tmp)  # written first: a kill -9 from here on leaves a directory the next run can prove is kiln's
    try:
        yield tmp
        check_output_dir(final, inputs)  # again: a user may have put files there while kiln was writing
        (tmp / MARKER).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, final)


def _replace(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`, the old `final` (a kiln artifact, checked) aside under a marked name and then away."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        write_marker(final)  # the marker travels with the rename: a kill here leaves a cleanable directory
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
