"""What kiln may write and replace: an output directory is checked before anything is written (never the current
directory, never an input, never a directory holding files kiln did not write), and the temporary directories of
kiln processes that died (kill -9, power loss) are found by their marker and removed.

kiln's temporary directories sit beside the output as `.{name}.tmp-{pid}` (being written) or `.{name}.old-{pid}`
(the replaced output, about to be removed), each holding a marker file that names the owning process and host. Only
a directory with that marker, on this host, whose process no longer exists is ever removed by the clean-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

from kiln.checkpoint.tokenizer_files import TOKENIZER_FILES

MARKER = ".kiln-tmp"  # a file in each of kiln's temporary directories: {"pid": ..., "host": ...}
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


class OutputDirError(ValueError):
    """An output directory kiln will not write."""


def _holds(outer: Path, inner: Path) -> bool:
    """True when `inner` is `outer` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_output_dir(final: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output directory whose replacement would destroy something that is not kiln's own output: the
    current directory, an input directory (or one holding it), a file, or a directory with other files in it."""
    real = final.resolve()
    if _holds(real, Path.cwd().resolve()):
        raise OutputDirError(f"output directory {final} is the current directory or holds it, which kiln would have "
                             "to replace; name a new subdirectory, e.g. --output_dir ./out")
    for source in inputs:
        if _holds(real, Path(source).resolve()):
            raise OutputDirError(f"output directory {final} is (or holds) the input {source}; writing it would "
                                 "delete the input: choose another --output_dir")
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputDirError(f"output directory {final} exists and is a file; choose another path or remove it")
    foreign = foreign_files(final)
    if foreign is None:
        raise OutputDirError(f"output directory {final} exists and is not a kiln checkpoint or engine; choose another "
                             "path or remove it")
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputDirError(f"output directory {final} holds files kiln did not write ({shown}); kiln replaces only "
                             "its own checkpoints and engines: move them or choose another --output_dir")


def kiln_files(config: dict) -> set[str]:
    """The names kiln writes in a checkpoint or engine of this config.json: the config, one file per rank, and the
    tokenizer files convert and build copy (kiln.checkpoint.tokenizer_files)."""
    mapping = config.get("mapping") if isinstance(config.get("mapping"), dict) else {}
    world = mapping.get("world_size", 1)
    world = world if isinstance(world, int) and 0 < world <= 1 << 16 else 1
    return {"config.json", MARKER, *TOKENIZER_FILES} | {f"rank{r}.safetensors" for r in range(world)}


def foreign_files(path: Path) -> list[str] | None:
    """Names in a non-empty directory that kiln did not write, sorted ([] when all are kiln's); None when the directory
    is not a kiln checkpoint or engine at all. An empty directory holds nothing foreign."""
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return []
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or "kiln_format_version" not in config:
        return None
    return [n for n in names if n not in kiln_files(config)]


def write_marker(directory: Path) -> None:
    (directory / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_temp_dirs(parent: Path) -> list[Path]:
    """kiln's temporary directories in `parent` whose owning process on this host is gone."""
    stale = []
    host = socket.gethostname()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            owner = json.loads((entry / MARKER).read_text())
        except (OSError, ValueError):
            continue  # no marker: not provably kiln's, so never touched
        if not isinstance(owner, dict) or owner.get("host") != host or owner.get("pid") != int(match.group(2)):
            continue
        if not _pid_alive(owner["pid"]):
            stale.append(entry)
    return stale


def clean_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove kiln's temporary directories in `parent` left by dead processes; return what was removed."""
    removed = stale_temp_dirs(parent)
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    return removed
