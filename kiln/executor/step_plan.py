"""What the driver tells the other ranks each step: a compact plan from which every rank rebuilds the same
SchedulerOutput, so that ModelRunner.prepare makes the same StepBatch everywhere.

Workers keep a mirror of each running sequence; a plan carries only the tokens a worker has not seen yet, the
sequence's cache state (computed tokens, block table) and the step's block copies. Plain Python: it is pickled
over the gloo control group.

A step launched ahead (async scheduling) is encoded while each sequence that sampled in the step before still holds
a placeholder token on the host. The plan sends it (the worker needs a token there) with the feed that replaces it
on every device, and the encoder counts it as unsent, so the next plan sends the real token in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.scheduler import ScheduledSeq, SchedulerOutput
from kiln.engine.sequence import Sequence, SequenceStatus


class WorkerError(ValueError):
    """A rank of a multi-rank engine failed; the message names the rank and its error. The engine is unusable
    afterwards (every rank has been stopped): fix the cause and load it again."""


@dataclass
class SeqUpdate:
    """One scheduled sequence: tokens new to the workers (all of them when `reset`), which replace the mirror's
    tokens from index `at` on (a placeholder sent with the step before is overwritten), its cache state at
    scheduling time and how many tokens this step computes."""

    seq_id: int
    new_tokens: list[int]
    reset: bool
    num_prompt_tokens: int
    num_computed_tokens: int
    num_new_tokens: int
    block_table: list[int]
    at: int = 0


@dataclass
class StepPlan:
    """One step for every rank; `released` lists sequences whose per-request state can go. `feed`: (index in the
    step's packed new tokens, row of the previous step's sampled ids) for each placeholder input token, read from
    the ids the driver broadcast after the previous step. `share_rows` > 0: after this step every rank takes part in
    the broadcast of its sampled ids (int64 ``[share_rows]``) from the driver, over the default group."""

    seqs: list[SeqUpdate] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    all_logits: bool = False
    released: list[int] = field(default_factory=list)
    micro_batches: int = 1  # pipeline engines: how many groups of sequences the step runs as (StageRunner)
    feed: list[tuple[int, int]] = field(default_factory=list)
    share_rows: int = 0


class PlanEncoder:
    """Driver side: turns a SchedulerOutput into a StepPlan, remembering what each worker already holds."""

    def __init__(self) -> None:
        self.sent: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (the sequence object, tokens sent)
        self.released: list[int] = []

    def release(self, seq_id: int) -> None:
        self.sent.pop(seq_id, None)
        self.released.append(seq_id)

    def encode(self, output: SchedulerOutput, all_logits: bool,
               placeholders: dict[int, int] | None = None) -> StepPlan:
        """The plan of one step. `placeholders`: {seq_id: index of a token that is still a placeholder} (a step
        launched ahead); from that index on, a sequence's tokens count as unsent, to be sent again next time."""
        seqs = []
        for item in output.scheduled:
            seq = item.seq
            prev = self.sent.get(seq.seq_id)
            # A different object under a known id (LLM.score reuses -1) or fewer tokens: send it whole again.
            reset = prev is None or prev[0] is not seq or prev[1] > seq.num_tokens
            known = 0 if reset else prev[1]
            seqs.append(SeqUpdate(seq.seq_id, seq.token_ids[known:], reset, seq.num_prompt_tokens, item.start,
                                  item.num_new_tokens, list(seq.block_table), known))
            confirmed = seq.num_tokens
            if placeholders is not None and seq.seq_id in placeholders:
                confirmed = min(confirmed, placeholders[seq.seq_id])
            self.sent[seq.seq_id] = (seq, confirmed)
        plan = StepPlan(seqs, list(output.block_copies), output.num_batched_tokens, all_logits, self.released)
        self.released = []
        return plan


class PlanDecoder:
    """Worker side: keeps the mirrored sequences and rebuilds the driver's SchedulerOutput from a plan."""

    def __init__(self) -> None:
        self.mirrors: dict[int, Sequence] = {}

    def decode(self, plan: StepPlan) -> SchedulerOutput:
        for seq_id in plan.released:
            self.mirrors.pop(seq_id, None)
        scheduled = []
        for upd in plan.seqs:
            seq = self.mirrors.get(upd.seq_id)
            if upd.reset or seq is None:
                seq = Sequence(upd.seq_id, upd.new_tokens[: upd.num_prompt_tokens], max_tokens=1)
                seq.token_ids = list(upd.new_tokens)
                self.mirrors[upd.seq_id] = seq
            else:
                del seq.token_ids[upd.at:]
                seq.token_ids.extend(upd.new_tokens)
            seq.num_computed_tokens = upd.num_computed_tokens
            seq.block_table = list(upd.block_table)
            seq.status = SequenceStatus.RUNNING
            scheduled.append(ScheduledSeq(seq, upd.num_new_tokens))
        return SchedulerOutput(scheduled, [], list(plan.block_copies), plan.num_batched_tokens)
