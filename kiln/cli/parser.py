"""kiln's argument parser: defaults shown in every --help (added to each flag's help when it names none), and hyphenated spellings of the underscore flags
(`--max-batch-size` for `--max_batch_size`), through argparse's public API only."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


def with_default(options: dict[str, Any]) -> dict[str, Any]:
    """The flag's options with its default added to its help ("(default: 8)"), unless the help already says it or
    there is nothing to say (no default, False, a hidden flag)."""
    help_text, default = options.get("help"), options.get("default")
    if (help_text is None or help_text == argparse.SUPPRESS or default in (None, False, argparse.SUPPRESS)
            or "default" in help_text or options.get("action") in ("store_true", "help", "version")):
        return options
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return dict(options, help=f"{help_text} (default: {str(shown).replace('%', '%%')})")


class KilnParser(argparse.ArgumentParser):
    """An ArgumentParser that shows defaults and accepts `--a-b` wherever `--a_b` is a flag.

    It records the long flags added to it and to its argument groups; before parsing, a word of the command line
    that is the hyphenated spelling of one of them (and not itself a flag) is rewritten to the underscore spelling
    (also in `--a-b=value`). Words after a bare `--` are left alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.long_flags: set[str] = set()  # before super().__init__, which adds --help
        super().__init__(*args, **kwargs)

    def _record(self, names: Sequence[str]) -> None:
        self.long_flags.update(n for n in names if isinstance(n, str) and n.startswith("--"))

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        self._record(args)
        return super().add_argument(*args, **with_default(kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return self._recording(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> Any:
        return self._recording(super().add_mutually_exclusive_group(*args, **kwargs))

    def _recording(self, group: Any) -> Any:
        """`group` with its flags recorded and their defaults shown, as the parser's own."""
        add = group.add_argument

        def add_recorded(*names: Any, **options: Any) -> argparse.Action:
            self._record(names)
            return add(*names, **with_default(options))

        group.add_argument = add_recorded  # type: ignore[method-assign]
        return group

    def underscored(self, word: str) -> str:
        flag, eq, value = word.partition("=")
        if not flag.startswith("--") or flag in self.long_flags:
            return word
        spelled = "--" + flag[2:].replace("-", "_")
        return spelled + eq + value if spelled in self.long_flags else word

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        end = words.index("--") if "--" in words else len(words)
        words = [self.underscored(w) for w in words[:end]] + words[end:]
        return super().parse_known_args(words, namespace)
