"""The engine's step accounting (kiln/engine/step_stats.py, LLMEngine.step_stats): each step() call counted once, by
the kind of model step it launched (decode in a CUDA graph, eager decode, prefill, mixed, drain, idle), with its
sequences, prefill tokens and host time; what LLM.generate's calls add up to, async and not; a graph-replaying
executor's decodes; and bench_serve's table of them. The /metrics side is in test_serve.py."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import kiln
from fixtures_serve import REPO, shared_mpt_books_engine
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sequence import Sequence
from kiln.engine.step_stats import KINDS, StepStats

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30, 31]]


def output(*new_tokens: int) -> SimpleNamespace:
    """A SchedulerOutput's shape: sequences computing these numbers of new tokens."""
    return SimpleNamespace(scheduled=[SimpleNamespace(num_new_tokens=n) for n in new_tokens],
                           num_batched_tokens=sum(new_tokens))


def one_call(stats: StepStats, *launches: tuple[SimpleNamespace, bool], in_flight: bool = True,
             work_left: bool = True) -> None:
    start = stats.begin(in_flight)
    for out, graphed in launches:
        stats.launched(out, graphed)
    stats.end(start, work_left)


def steps(stats: StepStats) -> dict[str, int]:
    return {kind: k["steps"] for kind, k in stats.summary()["kinds"].items() if k["steps"]}


def test_each_call_counts_once_by_the_kind_it_launched():
    stats = StepStats()
    one_call(stats, (output(1, 1, 1), True))
    one_call(stats, (output(1, 1), False))
    one_call(stats, (output(7, 3), False))
    one_call(stats, (output(1, 1, 4), False))
    one_call(stats, (output(9), False), (output(1), False), in_flight=False)  # the first call of a burst: two steps
    one_call(stats)  # nothing launched, a step was in flight
    one_call(stats, in_flight=False, work_left=False)
    assert steps(stats) == {"decode_graph": 1, "decode_eager": 1, "prefill": 2, "mixed": 1, "drain": 1, "idle": 1}
    kinds = stats.summary()["kinds"]
    assert (kinds["decode_graph"]["seqs"], kinds["decode_graph"]["prefill_tokens"]) == (3, 0)
    assert (kinds["prefill"]["seqs"], kinds["prefill"]["prefill_tokens"]) == (2 + 2, 10 + 9)
    assert (kinds["mixed"]["seqs"], kinds["mixed"]["prefill_tokens"]) == (3, 4)
    summary = stats.summary()
    assert summary["steps"] == 7 and list(summary["kinds"]) == list(KINDS)
    assert summary["seconds"] == pytest.approx(sum(k["seconds"] for k in kinds.values())) and summary["seconds"] > 0
    # the heavier kind wins whichever order the two launches came in
    other = StepStats()
    one_call(other, (output(1, 1), False), (output(1, 5), False), in_flight=False)
    assert steps(other) == {"mixed": 1}


def test_time_between_calls_counts_only_while_work_is_left_and_reset_zeroes():
    stats = StepStats()
    one_call(stats, (output(1), False), work_left=False)
    one_call(stats, (output(1), False))  # after an idle gap: not counted
    assert stats.between_seconds == 0
    one_call(stats, (output(1), False))
    assert stats.between_seconds > 0
    stats.reset()
    assert stats.summary()["steps"] == 0 and stats.between_seconds == 0


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return shared_mpt_books_engine(tmp_path_factory)


@pytest.mark.parametrize("async_on", [True, False])
def test_generate_counts_one_prefill_then_decodes(engine_dir, async_on, monkeypatch):
    """N prompts that fit one step, max_tokens T: T calls. Async: the first launches the prefill and the first
    decode (a prefill call), T - 2 decode calls, and a drain that only reads the last step's tokens. Synchronous:
    one prefill, then T - 1 decodes."""
    llm = kiln.LLM(engine_dir, device="cpu", async_scheduling=async_on)
    eng = llm.engine
    calls = []
    step = eng.step
    monkeypatch.setattr(eng, "step", lambda: calls.append(1) or step())
    t = 6
    llm.generate(PROMPTS, kiln.SamplingParams(max_tokens=t, temperature=0, ignore_eos=True))
    summary = eng.step_stats.summary()
    assert summary["steps"] == len(calls) == t
    want = {"prefill": 1, "decode_eager": t - 2, "drain": 1} if async_on else {"prefill": 1, "decode_eager": t - 1}
    assert steps(eng.step_stats) == want
    kinds = summary["kinds"]
    prompt_tokens = sum(map(len, PROMPTS))
    assert kinds["prefill"]["prefill_tokens"] == prompt_tokens
    assert kinds["decode_eager"]["seqs"] == len(PROMPTS) * want["decode_eager"]
    assert kinds["decode_eager"]["prefill_tokens"] == 0
    assert all(kinds[k]["seconds"] > 0 for k in want) and summary["between_seconds"] > 0
    eng.step_stats.reset()
    assert eng.step_stats.summary()["steps"] == 0
    llm.close()


def test_a_request_arriving_mid_generation_makes_a_mixed_step(engine_dir):
    llm = kiln.LLM(engine_dir, device="cpu")
    eng = llm.engine
    params = kiln.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    eng.add(Sequence(eng.new_seq_id(), PROMPTS[0], 5, ignore_eos=True, params=params))
    eng.step()
    eng.step()
    eng.add(Sequence(eng.new_seq_id(), PROMPTS[2], 5, ignore_eos=True, params=params))
    while eng.has_unfinished():
        eng.step()
    kinds = eng.step_stats.summary()["kinds"]
    assert kinds["mixed"]["steps"] == 1 and kinds["mixed"]["prefill_tokens"] == len(PROMPTS[2])
    assert kinds["mixed"]["seqs"] == 2
    llm.close()


def test_decodes_the_executor_replays_in_a_graph_count_as_decode_graph(engine_dir):
    """The engine asks the executor (ModelRunner.num_graph_steps) whether a step replayed a graph: here one that
    says every other decode step did."""
    llm = kiln.LLM(engine_dir, device="cpu")
    runner = llm.runner
    assert runner.num_graph_steps == 0  # CPU: no graphs

    class HalfGraphs:
        num_graph_steps = 0
        decodes = 0

        def launch(self, out, feed=None):
            if out.num_batched_tokens == len(out.scheduled):
                self.decodes += 1
                self.num_graph_steps += self.decodes % 2
            return runner.launch(out, feed)

        def release(self, seq_id):
            runner.release(seq_id)

    eng = LLMEngine(llm.engine.scheduler, HalfGraphs())
    for prompt in PROMPTS:
        eng.add(Sequence(eng.new_seq_id(), prompt, 7, ignore_eos=True, params=kiln.SamplingParams(max_tokens=7)))
    while eng.has_unfinished():
        eng.step()
    # 6 decode steps (tokens 2..7): the first launched with the prefill, in one call counted as prefill
    assert steps(eng.step_stats) == {"prefill": 1, "decode_graph": 2, "decode_eager": 3, "drain": 1}
    llm.close()


def test_bench_serve_prints_offline_and_served_side_by_side(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_serve

    stats = StepStats()
    one_call(stats, (output(9, 9), False), (output(1, 1), False), in_flight=False)
    for _ in range(4):
        one_call(stats, (output(1, 1), True))
    one_call(stats, work_left=False)
    offline = stats.summary()
    served = bench_serve.step_stats_delta(offline, StepStats().summary())
    assert served == offline
    bench_serve.print_step_tables([{"request_rate": float("inf"), "duration_s": 2.0, "step_stats": served}],
                                  {"offline_step_stats": offline, "offline_duration_s": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert "offline LLM.generate" in lines[2] and "served, rate inf" in lines[2]
    rows = {line.split()[0]: line for line in lines[4:]}
    assert set(rows) == {"decode_graph", "prefill", "drain", "all", "between", "wall"}
    assert rows["decode_graph"].split()[2] == "4" and rows["all"].split()[2] == "6"
    assert rows["prefill"].split()[5:7] == ["4.0", "18.0"]  # seqs and prefill tokens per call


def test_bench_serve_shows_the_profiled_pass_apart(capsys):
    # bench_serve --profile runs one more pass under py-spy after the sweep: py-spy stops the processes for every
    # sample, so its pass is never a measured rate; its steps are printed beside the measured pass's.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_serve

    measured, slowed = StepStats(), StepStats()
    one_call(measured, (output(1, 40), False))
    one_call(slowed, (output(1, 40), False))
    slowed.kinds["mixed"].seconds *= 1.4
    rows = [{"request_rate": float("inf"), "duration_s": 2.0, "step_stats": measured.summary()}]
    report = {"profiled_rate": {"request_rate": float("inf"), "duration_s": 2.5, "step_stats": slowed.summary()}}
    bench_serve.print_step_tables(rows, report)
    out = capsys.readouterr().out
    assert "under py-spy" in out and out.count("engine step() calls") == 1
    table = out.split("the same pass under py-spy")[1].splitlines()
    assert "served, rate inf" in table[1] and "served, rate inf, under py-spy" in table[1]
    assert bench_serve.parse_args(["--engine_dir", "e", "--profile", "p.txt"]).profile == "p.txt"


def test_bench_serve_passes_share_lengths_but_no_prompt():
    # Each pass of bench_serve (warm-up, every rate, the profiled pass) sends the same lengths with tokens of its own:
    # a pass that found an earlier one's prompts in the prefix cache would prefill almost nothing and beat offline.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_serve

    args = bench_serve.parse_args(["--engine_dir", "x", "--num_prompts", "40", "--input_len", "16", "--output_len",
                                   "8", "--range_ratio", "0.5"])
    passes = [bench_serve.workload(args, 50432, salt) for salt in (-1, 0, 1)]
    assert [[len(p) for p, _ in w] for w in passes][1:] == [[len(p) for p, _ in passes[0]]] * 2
    assert [[n for _, n in w] for w in passes][1:] == [[n for _, n in passes[0]]] * 2
    assert len({len(p) for p, _ in passes[0]}) > 1  # the lengths do vary
    prefixes = [{tuple(p[:4]) for p, _ in w} for w in passes]
    assert not (prefixes[0] & prefixes[1]) and not (prefixes[1] & prefixes[2]) and not (prefixes[0] & prefixes[2])
    assert bench_serve.workload(args, 50432, 0) == passes[1]  # deterministic: offline's salt-0 prompts are rate 0's
