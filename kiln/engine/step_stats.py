"""Always-on accounting of LLMEngine.step() calls: how many of each kind, their sequences and prefill tokens, and their
host wall time (time.perf_counter only: no device sync is added). It answers "which steps does the time go to" for a
run, offline (LLM.generate) or served (`kiln serve`'s /metrics), for about a microsecond per decode call (a few for a
prefill: its sequences are counted one by one).

A call is classified by the model step it launched. With async scheduling a call launches step N+1 and then waits for
step N's tokens, so its time is N+1's host launch plus whatever wait for the device remains: for host-bound steps,
what that kind of step costs the host. The first call after the engine was idle launches two steps (N and N+1): it
counts once, as the heavier kind of the two (in the order below, mixed the heaviest), with the sequences and prefill
tokens of both. Kinds:

    decode_graph  every sequence computes one token, and the step replayed a CUDA graph
    decode_eager  every sequence computes one token, run eagerly (no graphs: CPU, --no_cuda_graphs, a larger batch)
    prefill       every sequence computes more than one token (prompts, chunks of prompts, recomputes)
    mixed         some sequences decode, some prefill (chunked prefill packs new prompts beside running decodes)
    drain         launched nothing, only waited for the step in flight (the last step of a burst, or a beam request's)
    idle          nothing to run and nothing in flight

A sequence that computes one token counts as decoding (also a one-token prompt): the step's shape, which is what
decides whether a CUDA graph can replay it. Prefill tokens are the tokens of the sequences that compute more than one.
`between_seconds` is the host time from the end of one call to the start of the next while the engine had work left:
the caller's own loop (detokenizing, sending outputs, taking new requests), idle waits excluded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("decode_graph", "decode_eager", "prefill", "mixed", "drain", "idle")
_WEIGHT = {kind: i for i, kind in enumerate(KINDS[:4])}  # which kind a call that launched two steps counts as


@dataclass
class KindStats:
    """Totals of the calls of one kind."""

    steps: int = 0
    seconds: float = 0.0  # host wall time inside LLMEngine.step()
    seqs: int = 0  # sequences of the model steps the calls launched
    prefill_tokens: int = 0


@dataclass
class StepStats:
    """Totals per kind since the engine started (or the last `reset()`). The engine calls `begin` and `end` around
    each step() and `launched` for every model step it starts in between."""

    kinds: dict[str, KindStats] = field(default_factory=lambda: {kind: KindStats() for kind in KINDS})
    between_seconds: float = 0.0
    # The call in progress: the kind of the step it launched (None: none yet), its sequences and prefill tokens, and
    # whether a step was in flight when it began (then a call that launches nothing is a drain, not idle).
    _kind: str | None = field(default=None, init=False, repr=False)
    _seqs: int = field(default=0, init=False, repr=False)
    _prefill: int = field(default=0, init=False, repr=False)
    _had_step: bool = field(default=False, init=False, repr=False)
    _last_end: float | None = field(default=None, init=False, repr=False)  # when the last call ended with work left

    def begin(self, step_in_flight: bool) -> float:
        """A step() call starts; returns its start time for `end`."""
        now = time.perf_counter()
        if self._last_end is not None:
            self.between_seconds += now - self._last_end
        self._kind, self._seqs, self._prefill, self._had_step = None, 0, 0, step_in_flight
        return now

    def launched(self, output: Any, graphed: bool) -> None:
        """The call started the model step of SchedulerOutput `output`; `graphed`: it replayed a CUDA graph."""
        seqs, tokens = len(output.scheduled), output.num_batched_tokens
        if tokens == seqs:  # one token each: O(1) for the decode steps, which are most steps
            kind, prefill = "decode_graph" if graphed else "decode_eager", 0
        else:  # only here (a step of milliseconds on a GPU) look at each sequence
            decodes = sum(1 for item in output.scheduled if item.num_new_tokens == 1)
            kind, prefill = "mixed" if decodes else "prefill", tokens - decodes
        if self._kind is None or _WEIGHT[kind] > _WEIGHT[self._kind]:
            self._kind = kind
        self._seqs += seqs
        self._prefill += prefill

    def end(self, start: float, work_left: bool) -> None:
        """The call that began at `start` returns; `work_left`: the engine has unfinished requests."""
        now = time.perf_counter()
        kind = self._kind or ("drain" if self._had_step else "idle")
        stats = self.kinds[kind]
        stats.steps += 1
        stats.seconds += now - start
        stats.seqs += self._seqs
        stats.prefill_tokens += self._prefill
        self._last_end = now if work_left else None

    def reset(self) -> None:
        """Zero the totals (a benchmark's warm-up out of its numbers). A gap in progress still counts when it ends."""
        for kind in KINDS:
            self.kinds[kind] = KindStats()
        self.between_seconds = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain numbers (they cross the engine process's pipe, and go to JSON): the totals over all kinds, each
        kind's, and the time between calls."""
        kinds = {kind: asdict(stats) for kind, stats in self.kinds.items()}
        return {"steps": sum(k["steps"] for k in kinds.values()),
                "seconds": sum(k["seconds"] for k in kinds.values()),
                "between_seconds": self.between_seconds, "kinds": kinds}

