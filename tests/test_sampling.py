"""Tests for SamplingParams and the Sampler, each transform against its definition computed here independently."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import kiln.sampling_params as sampling_params_module
from kiln.sampling import (
    Sampler,
    SamplingRow,
    apply_top_k_top_p_min_p,
    bad_word_bans,
    process_logits,
)
from kiln.sampling_params import SamplingParams

INF = float("inf")
# Distinct values, unsorted, positive and negative, so that every cut-off is unambiguous.
FIXED = [1.3, -0.4, 2.9, 0.2, -2.1, 2.2, 0.9, -1.0, 1.7, 0.0]


def _row(params: SamplingParams | None = None, prompt=(), output=(), seed=None, stop=(), bad=None) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), gen, frozenset(stop), bad)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _kept(masked: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(masked.tolist()) if v != -INF}


def _filter_one(logits: list[float], k: int = 0, p: float = 1.0, m: float = 0.0) -> set[int]:
    x = torch.tensor([logits])
    out = apply_top_k_top_p_min_p(x, torch.tensor([k]), torch.tensor([p]), torch.tensor([m]))
    kept = _kept(out[0])
    assert all(out[0, i].item() == x[0, i].item() for i in kept)  # kept logits are untouched
    return kept


def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


# ----------------------------------------------------------------------------------------------- SamplingParams


def test_params_defaults_and_greedy():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.n, p.logprobs) == (16, 1.0, 0, 1.0, 1, None)
    assert p.stop == [] and p.bad_word_ids == [] and not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1, temperature=0.8).greedy
    assert not SamplingParams(top_k=2).greedy
    assert not SamplingParams(temperature=0, use_beam_search=True, num_beams=4).greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(early_stopping="never").early_stopping == "never"
    # mutable defaults are not shared between instances
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"end_id": -5}, "end_id"),
        ({"bad_words": [3]}, "bad_words"),
        ({"bad_word_ids": [[]]}, "bad_word_ids"),
        ({"bad_word_ids": [[1, "a"]]}, "bad_word_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"early_stopping": "always"}, "early_stopping"),
        ({"use_beam_search": True, "num_beams": 1}, "num_beams"),
        ({"num_beams": 3, "n": 4}, "n"),  # num_beams > 1 alone means beam search
        ({"num_beams": 0}, "num_beams"),
        ({"use_beam_search": True, "num_beams": 2, "n": 3}, "n"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"return_logits": 1}, "return_logits"),
        ({"num_beams": 2, "return_logits": True}, "return_logits"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_params_module_does_not_import_torch():
    tree = ast.parse(Path(sampling_params_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported and "numpy" not in imported


# ----------------------------------------------------------------------------------------- top-k / top-p / min-p


@pytest.mark.parametrize("k", range(0, len(FIXED) + 2))
def test_top_k_keeps_exactly_the_k_largest(k):
    expected = set(sorted(range(len(FIXED)), key=lambda i: -FIXED[i])[:k]) if k > 0 else set(range(len(FIXED)))
    assert _filter_one(FIXED, k=k) == expected
    if k == 0:
        assert _filter_one(FIXED, k=-1) == expected


def _top_p_reference(logits: list[float], p: float) -> set[int]:
    probs = _softmax(logits)
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda j: -probs[j]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.35, 0.5, 0.62, 0.8, 0.9, 0.97, 0.999, 1.0])
def test_top_p_keeps_smallest_set_reaching_p(p):
    expected = _top_p_reference(FIXED, p)
    assert _filter_one(FIXED, p=p) == expected
    assert len(expected) >= 1


@pytest.mark.parametrize("m", [0.0, 0.05, 0.2, 0.5, 0.8, 1.0])
def test_min_p_keeps_tokens_above_fraction_of_max(m):
    probs = _softmax(FIXED)
    expected = {i for i, q in enumerate(probs) if q >= m * max(probs)}
    assert _filter_one(FIXED, m=m) == expected


def test_ties_top_k_exact_count_min_p_inclusive():
    tied = [2.0, 0.0, 2.0, 2.0, -1.0]
    kept = _filter_one(tied, k=2)
    assert len(kept) == 2 and kept <= {0, 2, 3}  # exactly k, chosen among the tied largest
    assert _filter_one(tied, m=1.0) == {0, 2, 3}  # prob >= min_p * max prob is inclusive


def test_top_k_then_top_p_renormalises_then_min_p():
    k, p = 6, 0.7
    top = sorted(range(len(FIXED)), key=lambda i: -FIXED[i])[:k]
    sub = [FIXED[i] for i in top]
    expected = {top[i] for i in _top_p_reference(sub, p)}
    assert _filter_one(FIXED, k=k, p=p) == expected
    # min-p after top-k: ratio to the max is unchanged by renormalisation
    probs = _softmax(FIXED)
    expected_m = {i for i in top if probs[i] >= 0.3 * max(probs)}
    assert _filter_one(FIXED, k=k, m=0.3) == expected_m


def test_filters_per_row_in_one_batch_match_single_rows():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    ks, ps, ms = [0, 3, 40, 7, 1], [1.0, 0.9, 0.3, 1.0, 0.5], [0.0, 0.0, 0.1, 0.2, 0.0]
    batched = apply_top_k_top_p_min_p(logits, torch.tensor(ks), torch.tensor(ps), torch.tensor(ms))
    for i in range(5):
        assert _kept(batched[i]) == _filter_one(logits[i].tolist(), ks[i], ps[i], ms[i])


# ------------------------------------------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    vocab = 30
    logits = torch.randn(3, vocab) * 3
    prompts = [[1, 2, 2, 5, 29], [0, 7], [4]]
    outputs = [[5, 6, 6], [], [9, 4, 4, 11]]
    penalties = [1.3, 0.7, 2.0]
    rows = [_row(SamplingParams(repetition_penalty=r), prompt=pr, output=out)
            for r, pr, out in zip(penalties, prompts, outputs)]
    got = process_logits(logits, rows)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        ref = RepetitionPenaltyLogitsProcessor(penalties[i])(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], ref, rtol=0, atol=0)
    assert not torch.equal(got, logits)  # the penalty did something


def _openai_penalised(logits: list[float], output: list[int], presence: float, frequency: float) -> list[float]:
    out = list(logits)
    for tok in set(output):
        count = output.count(tok)
        out[tok] -= count * frequency + presence
    return out


def test_presence_and_frequency_penalties_openai_formula():
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    cases = [([3, 3, 3, 7], 0.5, 0.0), ([3, 3, 3, 7, 19], 0.0, 0.4), ([1, 1, 2], -0.6, 1.1)]
    rows = [_row(SamplingParams(presence_penalty=pr, frequency_penalty=fr), prompt=[0, 4, 5], output=out)
            for out, pr, fr in cases]
    got = process_logits(logits, rows)
    for i, (out, pr, fr) in enumerate(cases):
        ref = torch.tensor(_openai_penalised(logits[i].tolist(), out, pr, fr))
        torch.testing.assert_close(got[i], ref, rtol=1e-6, atol=1e-6)
        # prompt-only tokens are not penalised by presence/frequency
        assert got[i, 4].item() == logits[i, 4].item()


def test_repetition_then_presence_frequency_and_unpenalised_rows_untouched():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    rows = [_row(params, prompt=[0], output=[1, 1]), _row(SamplingParams(), prompt=[0], output=[1])]
    got = process_logits(logits, rows)
    # token 0: prompt only -> 2 / 2; token 1: output twice -> -1 * 2 - 2 * 0.5 - 0.25
    assert got[0].tolist() == [1.0, -3.25, 0.5, 3.0]
    assert torch.equal(got[1], logits[1])
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 2))  # input not modified


# ------------------------------------------------------------------------------------- bad words, min_tokens


def test_bad_word_bans_definition():
    bad = [[5], [1, 2, 3], [4, 7], [2, 8]]
    assert sorted(bad_word_bans(bad, [9, 1, 2])) == [3, 5, 8]  # [2, 8] also: output ends with its prefix [2]
    assert sorted(bad_word_bans(bad, [1, 2, 4])) == [5, 7]
    assert bad_word_bans(bad, []) == [5]
    assert bad_word_bans([[1, 2, 3]], [2]) == []  # prefix longer than the output


def test_bad_words_banned_in_sampler():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0, 7.0, 3.0]])
    sampler = Sampler()
    greedy = SamplingParams(temperature=0, bad_word_ids=[[3], [1, 2, 4]])
    assert sampler.sample(logits, [_row(greedy, output=[6, 1])]).token_ids == [4]
    assert sampler.sample(logits, [_row(greedy, output=[1, 2])]).token_ids == [5]
    # SamplingRow.bad_word_ids (the engine's tokenized bad_words) replaces params.bad_word_ids
    assert sampler.sample(logits, [_row(greedy, output=[1, 2], bad=[[4], [5]])]).token_ids == [3]
    # sampled rows never produce a banned token
    sampled = SamplingParams(temperature=5.0, bad_word_ids=[[3], [4]])
    out = sampler.sample(logits.expand(2000, -1), [_row(sampled) for _ in range(2000)])
    assert not {3, 4} & set(out.token_ids) and len(set(out.token_ids)) == 5


def test_min_tokens_bans_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    sampler = Sampler()
    params = SamplingParams(temperature=0, min_tokens=2)
    assert sampler.sample(logits, [_row(params, output=[1], stop={2})]).token_ids == [3]
    assert sampler.sample(logits, [_row(params, output=[1], stop={2, 3})]).token_ids == [1]
    assert sampler.sample(logits, [_row(params, output=[1, 1], stop={2})]).token_ids == [2]
    got = process_logits(logits, [_row(params, output=[], stop={2, 3, 99})])  # ids outside the vocab are ignored
    assert got[0].tolist() == [0.0, 1.0, -INF, -INF]


# -------------------------------------------------------------------------------------------- greedy, logprobs


def test_greedy_equals_argmax_fast_and_mixed():
    torch.manual_seed(3)
    logits = torch.randn(8, 100)
    sampler = Sampler()
    greedy_rows = [_row(SamplingParams(temperature=0)) for _ in range(4)]
    greedy_rows += [_row(SamplingParams(top_k=1, temperature=0.7, seed=i), seed=i) for i in range(4)]
    assert sampler.sample(logits, greedy_rows).token_ids == logits.argmax(-1).tolist()
    mixed = [greedy_rows[i] if i % 2 == 0 else _row(SamplingParams(temperature=1.5)) for i in range(8)]
    got = sampler.sample(logits, mixed).token_ids
    assert got[0::2] == logits[0::2].argmax(-1).tolist()
    # greedy on penalised logits: token 2 is repeated and penalised below token 1
    pen = torch.tensor([[0.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sampler.sample(pen, [_row(params, output=[2])]).token_ids == [1]


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(4, 50) * 2
    rows = [
        _row(SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=3), output=[1, 2]),
        _row(SamplingParams(temperature=0, logprobs=0)),
        _row(SamplingParams()),
        _row(SamplingParams(top_p=0.8, logprobs=7), seed=1),
    ]
    out = Sampler().sample(logits, rows)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
    assert out.top_logprobs is not None
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []
    for i, k in [(0, 3), (3, 7)]:
        order = ref[i].argsort(descending=True)[:k].tolist()
        assert [t for t, _ in out.top_logprobs[i]] == order
        for tok, lp in out.top_logprobs[i]:
            assert lp == pytest.approx(ref[i, tok].item(), abs=1e-5)
    plain = Sampler().sample(logits[:2], [_row(), _row(SamplingParams(temperature=0))])
    assert plain.top_logprobs is None and len(plain.logprobs) == 2


# ------------------------------------------------------------------------------------------------------- seeds


def _run_steps(sampler: Sampler, logits_steps: list[torch.Tensor], make_rows) -> list[list[int]]:
    """Decode a few steps; make_rows(outputs) builds the rows of each step; returns each row's tokens."""
    outputs: list[list[int]] | None = None
    rows = None
    for step_logits in logits_steps:
        rows = make_rows(outputs, rows)
        if outputs is None:
            outputs = [[] for _ in rows]
        tokens = sampler.sample(step_logits, rows).token_ids
        for out, tok in zip(outputs, tokens):
            out.append(tok)
    return outputs


def test_same_seed_same_tokens_alone_or_in_batch():
    torch.manual_seed(5)
    vocab, steps = 200, 6
    batch_logits = [torch.randn(5, vocab) for _ in range(steps)]
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    others = [
        SamplingParams(temperature=1.3, seed=7),
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(top_k=10, repetition_penalty=1.2, presence_penalty=0.5),
    ]

    def rows_for(param_list):
        def make(outputs, previous):
            gens = [previous[i].generator for i in range(len(param_list))] if previous else [
                torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in param_list]
            outs = outputs or [[] for _ in param_list]
            return [SamplingRow(p, [1, 2, 3], list(o), g) for p, o, g in zip(param_list, outs, gens)]
        return make

    sampler = Sampler()
    alone = _run_steps(sampler, [x[2:3] for x in batch_logits], rows_for([target]))[0]
    torch.manual_seed(99)  # a different global RNG state must not matter
    batched = _run_steps(sampler, batch_logits, rows_for(others[:2] + [target] + others[2:]))[2]
    assert alone == batched
    torch.manual_seed(0)
    again = _run_steps(sampler, [x[2:3] for x in batch_logits], rows_for([target]))[0]
    assert again == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=4321)
    different = _run_steps(sampler, [x[2:3] for x in batch_logits], rows_for([other_seed]))[0]
    assert different != alone


# ------------------------------------------------------------------------------------------------ statistics


def test_temperature_sampling_follows_softmax_over_t():
    logits = [1.0, 0.2, -0.5, 2.0, 0.7, -1.5]
    temperature, draws = 0.7, 30000
    torch.manual_seed(6)
    rows = [_row(SamplingParams(temperature=temperature)) for _ in range(draws)]
    tokens = Sampler().sample(torch.tensor([logits]).expand(draws, -1), rows).token_ids
    counts = [tokens.count(i) for i in range(len(logits))]
    expected = _softmax([x / temperature for x in logits])
    # chi-square with 5 degrees of freedom: 20.5 is the 0.1% critical value
    assert _chi_square(counts, expected) < 20.5
    assert max(abs(c / draws - q) for c, q in zip(counts, expected)) < 0.012
    for wrong_t in (0.6, 0.8, 1.0):  # the test can tell a wrong temperature
        assert _chi_square(counts, _softmax([x / wrong_t for x in logits])) > 100


def test_seeded_rows_follow_filtered_distribution():
    # One generator per row exercises the per-request RNG path; top-k renormalises over the 4 largest.
    logits = [1.0, 0.2, -0.5, 2.0, 0.7, -1.5, 0.1]
    draws, k, temperature = 4000, 4, 1.3
    params = SamplingParams(temperature=temperature, top_k=k, seed=0)
    rows = [_row(params, seed=i) for i in range(draws)]
    tokens = Sampler().sample(torch.tensor([logits]).expand(draws, -1), rows).token_ids
    top = sorted(range(len(logits)), key=lambda i: -logits[i])[:k]
    assert set(tokens) == set(top)
    expected = _softmax([logits[i] / temperature for i in top])
    counts = [tokens.count(i) for i in top]
    assert _chi_square(counts, expected) < 16.3  # 3 degrees of freedom, 0.1%


def test_top_p_min_p_support_in_sampler():
    draws = 3000
    torch.manual_seed(7)
    logits = torch.tensor([FIXED]).expand(draws, -1)
    for params, allowed in [
        (SamplingParams(top_p=0.8), _top_p_reference(FIXED, 0.8)),
        (SamplingParams(min_p=0.2), {i for i, q in enumerate(_softmax(FIXED)) if q >= 0.2 * max(_softmax(FIXED))}),
    ]:
        tokens = Sampler().sample(logits, [_row(params) for _ in range(draws)]).token_ids
        assert set(tokens) == allowed


# ----------------------------------------------------------------------------------------------- edge cases


def test_tiny_temperature_bf16_and_bad_inputs():
    logits = torch.tensor([[100.0, -3.0, 90.0, 0.0]], dtype=torch.bfloat16)
    out = Sampler().sample(logits, [_row(SamplingParams(temperature=1e-9))])
    assert out.token_ids == [0] and math.isfinite(out.logprobs[0])
    with pytest.raises(ValueError, match="logit rows"):
        Sampler().sample(torch.zeros(2, 5), [_row()])
    with pytest.raises(ValueError, match="num_rows, vocab"):
        Sampler().sample(torch.zeros(5), [_row()])
    empty = Sampler().sample(torch.zeros(0, 5), [])
    assert empty.token_ids == [] and empty.logprobs == []


def test_return_logits_hands_back_each_asking_rows_raw_logits():
    logits = torch.randn(3, 11)
    rows = [_row(SamplingParams(temperature=0.0, return_logits=True)), _row(SamplingParams(temperature=0.0)),
            _row(SamplingParams(temperature=0.7, top_p=0.9, return_logits=True), seed=5)]
    out = Sampler().sample(logits, rows)
    assert out.logits is not None and out.logits[1] is None
    assert torch.equal(out.logits[0], logits[0]) and torch.equal(out.logits[2], logits[2])
    assert Sampler().sample(logits[1:2], rows[1:2]).logits is None  # nobody asked: nothing copied


def test_repeat_ngram_bans_match_transformers():
    """kiln's no_repeat_ngram_size bans what transformers' NoRepeatNGramLogitsProcessor bans, on sequences with
    repeats (prompt and output together, as in a decoder-only model)."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    from kiln.sampling import repeat_ngram_bans

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for length in (0, 1, 3, 9, 30):
            ids = torch.randint(0, 6, (length,), generator=gen).tolist()
            scores = torch.zeros(1, 6)
            ref = NoRepeatNGramLogitsProcessor(n)(torch.tensor([ids], dtype=torch.long), scores)
            assert set(repeat_ngram_bans(ids, n)) == set(torch.nonzero(ref[0] == -float("inf")).flatten().tolist())
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SamplingParams(no_repeat_ngram_size=-1)


def test_logit_bias_adds_to_the_named_tokens_only():
    """vLLM's logit_bias: each row's {token: bias} added to its logits (an id outside the vocab skipped), other
    rows untouched; with a bias, a greedy row leaves the plain-argmax fast path and takes the biased argmax."""
    logits = torch.tensor([FIXED, FIXED, FIXED])  # [3, 10]
    rows = [_row(SamplingParams(temperature=0, logit_bias={1: 5.0, 4: -1.5, 99: 3.0})), _row(SamplingParams()),
            _row(SamplingParams(temperature=0, logit_bias={7: 0.25}))]
    want = logits.clone()
    want[0, 1] += 5.0
    want[0, 4] -= 1.5
    want[2, 7] += 0.25
    assert torch.equal(process_logits(logits, rows), want)
    assert Sampler().sample(logits[:1], rows[:1]).token_ids == [1]  # -0.4 + 5 beats 2.9
