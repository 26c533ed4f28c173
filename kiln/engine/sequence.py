"""Per-request state: the tokens of one sequence, how much of it is in the KV cache, and where.

Plain Python (no torch): the scheduler and block manager work on these objects, the model runner reads them.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life: queued, in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a sequence finished, with the strings the OpenAI API uses for `finish_reason`."""

    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens, or the engine's max sequence length
    ABORT = "abort"  # cancelled by the caller


def _token_list(tokens: Iterable[Any], what: str) -> list[int]:
    """Token ids as plain Python ints (numpy ints welcome), each checked to be a non-negative integer."""
    out: list[int] = []
    for i, t in enumerate(tokens):
        try:
            v = operator.index(t)
        except TypeError:
            raise TypeError(f"{what}[{i}] is {t!r} of type {type(t).__name__}; token ids must be integers") from None
        if v < 0:
            raise ValueError(f"{what}[{i}] is {v}; token ids must be >= 0")
        out.append(v)
    return out


@dataclass(eq=False)  # identity equality: two requests with the same tokens are still two requests
class Sequence:
    """One request's tokens (prompt + output) and its KV-cache state.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache; the next step computes tokens from
    there. `block_table[i]` is the cache block holding positions i*block_size ... (i+1)*block_size - 1.
    """

    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False  # ignore stop_token_ids (benchmarks that need a fixed output length)
    min_tokens: int = 0  # stop tokens are not honoured before this many outputs
    params: Any = None  # opaque to the scheduler: the engine's SamplingParams
    # State, maintained by the scheduler and the block manager.
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = field(default=0, init=False)
    num_cached_tokens: int = field(default=0, init=False)  # prefix-cache hits at the last allocation
    block_table: list[int] = field(default_factory=list, init=False)
    status: SequenceStatus = field(default=SequenceStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    arrival: int = field(default=-1, init=False)  # assigned by the scheduler; orders FIFO and preemption
    # Chained hashes of the full blocks of token_ids, filled lazily by the block manager (tokens only ever grow,
    # so a computed hash stays valid; kept here so that a preempted sequence does not hash its prompt again).
    block_hashes: list[bytes] = field(default_factory=list, init=False, repr=False)
    # Beam search: the id of the request (its first sequence) whose beam group chooses this sequence's tokens; None
    # for ordinary requests. A beam's step reports candidates instead of appending a token, and the beam is
    # `paused` (neither scheduled nor admitted) until its group has heard from every beam and resumes it.
    group_id: int | None = field(default=None, init=False)
    paused: bool = field(default=False, init=False)
    # Async scheduling: the sequence's last token comes from a step still in flight and ends it (length), so it is
    # not scheduled until the engine settles that token (Scheduler.postprocess_ahead / settle).
    awaiting_token: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = _token_list(self.prompt_token_ids, "prompt_token_ids")
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.seq_id}: the prompt is empty; give at least one token")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"request {self.seq_id}: max_tokens is {self.max_tokens!r}; it must be an integer >= 1")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"request {self.seq_id}: min_tokens is {self.min_tokens!r}; it must be an integer >= 0")
        self.stop_token_ids = frozenset(_token_list(self.stop_token_ids, "stop_token_ids"))
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int) -> None:
        """Add one sampled token to the output (its K/V is computed by the next step)."""
        self.token_ids.append(operator.index(token_id))

    def fork(self, seq_id: int) -> Sequence:
        """A new sequence with this one's request settings and tokens so far, to be given this one's blocks by
        `BlockManager.fork` (beam search, n > 1 samples)."""
        child = Sequence(
            seq_id=seq_id,
            prompt_token_ids=list(self.prompt_token_ids),
            max_tokens=self.max_tokens,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            params=self.params,
        )
        child.token_ids = list(self.token_ids)
        child.block_hashes = list(self.block_hashes)
        child.group_id = self.group_id
        return child
