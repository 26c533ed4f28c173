"""Beam search: kiln's beams and scores against transformers' generate(num_beams=...) on tiny DBRX and MPT (fp32),
the beam rule alone against transformers on fixed log-prob tables and against exhaustive enumeration, continuous
batching with other requests, preemption by a tiny KV cache, block accounting, limits, streaming and the CLI.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import kiln
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.engine.beam_search import BeamSearch
from kiln.engine.block_manager import BlockManager
from kiln.engine.llm_engine import BeamEvent, LLMEngine
from kiln.engine.scheduler import Scheduler
from kiln.sampling import Sampler, SamplerOutput, SamplingRow
from kiln.sampling_params import SamplingParams
from kiln.engine.sequence import Sequence
from kiln.llm import RequestError

BLOCK = 4
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
NEW = 10


# ---- the beam rule alone, on fixed log-prob tables ------------------------------------------------------------------

def table_logits(prefix: list[int], vocab: int, seed: int) -> list[float]:
    """A fixed 'model': the next-token logits are a pseudo-random function of the whole prefix."""
    rng = random.Random(hash((seed, tuple(prefix))))
    return [rng.gauss(0.0, 2.0) for _ in range(vocab)]


def table_logprobs(prefix: list[int], vocab: int, seed: int) -> list[float]:
    logits = table_logits(prefix, vocab, seed)
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


class TableConfig(PretrainedConfig):
    model_type = "kiln_table"

    def __init__(self, vocab_size: int = 6, seed: int = 0, **kw) -> None:
        self.vocab_size, self.seed = vocab_size, seed
        super().__init__(**kw)


class TableLM(PreTrainedModel, GenerationMixin):
    """The table as a transformers model (no cache), so that transformers' own beam search can run on it."""

    config_class = TableConfig

    def __init__(self, config: TableConfig) -> None:
        super().__init__(config)
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **kw) -> CausalLMOutput:
        v, seed = self.config.vocab_size, self.config.seed
        rows = [[table_logits(ids[: j + 1], v, seed) for j in range(len(ids))] for ids in input_ids.tolist()]
        return CausalLMOutput(logits=torch.tensor(rows, dtype=torch.float32))

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kw) -> dict:
        return {"input_ids": input_ids}


def run_rule(search: BeamSearch, prompt: list[int], vocab: int, seed: int) -> None:
    """Drive the rule as the engine does: each running beam reports its top K (token, logprob) pairs; beams
    chosen more than once get fresh keys (the engine forks a sequence for them)."""
    next_key = 1000
    while not search.done:
        cands = {}
        for beam in search.running:
            lps = table_logprobs(prompt + beam.token_ids, vocab, seed)
            order = sorted(range(vocab), key=lambda t: -lps[t])[: search.num_candidates]
            cands[beam.key] = [(t, lps[t]) for t in order]
        search.step(cands)
        seen = set()
        for beam in search.running:
            if beam.key in seen:
                beam.key, next_key = next_key, next_key + 1
            seen.add(beam.key)


RULE_CASES = [  # num_beams, n, max_tokens, length_penalty, early_stopping, end ids, seed
    (3, 3, 5, 1.0, False, [0], 1), (3, 2, 6, 0.5, True, [0], 2), (2, 2, 6, 2.0, "never", [0], 3),
    (3, 1, 4, -1.0, False, [0], 4), (2, 2, 7, 1.0, True, [0, 1], 5), (3, 3, 6, 0.0, "never", [5], 6),
    (2, 1, 1, 1.0, False, [0], 7), (3, 3, 5, 1.5, "never", [], 8),
]


@pytest.mark.parametrize("beams,n,max_tokens,lp,es,eos,seed", RULE_CASES)
def test_rule_matches_transformers_on_tables(beams, n, max_tokens, lp, es, eos, seed):
    vocab, prompt = 6, [1, 2]
    model = TableLM(TableConfig(vocab_size=vocab, seed=seed)).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, num_beams=beams,
                             num_return_sequences=n, do_sample=False, eos_token_id=eos or None,
                             pad_token_id=eos[0] if eos else 0, use_cache=False, output_scores=True,
                             return_dict_in_generate=True, length_penalty=lp, early_stopping=es)
    search = BeamSearch(-1, beams, max_tokens, lp, es, frozenset(eos))
    run_rule(search, prompt, vocab, seed)
    got = search.results(n)
    assert len(got) == n
    pad = eos[0] if eos else 0
    for i, hyp in enumerate(got):
        row = ref.sequences[i, len(prompt):].tolist()
        assert hyp.token_ids + [pad] * (len(row) - len(hyp.token_ids)) == row
        assert hyp.score == pytest.approx(float(ref.sequences_scores[i]), abs=1e-5)
        assert hyp.cumulative_logprob == pytest.approx(sum(hyp.logprobs))
        gen_len = len(hyp.token_ids)
        assert hyp.score == pytest.approx(hyp.cumulative_logprob / gen_len ** lp)
        assert hyp.finish_reason.value == ("stop" if hyp.token_ids[-1] in eos else "length")


def all_completions(prompt: list[int], vocab: int, seed: int, eos: int, max_tokens: int):
    """Every sequence the model can generate: up to its first end token, or max_tokens long."""
    out, frontier = [], [([], 0.0, [])]
    while frontier:
        tokens, total, lps = frontier.pop()
        table = table_logprobs(prompt + tokens, vocab, seed)
        for t in range(vocab):
            item = (tokens + [t], total + table[t], lps + [table[t]])
            if t == eos or len(item[0]) == max_tokens:
                out.append(item)
            else:
                frontier.append(item)
    return out


@pytest.mark.parametrize("lp,es", [(1.0, False), (0.0, "never"), (2.0, True), (-0.5, False)])
def test_rule_is_exhaustive_with_enough_beams(lp, es):
    """With as many beams as there are candidates at every step, beam search sees every completion: its result is
    the best n of all of them by sum(logprob) / length ** length_penalty (brute-force enumeration)."""
    vocab, eos, max_tokens, prompt, seed = 3, 2, 3, [4, 4], 11
    beams = vocab * (vocab - 1) ** (max_tokens - 1)  # candidates at the last step
    search = BeamSearch(-1, beams, max_tokens, lp, es, frozenset([eos]))
    run_rule(search, prompt, vocab, seed)
    brute = sorted(all_completions(prompt, vocab, seed, eos, max_tokens),
                   key=lambda c: -c[1] / len(c[0]) ** lp)[:beams]
    got = search.results(beams)
    assert [h.token_ids for h in got] == [c[0] for c in brute]
    for h, c in zip(got, brute):
        assert h.score == pytest.approx(c[1] / len(c[0]) ** lp)
        assert h.logprobs == pytest.approx(c[2])


def test_rule_early_stopping_true_stops_at_num_beams_finished():
    """A table where the end token is always likely: with early_stopping=True the search ends the step B
    hypotheses are kept, long before max_tokens."""
    search = BeamSearch(-1, 2, 50, 1.0, True, frozenset([0]))
    steps = 0
    while not search.done:
        search.step({b.key: [(0, -0.1), (1, -1.0), (2, -2.0), (3, -3.0)] for b in search.running})
        for i, b in enumerate(search.running):
            b.key = i
        steps += 1
    assert steps == 2 and len(search.results(2)) == 2
    assert [h.token_ids for h in search.results(2)] == [[0], [1, 0]]


def test_rule_refuses_missing_candidates_and_steps_after_the_end():
    search = BeamSearch(7, 2, 1, 1.0, False, frozenset())
    with pytest.raises(ValueError, match="no candidates for beams"):
        search.step({})
    search.step({7: [(1, -0.5), (2, -1.0), (3, -2.0), (4, -3.0)]})
    assert search.done and [h.token_ids for h in search.results(2)] == [[1], [2]]
    with pytest.raises(RuntimeError, match="after the search ended"):
        search.step({})


def test_sampler_gives_beam_rows_their_best_candidates():
    """Beam rows: the top K of log-softmax(raw logits) after the processors (here a repetition penalty, applied to
    the log-probs as transformers does); other rows are sampled as before and get no candidates."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    beam_params = SamplingParams(num_beams=3, repetition_penalty=1.3)
    rows = [SamplingRow(beam_params, [1, 2], [4], stop_token_ids=frozenset([7])),
            SamplingRow(SamplingParams(temperature=0.0), [1], []),
            SamplingRow(SamplingParams(num_beams=2), [9], [])]
    out = Sampler().sample(logits, rows)
    lp0 = torch.log_softmax(logits[0], -1)
    lp0[[1, 2, 4]] *= 1.3  # log-probs are negative: the penalty multiplies them
    for i, (lp, k) in enumerate([(lp0, 6), (None, 0), (torch.log_softmax(logits[2], -1), 4)]):
        if lp is None:
            assert out.beam_candidates[i] == []
            continue
        values, ids = lp.topk(k)
        assert [t for t, _ in out.beam_candidates[i]] == ids.tolist()
        assert [v for _, v in out.beam_candidates[i]] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.token_ids[1] == int(logits[1].argmax())
    assert Sampler().sample(logits[1:2], rows[1:2]).beam_candidates is None


class TableExecutor:
    """A model-free executor: beam rows get their top K candidates from the table, other rows token 1."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab, self.seed, self.released = vocab, seed, []

    def execute(self, output):
        rows = [item.seq for item in output.scheduled if item.needs_sample]
        cands = []
        for seq in rows:
            lps = table_logprobs(seq.token_ids, self.vocab, self.seed)
            k = 2 * seq.params.num_beams if seq.group_id is not None else 0
            cands.append([(t, lps[t]) for t in sorted(range(self.vocab), key=lambda t: -lps[t])[:k]])
        details = SamplerOutput([1] * len(rows), [0.0] * len(rows), None, cands)
        return {seq.seq_id: 1 for seq in rows}, details

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


@pytest.mark.parametrize("num_blocks", [64, 7])
def test_engine_applies_the_rule_through_the_scheduler(num_blocks):
    """Two beam requests and an ordinary one on a model-free executor: each beam request ends with what the rule
    alone gives; with 7 blocks of 2 tokens, beams are preempted while paused and forked while waiting."""
    vocab, seed, max_tokens = 6, 21, 6
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(max_tokens=max_tokens, num_beams=3, n=3, length_penalty=0.7)
    sched = Scheduler(BlockManager(num_blocks, 2, enable_prefix_caching=False), 8, 64, 32)
    engine = LLMEngine(sched, TableExecutor(vocab, seed))
    for i, prompt in enumerate(prompts):
        engine.add(Sequence(engine.new_seq_id(), prompt, max_tokens, frozenset([0]), params=params))
    engine.add(Sequence(engine.new_seq_id(), [3, 3], 9, params=SamplingParams(max_tokens=9)))
    results, plain, steps = {}, [], 0
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, BeamEvent):
                results[event.seq.seq_id] = event.beams
            else:
                plain.append(event.token_id)
        steps += 1
        assert steps < 500, "the engine stopped making progress"
    assert plain == [1] * 9
    for i, prompt in enumerate(prompts):
        rule = BeamSearch(-1, 3, max_tokens, 0.7, False, frozenset([0]))
        run_rule(rule, prompt, vocab, seed)
        assert [(h.token_ids, h.score) for h in results[i]] == [(h.token_ids, h.score) for h in rule.results(3)]
    if num_blocks == 7:
        assert sched.num_preemptions > 0
    assert sched.block_manager.num_free_blocks == num_blocks and not sched.running and not sched.waiting


# ---- real models against transformers -------------------------------------------------------------------------------

def build_engine(tmp: Path, model_dir: Path) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--kv_block_size", str(BLOCK),
                      "--max_batch_size", "8"]) == 0
    return tmp / "engine"


@pytest.fixture(scope="module", params=["dbrx", "mpt"])
def model(request, tmp_path_factory):
    """(engine dir, transformers model, an end id the model emits early for PROMPTS[0])."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "dbrx":
        model_dir, hf, _ = make_dbrx_checkpoint(tmp)
    else:
        cfg = mpt_published_config()
        hf = hf_mpt_model(cfg)
        model_dir = tmp / "hf"
        save_checkpoint(published_state(hf), cfg, model_dir)
    return build_engine(tmp, model_dir), hf, reachable_end_id(hf)


def reachable_end_id(hf) -> int:
    """An end id that ends some but not all of transformers' best beams for PROMPTS[0] (4 beams, 3 returned), so
    that finished hypotheses compete with running ones: tried among the model's likely tokens."""
    with torch.no_grad():
        tried = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].topk(8).indices.tolist()
    for eos in tried[1:] + tried[:1]:
        rows, _ = hf_beams(hf, PROMPTS[0], eos, 4, 3, 1.0, False)
        ended = [eos in row for row in rows]
        if any(ended) and not all(ended):
            return eos
    raise AssertionError(f"none of {tried} ends some of the beams; pick prompts or a seed where one does")


def hf_beams(hf, prompt, eos, beams, n, lp, es, new=NEW):
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new, num_beams=beams, num_return_sequences=n,
                          do_sample=False, eos_token_id=eos, pad_token_id=eos, length_penalty=lp,
                          early_stopping=es, output_scores=True, return_dict_in_generate=True)
    return [ref.sequences[i, len(prompt):].tolist() for i in range(n)], ref.sequences_scores.tolist()


def assert_same_beams(out, ref_rows, ref_scores, eos, lp):
    assert len(out.outputs) == len(ref_rows)
    for i, (o, row, score) in enumerate(zip(out.outputs, ref_rows, ref_scores)):
        assert o.index == i
        assert o.token_ids + [eos] * (len(row) - len(o.token_ids)) == row
        assert o.score == pytest.approx(score, abs=1e-4)
        assert o.score == pytest.approx(o.cumulative_logprob / len(o.token_ids) ** lp, rel=1e-6)
        assert o.finish_reason == ("stop" if o.token_ids[-1] == eos else "length")


@pytest.mark.parametrize("beams,n,lp,es", [(4, 3, 1.0, False), (4, 4, 0.5, True), (3, 2, 2.0, "never"),
                                           (2, 1, 1.0, True)])
def test_beams_match_transformers(model, beams, n, lp, es):
    """A batch of prompts of different lengths, run together, each against transformers alone."""
    engine, hf, eos = model
    llm = kiln.LLM(engine)
    params = kiln.SamplingParams(max_tokens=NEW, num_beams=beams, n=n, length_penalty=lp, early_stopping=es,
                                 end_id=eos)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        rows, scores = hf_beams(hf, prompt, eos, beams, n, lp, es)
        assert_same_beams(out, rows, scores, eos, lp)
    if (beams, es) == (4, False):  # the end id is reachable: finished hypotheses took part
        assert any(o.finish_reason == "stop" for out in outs for o in out.outputs)
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every beam's blocks came back


def test_beams_share_prompt_blocks(model):
    """After the first step the beams are forks of the prompt's sequence: its blocks are shared, not copied."""
    engine, _, eos = model
    llm = kiln.LLM(engine, enable_prefix_caching=False)
    params = kiln.SamplingParams(max_tokens=NEW, num_beams=4, n=4, end_id=eos)
    seq = Sequence(llm.engine.new_seq_id(), PROMPTS[2], NEW, llm.stop_ids(params), params=params)
    llm.engine.add(seq)
    llm.engine.step()  # prefill: the beams are forked from the prompt
    bm = llm.engine.scheduler.block_manager
    live = [s for s in llm.engine.scheduler.running]
    assert len(live) == 4
    assert max(b.ref_count for b in bm.blocks) == 4  # the prompt's full blocks, shared by all four beams
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert bm.num_free_blocks == bm.num_blocks


def tiny_cache_llm(engine: Path, blocks: int) -> kiln.LLM:
    probe = kiln.LLM(engine)
    llm = kiln.LLM(engine, kv_cache_bytes=blocks * probe.runner.plan.kv_bytes_per_token * BLOCK)
    assert llm.runner.num_blocks == blocks
    return llm


def test_beams_unchanged_by_batching_and_preemption(model):
    """A beam request batched with seeded sampling and greedy requests gives the beams it gives alone; so do two
    beam requests and a greedy one squeezed into a KV cache too small for them (preemption, recompute)."""
    engine, _, eos = model
    beam = kiln.SamplingParams(max_tokens=NEW, num_beams=4, n=4, end_id=eos, length_penalty=0.5)
    sample = kiln.SamplingParams(max_tokens=NEW, temperature=0.8, top_k=20, seed=5, ignore_eos=True)
    greedy = kiln.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    llm = kiln.LLM(engine)
    alone = [llm.generate([p], beam)[0] for p in PROMPTS[:2]]
    sample_alone = llm.generate([PROMPTS[2]], sample)[0].outputs[0].token_ids
    mixed = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[2]], [sample, beam, beam, greedy])
    assert mixed[0].outputs[0].token_ids == sample_alone
    squeezed_llm = tiny_cache_llm(engine, blocks=8)
    squeezed = squeezed_llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [beam, greedy, beam])
    assert squeezed_llm.engine.scheduler.num_preemptions > 0, "the tiny cache was meant to force preemption"
    for ref, a, b in zip(alone, mixed[1:3], [squeezed[0], squeezed[2]]):
        for got in (a, b):
            assert [o.token_ids for o in got.outputs] == [o.token_ids for o in ref.outputs]
            assert [o.score for o in got.outputs] == pytest.approx([o.score for o in ref.outputs], abs=1e-5)
    assert squeezed[1].outputs[0].token_ids == mixed[3].outputs[0].token_ids
    bm = squeezed_llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks == 8


def test_streaming_a_beam_request_yields_the_final_beams(model):
    engine, _, eos = model
    llm = kiln.LLM(engine)
    params = kiln.SamplingParams(max_tokens=NEW, num_beams=3, n=2, end_id=eos)
    expected = llm.generate([PROMPTS[0]], params)[0]
    deltas = list(llm.stream([PROMPTS[0]], params))
    assert [(d.index, d.finish_reason) for d in deltas] == [(o.index, o.finish_reason) for o in expected.outputs]
    assert [d.token_id for d in deltas] == [o.token_ids[-1] for o in expected.outputs]
    assert [o.token_ids for o in llm.last_results[0].outputs] == [o.token_ids for o in expected.outputs]


def test_beam_limits_and_refusals(model):
    engine, _, _ = model
    llm = kiln.LLM(engine)
    assert kiln.SamplingParams(num_beams=3).use_beam_search  # num_beams > 1 means beam search
    with pytest.raises(RequestError, match="max_beam_width 4; rebuild with --max_beam_width 5"):
        llm.generate([PROMPTS[0]], kiln.SamplingParams(num_beams=5))
    with pytest.raises(RequestError, match="stop strings"):
        llm.generate([PROMPTS[0]], kiln.SamplingParams(num_beams=2, stop=["x"]))
    assert not llm.engine.has_unfinished()


def test_cli_lists_every_beam(model, tmp_path, capsys):
    engine, _, eos = model
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS[:2]) + "\n")
    out_json = tmp_path / "out.json"
    assert kiln_main(["run", "--engine_dir", str(engine), "--input_file", str(prompts), "--max_output_len",
                      str(NEW), "--num_beams", "3", "--num_return_sequences", "2", "--length_penalty", "0.5",
                      "--early_stopping", "0", "--end_id", str(eos), "--output_json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    api = kiln.LLM(engine).generate(PROMPTS[:2], kiln.SamplingParams(
        max_tokens=NEW, num_beams=3, n=2, length_penalty=0.5, early_stopping=False, end_id=eos))
    for item, ref in zip(data, api):
        assert item["output_ids"] == [o.token_ids for o in ref.outputs]
        assert item["score"] == pytest.approx([o.score for o in ref.outputs], abs=1e-6)
    assert printed.count("Beam 0]") == 2 and printed.count("Beam 1]") == 2 and "score" in printed
    assert kiln_main(["run", "--engine_dir", str(engine), "--input_file", str(prompts), "--max_output_len", "4",
                      "--num_beams", "2", "--num_return_sequences", "3"]) == 2
