"""Beam search as transformers 5.x defines it (`GenerationMixin._beam_search` and its helpers), one request at a time.

Plain Python (no torch). `BeamSearch` is the rule: given each running beam's best next tokens with their
log-probabilities, it chooses the next running beams and collects finished hypotheses. `BeamGroup` applies those
choices to a request's sequences through the scheduler: a beam chosen once continues in its own sequence, a beam
chosen k times is forked k - 1 times (the forks share its KV blocks, copied on write), an unchosen one is freed.

One step of the rule, with B = num_beams, t = tokens generated so far and K = max(2, 1 + number of end ids) * B:

1. every running beam's candidates are scored `beam score + log p(token)` (log p: log-softmax of the logits, then
   the request's processors: bans, penalties) and the K best over all beams are kept, best first;
2. a candidate "hits" when its token is an end id, or when it is token number `max_tokens` (the length limit);
3. the next running beams are the B best candidates that do not hit (hits after them, only if too few do not);
4. a hit among the B best of the K is a finished hypothesis scored `sum of log p / (t + 1) ** length_penalty`
   (generated length, end token included); the best B hypotheses are kept, unless `early_stopping is True` and
   B are already kept, or no running beam can improve on them any more (5);
5. after the step, the search can still improve while fewer than B hypotheses are kept or the best running beam
   scored at length t (at `max_tokens` when `early_stopping == "never"` and the penalty is positive) beats the
   worst kept one; once it cannot, it never can again;
6. the search ends when it cannot improve, when `early_stopping is True` and B hypotheses are kept, or when every
   candidate of the step hit (the length limit). The result is the kept hypotheses, best first.

Where transformers differs by construction: at the first step it holds B copies of the prompt, all but one scored
-1e9 so that only one contributes candidates; kiln holds one sequence, which is the same when the vocabulary has
at least K tokens (always, for real models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kiln.engine.sequence import FinishReason, Sequence

# transformers marks candidates that may not continue with this penalty rather than removing them.
_PENALTY = 1.0e9


def num_candidates(num_beams: int, num_end_ids: int) -> int:
    """K: how many continuations each step keeps over all beams (and so the most any one beam can contribute);
    enough that B of them do not end even if every beam's best tokens are end ids."""
    return max(2, 1 + num_end_ids) * num_beams


@dataclass
class Beam:
    """A running beam: the sequence that holds it (`key`, a seq id), its generated tokens, their log-probabilities
    and its score (their sum)."""

    key: int
    token_ids: list[int]
    logprobs: list[float]
    score: float


@dataclass
class Hypothesis:
    """A finished beam: generated tokens (the end token included when it ended on one), per-token log-probs, the
    length-penalised `score` that ranks it, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    score: float
    cumulative_logprob: float
    finish_reason: FinishReason


@dataclass
class Continuation:
    """One next running beam: which current beam it extends (`parent`, a key) with which token."""

    parent: int
    token_id: int


@dataclass
class _Candidate:
    score: float
    beam: int  # index into the running beams
    token_id: int
    logprob: float
    hit: bool = False


class BeamSearch:
    """The beam-search rule of one request (see the module docstring), over beams named by integer keys."""

    def __init__(self, root_key: int, num_beams: int, max_tokens: int, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, end_ids: frozenset[int] = frozenset()) -> None:
        if num_beams < 1 or max_tokens < 1:
            raise ValueError(f"num_beams ({num_beams}) and max_tokens ({max_tokens}) must be >= 1")
        if not (isinstance(early_stopping, bool) or early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        self.num_beams, self.max_tokens = num_beams, max_tokens
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.end_ids = frozenset(end_ids)
        self.num_candidates = num_candidates(num_beams, len(self.end_ids))
        self.running: list[Beam] = [Beam(root_key, [], [], 0.0)]
        self.finished: list[Hypothesis] = []  # best first, at most num_beams
        self.can_improve = True
        self.done = False

    @property
    def num_generated(self) -> int:
        return len(self.running[0].token_ids) if self.running else 0

    def step(self, candidates: Mapping[int, list[tuple[int, float]]]) -> list[Continuation]:
        """Advance by one token. `candidates[key]` lists each running beam's best (token_id, logprob) pairs (its
        top K are enough). Returns the next running beams' origins, in order (best first), and updates `running`
        (whose new beams carry their parent's key until the caller re-keys them); empty once `done`."""
        if self.done:
            raise RuntimeError("beam search step after the search ended")
        missing = [b.key for b in self.running if b.key not in candidates]
        if missing:
            raise ValueError(f"beam search step: no candidates for beams {missing}")
        t = self.num_generated
        top = self._top_candidates(candidates, t)
        following = ([c for c in top if not c.hit] + [c for c in top if c.hit])[: self.num_beams]
        self._collect_finished(top[: self.num_beams], t)
        best = following[0].score - (_PENALTY if following[0].hit else 0.0) if following else -float("inf")
        self._update_can_improve(best, t + 1)
        full = len(self.finished) == self.num_beams
        self.done = (not self.can_improve or (self.early_stopping is True and full)
                     or all(c.hit for c in top))
        if self.done:
            self.running = []
            return []
        parents = self.running
        self.running = [Beam(parents[c.beam].key, parents[c.beam].token_ids + [c.token_id],
                             parents[c.beam].logprobs + [c.logprob], c.score - (_PENALTY if c.hit else 0.0))
                        for c in following]
        return [Continuation(parents[c.beam].key, c.token_id) for c in following]

    def results(self, n: int) -> list[Hypothesis]:
        """The n best finished hypotheses, best first."""
        return self.finished[:n]

    def _top_candidates(self, candidates: Mapping[int, list[tuple[int, float]]], t: int) -> list[_Candidate]:
        pool = [_Candidate(beam.score + float(lp), i, int(tok), float(lp))
                for i, beam in enumerate(self.running) for tok, lp in candidates[beam.key]]
        # Best first; ties (rare with real log-probs) go to the earlier beam, then the smaller token id.
        pool.sort(key=lambda c: (-c.score, c.beam, c.token_id))
        top = pool[: self.num_candidates]
        at_limit = t + 1 >= self.max_tokens
        for c in top:
            c.hit = at_limit or c.token_id in self.end_ids
        return top

    def _collect_finished(self, best: list[_Candidate], t: int) -> None:
        """Add the hits among the B best candidates to the kept hypotheses, if they may still change."""
        if not self.can_improve or (self.early_stopping is True and len(self.finished) == self.num_beams):
            return
        new = []
        for c in best:
            if not c.hit:
                continue
            parent = self.running[c.beam]
            ended_on_end_id = c.token_id in self.end_ids
            new.append(Hypothesis(parent.token_ids + [c.token_id], parent.logprobs + [c.logprob],
                                  c.score / ((t + 1) ** self.length_penalty), c.score,
                                  FinishReason.STOP if ended_on_end_id else FinishReason.LENGTH))
        if new:
            # Stable sort: on equal scores the hypotheses kept earlier stay ahead, as in transformers' merge.
            self.finished = sorted(self.finished + new, key=lambda h: -h.score)[: self.num_beams]

    def _update_can_improve(self, best_running: float, length: int) -> None:
        if not self.can_improve or len(self.finished) < self.num_beams:
            return
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_tokens  # a positive penalty favours length: the best case is the longest
        best_possible = best_running / (length ** self.length_penalty)
        if not best_possible > min(h.score for h in self.finished):
            self.can_improve = False


def beam_search_for(seq: Sequence) -> BeamSearch:
    """The search for a beam request whose params (SamplingParams) ask for beam search; `seq` is its first
    sequence, holding the prompt."""
    p = seq.params
    end_ids = frozenset() if seq.ignore_eos else seq.stop_token_ids
    return BeamSearch(seq.seq_id, p.num_beams, seq.max_tokens, p.length_penalty, p.early_stopping, end_ids)


@dataclass
class BeamGroup:
    """One beam-search request: its live sequences (one per running beam), the search over them, and the
    candidates reported so far in the current step. `request_id` is the first sequence's id."""

    root: Sequence
    search: BeamSearch
    seqs: dict[int, Sequence] = field(default_factory=dict)
    candidates: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Sequence) -> BeamGroup:
        root.group_id = root.seq_id
        return cls(root, beam_search_for(root), {root.seq_id: root})

    @property
    def request_id(self) -> int:
        return self.root.seq_id

    def report(self, seq_id: int, candidates: list[tuple[int, float]]) -> None:
        """Record a beam's candidates for the current step (a recomputed beam may report again: the same)."""
        self.candidates[seq_id] = candidates

    @property
    def ready(self) -> bool:
        """Every running beam has reported, so the next step of the search can be taken."""
        return bool(self.search.running) and all(b.key in self.candidates for b in self.search.running)

    def advance(self, scheduler: Any, new_id: Callable[[], int]) -> list[int]:
        """Take one step of the search and apply it to the sequences through the scheduler (fork, resume, free).
        Returns the ids of the sequences freed (all of them once the search is done)."""
        chosen = self.search.step(self.candidates)
        self.candidates = {}
        old = self.seqs
        self.seqs, resumes = {}, []
        # Forks first: a child copies its parent's tokens before the parent takes its own next token.
        for beam, cont in zip(self.search.running, chosen):
            parent = old[cont.parent]
            if cont.parent in self.seqs:
                child = parent.fork(new_id())
                scheduler.fork(parent.seq_id, child)
                beam.key = child.seq_id
                seq = child
            else:
                seq = parent
            self.seqs[seq.seq_id] = seq
            resumes.append((seq.seq_id, cont.token_id))
        for seq_id, token_id in resumes:
            scheduler.resume(seq_id, token_id)
        freed = [seq_id for seq_id in old if seq_id not in self.seqs]
        for seq_id in freed:
            scheduler.finish(seq_id, FinishReason.ABORT)  # a dropped beam: nobody sees its finish reason
        return freed

    def abort(self, scheduler: Any) -> list[int]:
        """Free every live sequence of the group; returns their ids."""
        ids = list(self.seqs)
        for seq_id in ids:
            scheduler.abort(seq_id)
        self.seqs = {}
        self.search.running = []
        self.search.done = True
        return ids
