"""The sampler: turns each sequence's last-position logits into its next token.

Processing order for each row (a step runs only for rows whose parameters ask for it):

1. bad words: a one-token bad sequence is always banned; the last token of a longer one is banned when the
   output ends with all the tokens before it (logit set to -inf);
2. min_tokens: while the output is shorter than ``params.min_tokens``, the row's stop tokens are banned;
   then ``params.logit_bias`` (vLLM's, OpenAI's) is added to the named tokens' logits;
3. penalties: repetition penalty (transformers: over prompt and output tokens, a positive logit divided by it, a
   negative one multiplied), then presence and frequency penalties (OpenAI: over output tokens,
   ``logit -= frequency * count + presence * (count > 0)``);
4. greedy rows (temperature 0 or top_k 1) take the argmax here;
5. temperature: logits divided by it;
6. top-k, 7. top-p, 8. min-p, all three from one descending sort;
9. sampling from the softmax by an exponential race, ``argmax(probs / E)`` with ``E ~ Exponential(1)``, which picks
   token i with probability ``probs[i]``. A row with its own generator draws its noise from it alone, always
   ``vocab`` draws per step, so the same seed gives the same tokens whatever else is in the batch.

Logprobs are those of the raw logits, before any of the above (vLLM's default), so that they describe the model.

Beam-search rows (``params.use_beam_search``) are not sampled: as transformers' beam search does, the sampler takes
the log-softmax of the raw logits, applies steps 1-3 to those log-probabilities, and returns the row's K best
(token, log-prob) pairs in ``SamplerOutput.beam_candidates`` (K from ``kiln.engine.beam_search.num_candidates``:
at least 2 * num_beams), from which the engine's beam group chooses. Temperature, top-k/p and min-p do not apply.
"""

from __future__ import annotations

import array
import itertools
from dataclasses import dataclass

import torch

from kiln.engine.beam_search import num_candidates
from kiln.sampling_params import SamplingParams

# Temperatures below this are clamped to it, as dividing by a tiny temperature would overflow float32 logits to
# inf (and inf - inf = nan in the softmax); at 1e-5 the distribution is already a near-certain argmax.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """One sequence that needs a token this step, with what the sampler needs to know about it.

    ``generator`` is the request's own RNG (made by the caller from ``params.seed``; None means torch's global RNG);
    it may live on the CPU while the logits are on a GPU. ``stop_token_ids`` are the ids that end this sequence
    (banned while the output is shorter than ``params.min_tokens``; pass an empty set when stop tokens are
    ignored). ``bad_word_ids``, when given, replaces ``params.bad_word_ids``: the engine passes there the ids of
    ``params.bad_word_ids`` together with its tokenization of ``params.bad_words``.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    stop_token_ids: frozenset[int] = frozenset()
    bad_word_ids: list[list[int]] | None = None


@dataclass
class SamplerOutput:
    """The sampler's result, one entry per row in the order of the rows.

    ``logprobs[i]`` is the raw log-softmax at the chosen token. ``top_logprobs`` is None when no row asked for
    logprobs; otherwise ``top_logprobs[i]`` lists ``(token_id, logprob)`` for the row's ``params.logprobs`` most
    likely tokens (raw logits, most likely first), and is empty for rows that did not ask or asked for 0.
    ``beam_candidates`` is None when no row is a beam-search row; otherwise ``beam_candidates[i]`` lists a beam
    row's best ``(token_id, logprob)`` continuations (processed log-probs, best first), empty for other rows; the
    ``token_ids`` entry of a beam row is its best candidate and means nothing more.
    """

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    beam_candidates: list[list[tuple[int, float]]] | None = None
    # Rows whose params ask return_logits: their raw logits (float32 [vocab], on the CPU); None for the others, and
    # None altogether when no row asks.
    logits: list[torch.Tensor | None] | None = None
    # When any row asks logprobs: each row's chosen token's 1-based rank in the raw distribution (1 + the tokens with
    # a strictly higher logit, as vLLM counts it); None when no row asks.
    ranks: list[int] | None = None


class Sampler:
    """Chooses one token per row from the model's logits; see the module docstring for the order of processing.

    Stateless: everything a request needs (its generator included) comes in its SamplingRow. Sampling runs in two
    stages: `launch` queues the device work (tokens, logprobs, top logprobs) and the copies to the host without
    waiting for them; `DeviceSample.to_host` waits and builds the SamplerOutput. `sample` does both.
    """

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample one token per row. ``logits``: ``[num_rows, vocab]``, one row per entry of ``rows``."""
        return self.launch(logits, rows).to_host()

    def launch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> DeviceSample:
        """The device stage: choose the tokens and start their copy to the host; nothing here waits for the device
        (host-to-device copies go through pinned memory, non_blocking)."""
        _check_inputs(logits, rows)
        logits = logits.float()  # [rows, vocab]; a no-op for the float32 logits the runner produces
        if not rows:
            return DeviceSample(rows, torch.empty(0, dtype=torch.int64, device=logits.device), logits)
        if all(_is_plain_greedy(row) for row in rows):
            tokens = logits.argmax(dim=-1)  # the every-step fast path: nothing to process
        else:
            tokens = _sample_processed(logits, rows)
        sample = DeviceSample(rows, tokens, logits)
        sample.start_copies()
        return sample


@dataclass
class DeviceSample:
    """A launched sampling step: ``token_ids`` ``[rows]`` int64 stays on the logits' device (the next step can read
    it there before the host has it); `to_host` waits for the copies `start_copies` queued and returns the
    SamplerOutput. Copies are queued at launch so that reading this step's results never waits for work queued
    after it on the same stream (the next step)."""

    rows: list[SamplingRow]
    token_ids: torch.Tensor  # [rows] int64, on the logits' device
    logits: torch.Tensor  # [rows, vocab] float32, raw
    _ids_logprobs: torch.Tensor | None = None  # [2 or 3, rows] float64 on the host: ids, raw logprobs (, ranks)
    _top: tuple[torch.Tensor, torch.Tensor] | None = None  # host [rows, max wanted] values, indices
    _wanted_logits: torch.Tensor | None = None  # host [rows asking return_logits, vocab]
    _copied: object | None = None  # torch.cuda.Event recorded after the copies (CUDA only)
    _output: SamplerOutput | None = None

    def start_copies(self) -> None:
        logits, tokens, rows = self.logits, self.token_ids, self.rows
        chosen_logit = logits.gather(1, tokens.unsqueeze(1))  # [rows, 1]
        chosen = chosen_logit.squeeze(1) - torch.logsumexp(logits, dim=-1)  # [rows]
        # Token ids < 2**53 are exact in float64, so ids, logprobs (and ranks) travel to the host together.
        parts = [tokens.double(), chosen.double()]
        if any(row.params.logprobs is not None for row in rows):
            parts.append((logits > chosen_logit).sum(dim=-1).double() + 1)  # [rows]: one compare over the vocab
        self._ids_logprobs = _copy_to_host(torch.stack(parts))
        most = max(_top_wanted(row, logits.shape[1]) for row in rows)
        if most > 0:
            values, indices = torch.log_softmax(logits, dim=-1).topk(most, dim=-1)  # [rows, most]
            self._top = (_copy_to_host(values), _copy_to_host(indices))
        wanted = [i for i, row in enumerate(rows) if row.params.return_logits]
        if wanted:
            self._wanted_logits = _copy_to_host(logits[wanted])  # [wanted rows, vocab]: one copy
        if logits.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def to_host(self) -> SamplerOutput:
        """Wait for this step's tokens (the step's one device-to-host synchronization) and build its output."""
        if self._output is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._output = self._build()
        return self._output

    def _build(self) -> SamplerOutput:
        rows = self.rows
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=None)
        ids_host, logprobs, *ranks = self._ids_logprobs.tolist()
        out = SamplerOutput(token_ids=[int(t) for t in ids_host], logprobs=logprobs, top_logprobs=None,
                            ranks=[int(r) for r in ranks[0]] if ranks else None)
        if any(row.params.logprobs is not None for row in rows):
            out.top_logprobs = [[] for _ in rows]
            if self._top is not None:
                values_host, indices_host = self._top[0].tolist(), self._top[1].tolist()
                for i, row in enumerate(rows):
                    k = _top_wanted(row, self.logits.shape[1])
                    out.top_logprobs[i] = list(zip(indices_host[i][:k], values_host[i][:k]))
        if self._wanted_logits is not None:
            out.logits = [None] * len(rows)
            wanted = [i for i, row in enumerate(rows) if row.params.return_logits]
            for j, i in enumerate(wanted):
                out.logits[i] = self._wanted_logits[j]
        beam = [i for i, row in enumerate(rows) if row.params.use_beam_search]
        if beam:  # beams never run ahead (their group chooses before the next step): computed here, in sync
            out.beam_candidates = [[] for _ in rows]
            for i, cands in zip(beam, beam_candidates(self.logits[beam], [rows[i] for i in beam])):
                out.beam_candidates[i] = cands
        return out


def _top_wanted(row: SamplingRow, vocab: int) -> int:
    return min(row.params.logprobs or 0, vocab)


def _copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Queue a copy of a device tensor into fresh pinned host memory (read it after the step's event); CPU tensors
    are returned as they are."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without synchronizing the stream: on CUDA through pinned memory and a non_blocking
    copy (the caching host allocator keeps the pinned block until the copy has run). A plain ``.to(cuda)`` or
    ``torch.tensor(..., device=cuda)`` waits for the stream, which would undo the overlap of host and device."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def beam_candidates(logits: torch.Tensor, rows: list[SamplingRow]) -> list[list[tuple[int, float]]]:
    """Each beam row's best continuations: the top K of its processed log-probabilities, as transformers' beam
    search scores them (log-softmax of the raw logits, then bans and penalties). ``logits``: ``[rows, vocab]``."""
    log_probs = process_logits(torch.log_softmax(logits.float(), dim=-1), rows)  # [rows, vocab]
    wanted = [min(num_candidates(row.params.num_beams, len(row.stop_token_ids)), log_probs.shape[1]) for row in rows]
    values, indices = log_probs.topk(max(wanted), dim=-1)  # [rows, max K], best first
    values_host, indices_host = values.tolist(), indices.tolist()
    return [list(zip(indices_host[i][:k], values_host[i][:k])) for i, k in enumerate(wanted)]


def process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Apply bad-word and min_tokens bans and the penalties (steps 1-3) to ``[rows, vocab]`` logits.

    Returns float32 logits of the same shape; the input is never modified (it is returned as-is, converted to
    float32, when no row needs any of these steps). Beam search can take its log-softmax from here.
    """
    _check_inputs(logits, rows)
    logits = logits.float()
    vocab = logits.shape[1]
    ban_rows, ban_tokens = _ban_pairs(rows, vocab)
    penalised = [i for i, row in enumerate(rows) if row.params.has_penalty]
    biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if not ban_rows and not penalised and not biased:
        return logits
    out = logits.clone()
    if ban_rows:
        ban = to_device(torch.tensor([ban_rows, ban_tokens], dtype=torch.int64), out.device)  # [2, bans]: one copy
        out[ban[0], ban[1]] = -float("inf")
    if biased:
        _add_logit_bias(out, rows, biased)
    if penalised:
        _apply_penalties(out, [rows[i] for i in penalised], penalised)
    return out


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf the tokens that top-k, then top-p, then min-p remove, with one sort.

    ``logits``: ``[rows, vocab]``; ``top_k``: ``[rows]`` int (<= 0 or >= vocab: off); ``top_p``: ``[rows]`` in (0, 1]
    (1: off); ``min_p``: ``[rows]`` in [0, 1] (0: off). Top-k keeps exactly the k largest; top-p keeps the smallest
    set of most likely tokens whose probability (after top-k) reaches p; min-p keeps tokens whose probability is at
    least min_p times the most likely one's. The most likely token is always kept. Returns a new tensor.
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, vocab]
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    drop = ranks >= k.unsqueeze(1)  # [rows, vocab] in sorted order
    probs = sorted_logits.masked_fill(drop, -float("inf")).softmax(dim=-1)
    # A token stays while the mass ranked above it is short of p, which keeps the smallest set reaching p. Rows with
    # p == 1 are left alone: float32 cumsum rounding could otherwise cut a far tail that p == 1 must keep.
    mass_above = probs.cumsum(dim=-1) - probs
    p = top_p.unsqueeze(1)
    drop |= (mass_above >= p) & (p < 1)
    # Renormalising after top-k/top-p scales every probability alike, so the min-p ratio is the same either way.
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    mask = torch.empty_like(drop).scatter_(1, order, drop)  # back to vocabulary order
    return logits.masked_fill(mask, -float("inf"))


def bad_word_bans(bad_word_ids: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """The tokens that ``bad_word_ids`` forbid as the next token after ``output_token_ids``."""
    banned = []
    for seq in bad_word_ids:
        prefix_len = len(seq) - 1
        if prefix_len == 0:
            banned.append(seq[0])
        elif len(output_token_ids) >= prefix_len and list(output_token_ids[-prefix_len:]) == list(seq[:-1]):
            banned.append(seq[-1])
    return banned


def repeat_ngram_bans(token_ids: list[int], n: int) -> list[int]:
    """The tokens that would repeat an n-gram of ``token_ids`` as the next token (transformers'
    NoRepeatNGramLogitsProcessor: every earlier n-gram whose first n - 1 tokens are the last n - 1)."""
    if n <= 0 or len(token_ids) < n:
        return []
    tail = token_ids[len(token_ids) - n + 1:]
    return [token_ids[i + n - 1] for i in range(len(token_ids) - n + 1) if token_ids[i:i + n - 1] == tail]


def _check_inputs(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"sampler logits must be a [num_rows, vocab] tensor, got {shape}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"sampler got {logits.shape[0]} logit rows but {len(rows)} SamplingRows; pass one per row")


def _min_tokens_active(row: SamplingRow) -> bool:
    return bool(row.stop_token_ids) and len(row.output_token_ids) < row.params.min_tokens


def _bad_words_of(row: SamplingRow) -> list[list[int]]:
    return row.bad_word_ids if row.bad_word_ids is not None else row.params.bad_word_ids


def _is_plain_greedy(row: SamplingRow) -> bool:
    """Greedy with nothing to apply before the argmax."""
    params = row.params
    return (params.greedy and not params.has_penalty and not _bad_words_of(row) and not params.logit_bias
            and not _min_tokens_active(row) and not params.no_repeat_ngram_size)


def _ban_pairs(rows: list[SamplingRow], vocab: int) -> tuple[list[int], list[int]]:
    """(row index, token id) pairs to set to -inf for bad words and min_tokens; ids outside the vocab are skipped."""
    ban_rows: list[int] = []
    ban_tokens: list[int] = []
    for i, row in enumerate(rows):
        banned: list[int] = []
        bad = _bad_words_of(row)
        if bad:
            banned.extend(bad_word_bans(bad, row.output_token_ids))
        if _min_tokens_active(row):
            banned.extend(row.stop_token_ids)
        if row.params.no_repeat_ngram_size:
            banned.extend(repeat_ngram_bans(list(row.prompt_token_ids) + list(row.output_token_ids),
                                            row.params.no_repeat_ngram_size))
        for tok in banned:
            if 0 <= tok < vocab:
                ban_rows.append(i)
                ban_tokens.append(tok)
    return ban_rows, ban_tokens


def _add_logit_bias(out: torch.Tensor, rows: list[SamplingRow], biased: list[int]) -> None:
    """Add each biased row's {token_id: bias} to ``out`` ``[rows, vocab]`` in place (ids outside the vocab skipped:
    the LLM refuses them before they get here)."""
    vocab = out.shape[1]
    pairs = [(i, tok, bias) for i in biased for tok, bias in rows[i].params.logit_bias.items() if 0 <= tok < vocab]
    if not pairs:
        return
    index = to_device(torch.tensor([[i for i, _, _ in pairs], [t for _, t, _ in pairs]], dtype=torch.int64),
                      out.device)  # [2, pairs]
    out.index_put_((index[0], index[1]), to_device(torch.tensor([b for _, _, b in pairs]), out.device),
                   accumulate=True)


def _flat_ids(id_lists: list[list[int]], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row index, token id) tensors for every token of every list, ids clamped to ``vocab`` (a spare column that
    callers drop after scattering, as ids the lm head cannot produce need no penalty); None when all are empty.

    Sequences can be thousands of tokens long and this runs every step, so the ids go through one flat int64
    buffer, several times faster than torch.tensor on nested lists."""
    lengths = [len(ids) for ids in id_lists]
    if sum(lengths) == 0:
        return None
    buffer = array.array("q", itertools.chain.from_iterable(id_lists))
    tokens = to_device(torch.frombuffer(buffer, dtype=torch.int64).clamp(0, vocab), device)  # clamp copies
    row_index = to_device(torch.repeat_interleave(torch.arange(len(id_lists)), torch.tensor(lengths)), device)
    return row_index, tokens


def _apply_penalties(out: torch.Tensor, rows: list[SamplingRow], index: list[int]) -> None:
    """Apply repetition, presence and frequency penalties in place to ``out[index]`` (``rows`` are those rows)."""
    vocab, device = out.shape[1], out.device
    all_rows = len(index) == out.shape[0]
    sub = out if all_rows else out[index]  # [penalised rows, vocab]
    counts = torch.zeros(len(rows), vocab + 1, device=device)  # output-token counts, plus the spare column
    output_ids = _flat_ids([row.output_token_ids for row in rows], vocab, device)
    if output_ids is not None:
        counts.index_put_(output_ids, torch.ones(output_ids[1].shape, device=device), accumulate=True)
    counts = counts[:, :vocab]
    rep_values = [row.params.repetition_penalty for row in rows]
    if any(r != 1.0 for r in rep_values):
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        # Only rows with a repetition penalty need their prompt, which can be long: skip the others' lists.
        prompt_ids = _flat_ids([row.prompt_token_ids if rep != 1.0 else [] for row, rep in zip(rows, rep_values)],
                               vocab, device)
        if prompt_ids is not None:
            seen[prompt_ids] = True
        seen = seen[:, :vocab] | (counts > 0)
        rep = to_device(torch.tensor(rep_values), device).unsqueeze(1)  # [penalised rows, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = [row.params.frequency_penalty for row in rows]
    pres = [row.params.presence_penalty for row in rows]
    if any(freq) or any(pres):
        freq_t = to_device(torch.tensor(freq), device).unsqueeze(1)
        pres_t = to_device(torch.tensor(pres), device).unsqueeze(1)
        sub = sub - freq_t * counts - pres_t * (counts > 0).float()
    if all_rows:
        out.copy_(sub)
    else:
        out[to_device(torch.tensor(index), device)] = sub


def _sample_processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Steps 1-9 for a batch with at least one row that is not plain greedy. Returns ``[rows]`` token ids."""
    processed = process_logits(logits, rows)  # [rows, vocab]
    tokens = processed.argmax(dim=-1)  # greedy rows keep this
    # Beam rows keep the argmax too (their beam group chooses from beam_candidates): they draw no random numbers.
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy and not row.params.use_beam_search]
    if not sampled:
        return tokens
    if len(sampled) == len(rows):
        return _sample_rows(processed, rows)
    index = to_device(torch.tensor(sampled), logits.device)
    tokens[index] = _sample_rows(processed[index], [rows[i] for i in sampled])
    return tokens


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k/top-p/min-p and the draw for non-greedy rows. ``logits``: ``[rows, vocab]``."""
    temps = [max(row.params.temperature, _MIN_TEMPERATURE) for row in rows]
    top_k = [row.params.top_k for row in rows]
    top_p = [row.params.top_p for row in rows]
    min_p = [row.params.min_p for row in rows]
    scale = any(t != 1.0 for t in temps)
    truncate = any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p) or any(m > 0.0 for m in min_p)
    if scale or truncate:
        # Every row's parameters reach the device in one float64 copy (ids and float32 values are exact in it).
        params = to_device(torch.tensor([temps, top_k, top_p, min_p], dtype=torch.float64), logits.device)  # [4, rows]
        if scale:
            logits = logits / params[0].float().unsqueeze(1)
        if truncate:
            logits = apply_top_k_top_p_min_p(logits, params[1].long(), params[2].float(), params[3].float())
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    return _exponential_race(probs, [row.generator for row in rows])


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row from ``probs`` ``[rows, vocab]``: argmax of probs / Exponential(1) noise."""
    noise = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()  # global RNG; the seeded rows' share is overwritten below
    elsewhere = []
    for i in seeded:
        gen = generators[i]
        if gen.device == probs.device:
            noise[i].exponential_(generator=gen)
        else:
            elsewhere.append(i)
    if elsewhere:
        # CPU generators with GPU logits: each row draws where its generator lives (the same draws as on a CPU
        # run), and all those rows travel in one copy.
        drawn = torch.empty(len(elsewhere), probs.shape[1], dtype=probs.dtype)
        for j, i in enumerate(elsewhere):
            drawn[j].exponential_(generator=generators[i])
        noise[to_device(torch.tensor(elsewhere), probs.device)] = to_device(drawn, probs.device)
    # Exponential draws can be exactly 0; a banned token (probability 0) must not win by 0 / 0 = nan.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
