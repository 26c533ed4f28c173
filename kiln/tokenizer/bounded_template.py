"""A Jinja sandbox for chat templates whose output is bounded: a 30-byte template such as `{{ 'ab ' * 70000000 }}`
must not render gigabytes before anything is tokenized.

Three guards, each checked before the big value exists: `*` on strings and lists and `**` on integers are checked
against the budget (jinja2's sandbox lets us intercept these operators); calls and filters given a width or count
beyond the budget (`center`, `ljust`, `indent`, `wordwrap`, `zfill`, `replace` ...) are refused; and the rendered
stream is cut off as soon as it passes the budget (loops are already bounded by the sandbox's range limit)."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

from jinja2.sandbox import ImmutableSandboxedEnvironment

# What a chat template may add around the messages' own text: real templates add a few hundred characters per
# message; 1 Mi characters leaves room for any plausible system preamble.
TEMPLATE_OVERHEAD_CHARS = 1 << 20


class TemplateTooLarge(Exception):
    """The template would render more text than the budget allows."""


def _check_size(size: int, budget: int) -> None:
    if size > budget:
        raise TemplateTooLarge(f"it would make {size:,} characters, more than the {budget:,} allowed")


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> None:
    """Width and count arguments beyond the budget can only make text beyond it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > budget:
            _check_size(int(value), budget)


def _replace_size(target: Any, args: tuple[Any, ...]) -> int:
    """The length `str.replace(old, new)` would produce, computed without producing it."""
    if isinstance(target, str) and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = target.count(args[0]) if args[0] else len(target) + 1
        return len(target) + count * (len(args[1]) - len(args[0]))
    return 0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox (immutable, trim/lstrip blocks) with every way to make large text from little checked
    against `budget` characters."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, budget: int, **options: Any) -> None:
        super().__init__(**options)
        self.budget = budget
        self.filters = {name: self._bounded(f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, numbers.Integral):
                    _check_size(len(seq) * int(times), self.budget)
        if operator == "**" and isinstance(left, numbers.Integral) and isinstance(right, numbers.Integral):
            if abs(int(left)) > 1 and int(right) > 64:  # an integer of thousands of digits serves no template
                raise TemplateTooLarge(f"{left} ** {right} is too large a number for a chat template")
        return super().call_binop(context, operator, left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs, self.budget)
        if getattr(__obj, "__name__", "") == "replace":
            _check_size(_replace_size(getattr(__obj, "__self__", None), args), self.budget)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list)):
            _check_size(len(result), self.budget)
        return result

    def _bounded(self, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            _check_args(args, kwargs, self.budget)
            if f.__name__ == "do_replace" and len(args) >= 4:  # (eval_ctx, s, old, new)
                _check_size(_replace_size(str(args[1]), tuple(args[2:4])), self.budget)
            result = f(*args, **kwargs)
            if isinstance(result, str):
                _check_size(len(result), self.budget)
            return result

        return bounded


def render_bounded(env: BoundedSandbox, template: str, **context: Any) -> str:
    """Render `template`, stopping as soon as the output passes the environment's budget."""
    pieces, size = [], 0
    for piece in env.from_string(template).generate(**context):
        size += len(piece)
        _check_size(size, env.budget)
        pieces.append(piece)
    return "".join(pieces)
