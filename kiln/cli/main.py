"""`kiln <command>`: the command line, one module per command. Errors a user can fix are printed as one line."""

from __future__ import annotations

import argparse
import os
import sys

from kiln.cli import (bench_cmd, build_cmd, convert_cmd, perplexity_cmd, quantize_cmd, run_cmd, serve_cmd,
                      summarize_cmd)
from kiln.cli.errors import DEBUG_ENV, run_reported
from kiln.cli.parser import KilnParser

COMMANDS = {"convert": convert_cmd, "build": build_cmd, "run": run_cmd, "bench": bench_cmd, "quantize": quantize_cmd,
            "summarize": summarize_cmd, "perplexity": perplexity_cmd, "serve": serve_cmd}


def kiln_version() -> str:
    """The installed package's version; kiln.__version__ when kiln runs from a source tree without being installed."""
    from importlib import metadata

    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        import kiln

        return kiln.__version__


def make_parser() -> argparse.ArgumentParser:
    parser = KilnParser(prog="kiln", description="Inference engine for DBRX, MPT and Baichuan. Every flag also takes "
                                                 "its hyphenated spelling (--max-batch-size for --max_batch_size).")
    parser.add_argument("--version", action="version", version=f"kiln {kiln_version()}")
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error before its one-line message (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=KilnParser)
    for name, module in COMMANDS.items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    abandoned_before = _teardown_abandoned()
    code = _run(args)
    # A multi-rank engine of this command could not leave its world cleanly: exit at once rather than hang in
    # interpreter shutdown. Only this command's engine counts (main may run many commands in one process).
    if _teardown_abandoned() and not abandoned_before:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _teardown_abandoned() -> bool:
    launch = sys.modules.get("kiln.distributed.launch")
    return launch is not None and launch.TEARDOWN_ABANDONED


def _run(args: argparse.Namespace) -> int:
    """Run the command; every failure becomes one line on stderr and an exit code (kiln.cli.errors)."""
    return run_reported(args.command, lambda: args.handler(args), debug=getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
