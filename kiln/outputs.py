"""What `LLM.generate` returns, shaped as vLLM's outputs (RequestOutput, CompletionOutput, Logprob) so that code
written for vLLM reads kiln's results unchanged; kiln's own extras (token_logprobs, top_logprobs, logits, score)
sit beside vLLM's fields. Plain Python apart from the optional logits tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """vLLM's Logprob: a token's log-probability under the raw model distribution, its 1-based rank in the
    vocabulary (None where kiln does not know it: a chosen token outside the requested top k) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One step's (or one prompt position's) logprobs: the chosen token first, then the k most likely tokens.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated sequence, as vLLM's CompletionOutput: ``index``, ``text``, ``token_ids`` (the end token
    included when generation stopped on it), ``cumulative_logprob``, ``logprobs`` (None unless
    SamplingParams.logprobs was set; then one {token_id: Logprob} per generated token), ``finish_reason`` ("stop",
    "length" or "abort") and ``stop_reason`` (the stop string or stop token id that ended it; None for the model's
    end token or the length limit).

    kiln's extras: ``token_logprobs`` (the chosen tokens' logprobs, always filled; for beam search the processed
    log-probabilities the beam was scored with), ``top_logprobs`` ([(token_id, logprob)] per step, as run.py),
    ``logits`` (with return_logits: float32 [vocab] per token) and ``score`` (beam search: cumulative logprob /
    generated length ** length_penalty, transformers' sequences_scores; None otherwise)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[PositionLogprobs] | None = None
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)  # torch.Tensor [vocab] float32 per token
    score: float | None = None

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything generated for one prompt (several outputs when n > 1), as vLLM's RequestOutput. ``prompt`` is
    None for a token-id prompt; ``prompt_logprobs`` is None unless SamplingParams.prompt_logprobs was set, then
    one entry per prompt token, None for the first (nothing predicts it)."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamDelta:
    """What one step added to one output (for streaming)."""

    request_id: int
    index: int
    token_id: int
    text: str
    finish_reason: str | None


def position_logprobs(chosen: int, chosen_logprob: float, top: list[tuple[int, float]],
                      decode: Any, chosen_rank: int | None = None) -> PositionLogprobs:
    """vLLM's per-position dict: the chosen token first (its rank `chosen_rank` when the sampler counted it, else
    known only when it is among `top`), then `top` (most likely first, ranks 1..k). `decode(token_id)` gives a
    token's text, or is None without a tokenizer."""
    ranks = {tok: i + 1 for i, (tok, _) in enumerate(top)}
    text = (lambda t: decode(t)) if decode is not None else (lambda t: None)
    rank = chosen_rank if chosen_rank is not None else ranks.get(chosen)
    entry = {chosen: Logprob(chosen_logprob, rank, text(chosen))}
    for tok, lp in top:
        if tok not in entry:
            entry[tok] = Logprob(lp, ranks[tok], text(tok))
    return entry
