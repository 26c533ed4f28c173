"""Per-token perplexity of a long text over rolling windows (the scheme of Hugging Face's "Perplexity of fixed-length
models" guide and lm-eval-harness's rolling log-likelihood): every window feeds `max_length` tokens to the model;
the first scores all of its tokens but token 0 (which has no context), each later one scores the next `stride`
tokens with the `max_length - stride` tokens before them as context (more in the last window, which still spans
`max_length` tokens). Every token but the first is scored exactly once, and the result is
exp(summed negative log-likelihood / scored tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from kiln.config import ConfigError

# window token ids -> [len(ids), vocab] logits, row i predicting token i + 1
LogitsFn = Callable[[list[int]], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; the predictions of tokens [target, end) count."""

    begin: int
    end: int
    target: int


@dataclass
class PerplexityResult:
    """The summed negative log-likelihood (nats) of the scored tokens, their count and exp(nll / tokens)."""

    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def check_window(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise ConfigError(f"--max_length is {max_length}; a window needs at least 2 tokens (one to predict from)")
    if not 1 <= stride < max_length:
        raise ConfigError(f"--stride is {stride}; it must be at least 1 and below --max_length ({max_length}), so "
                          "that every scored token keeps max_length - stride >= 1 tokens of context")


def windows(n_tokens: int, max_length: int, stride: int) -> Iterator[Window]:
    """Windows over `n_tokens` tokens: [0, max_length) scores 1.., then each scores `stride` more tokens."""
    check_window(max_length, stride)
    if n_tokens < 2:
        return
    end = min(max_length, n_tokens)
    yield Window(0, end, 1)
    while end < n_tokens:
        target, end = end, min(end + stride, n_tokens)
        yield Window(end - max_length, end, target)  # end - max_length >= 0: the first window was full


def window_nll(logits: torch.Tensor, ids: Sequence[int], window: Window) -> float:
    """Summed NLL of tokens [target, end) from `logits` [end - begin, vocab] of the window's tokens."""
    rows = logits[window.target - 1 - window.begin: window.end - 1 - window.begin].float()  # [scored, vocab]
    targets = torch.tensor(ids[window.target: window.end], device=rows.device)
    return float(torch.nn.functional.cross_entropy(rows, targets, reduction="sum").double())


def rolling_perplexity(ids: Sequence[int], logits_fn: LogitsFn, max_length: int, stride: int,
                       progress: Callable[[Iterator[Window], int], Iterator[Window]] | None = None
                       ) -> PerplexityResult:
    """Perplexity of `ids` under a model given as `logits_fn`, window by window."""
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    result = PerplexityResult(0.0, 0)
    planned = list(windows(len(ids), max_length, stride))
    for window in progress(iter(planned), len(planned)) if progress else planned:
        logits = logits_fn(list(ids[window.begin: window.end]))
        result.nll += window_nll(logits, ids, window)
        result.tokens += window.end - window.target
    return result
