"""How a command's failure reaches the user: always one line on stderr and an exit code, never a traceback unless
asked for (KILN_DEBUG=1 or `kiln --debug`). SIGTERM is handled as Ctrl-C is, so that outputs being written are
removed either way.

Exit codes: 2 for errors the user can fix (bad flags, files, configs, requests, full disk, read-only filesystem),
1 for anything else (a bug in kiln: the line says so and how to see the traceback), 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator

DEBUG_ENV = "KILN_DEBUG"

# OS errors a user can act on, with what to do (the file involved is named from the exception).
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere",
    errno.EROFS: "the filesystem is read-only; write elsewhere",
    errno.EFBIG: "the file exceeds the size limit of this filesystem or process (ulimit -f); raise it or write "
                 "elsewhere",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that the same clean-up runs."""


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the file and what to do."""
    hint = _OS_HINTS.get(err.errno or -1, err.strerror or str(err))
    where = " ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"cannot use {where}: {hint}" if where else f"{hint} ({err})"


def one_line(text: str) -> str:
    """Messages from deep inside libraries can span lines; the user gets one."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def run_reported(command: str, handler: Callable[[], int], debug: bool = False) -> int:
    """Run a command's handler and turn whatever it raises into one line on stderr and an exit code."""
    try:
        with sigterm_as_interrupt():
            return handler() or 0
    except Terminated:
        _report(command, "terminated (SIGTERM); nothing half-written was left", debug)
        return 143
    except KeyboardInterrupt:
        _report(command, "interrupted", debug)
        return 130
    except ValueError as err:
        # kiln's own errors (ConfigError, CheckpointError, RequestError, ...) are ValueErrors that say what to do.
        _report(command, f"error: {one_line(err)}", debug)
        return 2
    except OSError as err:
        _report(command, f"error: {describe_os_error(err)}", debug)
        return 2
    except MemoryError:
        _report(command, "error: out of memory; use smaller limits or a machine with more memory", debug)
        return 2
    except Exception as err:  # the catch-all: a bug in kiln, still one line
        _report(command, f"internal error: {type(err).__name__}: {one_line(err)} (a bug in kiln; run with "
                         f"{DEBUG_ENV}=1 or --debug for the traceback)", debug)
        return 1


def _report(command: str, line: str, debug: bool) -> None:
    if debug_enabled(debug) and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    print(f"kiln {command}: {line}", file=sys.stderr)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated in the main thread (as SIGINT raises KeyboardInterrupt), so
    that temporary directories and rank processes are cleaned up the same way. Outside the main thread (kiln called
    as a library from a worker thread) signals cannot be set and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
