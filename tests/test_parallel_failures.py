"""Multi-rank failures end every rank quickly with the failing rank's error, never a hang; and a torchrun-style
launch (the launcher's environment variables, one process per rank) runs the same engine with only rank 0 writing."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kiln
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.engine.sequence import Sequence
from kiln.executor.step_plan import WorkerError

PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3, 8, 1]]
REPO = Path(__file__).resolve().parents[1]


def build_engine(tmp: Path, tp: int) -> Path:
    cfg = mpt_published_config()
    hf_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf", shards=1)
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp / "ckpt"),
                      "--tp_size", str(tp)]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    return tmp / "engine"


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fail")
    return {"one": build_engine(tmp / "one", 1), "tp2": build_engine(tmp / "tp2", 2)}


def corrupt(path: Path) -> None:
    """Replace the rank file (not the checkpoint's copy it may be linked to) with one whose header is garbage."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(b"\xff" * 64 + data[64:])


def write_prompts(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(PROMPTS)
    return path


def env_for_subprocess(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def copy_with_corrupt_rank1(engine_dir: Path, tmp_path: Path) -> Path:
    """A copy of a two-rank engine whose rank 1 shard is corrupted."""
    engine = tmp_path / "engine"
    engine.mkdir()
    for f in engine_dir.iterdir():
        (engine / f.name).write_bytes(f.read_bytes())
    corrupt(engine / "rank1.safetensors")
    return engine


def test_corrupt_shard_fails_every_rank_quickly_in_process(engines, tmp_path):
    engine = copy_with_corrupt_rank1(engines["tp2"], tmp_path)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 failed: .*rank1\.safetensors"):
        kiln.LLM(engine, device="cpu")
    assert time.monotonic() - start < 30
    assert not child_pids()  # the spawned rank is gone


def test_corrupt_shard_makes_kiln_run_exit_2(engines, tmp_path):
    engine = copy_with_corrupt_rank1(engines["tp2"], tmp_path)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kiln", "run", "--engine_dir", str(engine), "--device", "cpu",
                           "--input_file", str(write_prompts(tmp_path / "p.csv")), "--max_output_len", "3"],
                          capture_output=True, text=True, timeout=60, env=env_for_subprocess())
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("kiln run: error: rank 1 failed:") and "rank1.safetensors" in lines[-1]
    assert time.monotonic() - start < 45


def test_rank_killed_mid_run_is_reported(engines):
    llm = kiln.LLM(engines["tp2"], device="cpu")
    try:
        params = kiln.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        llm.generate(PROMPTS, params)
        worker = llm.runner.procs[0]
        worker.kill()
        worker.join(5)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1 failed: its process ended with exit code -9"):
            llm.generate(PROMPTS, params)
        assert time.monotonic() - start < 20
        with pytest.raises(WorkerError, match="stopped after a rank failed"):
            llm.generate(PROMPTS, params)
    finally:
        llm.close()
    assert not child_pids()


def test_rank_killed_with_a_step_in_flight_is_reported_async(engines, monkeypatch):
    """Async scheduling on (KILN_MULTIRANK_ASYNC=1): the engine holds a step launched ahead when rank 1 dies; the
    next step ends every rank with rank 1's failure, and no sequence is left holding a placeholder."""
    with kiln.LLM(engines["one"], device="cpu") as one:
        expected = [r.outputs[0].token_ids for r in one.generate(PROMPTS, kiln.SamplingParams(
            max_tokens=4, temperature=0.0, ignore_eos=True))]
    monkeypatch.setenv("KILN_MULTIRANK_ASYNC", "1")
    llm = kiln.LLM(engines["tp2"], device="cpu")
    try:
        eng = llm.engine
        assert eng.async_scheduling
        params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        seqs = [Sequence(100 + i, p, params.max_tokens, ignore_eos=True, params=params) for i, p in enumerate(PROMPTS)]
        for seq in seqs:
            eng.add(seq)
        for _ in range(3):
            eng.step()
        assert eng.has_step_in_flight and eng.num_launched_ahead >= 2 and llm.runner.fed_steps >= 2
        worker = llm.runner.procs[0]
        worker.kill()
        worker.join(5)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1 failed: its process ended with exit code -9"):
            eng.step()
        assert time.monotonic() - start < 20
        # the step in flight (the 4th) was settled: real tokens, those one rank gives, no placeholder left
        assert [seq.output_token_ids for seq in seqs] == expected
        with pytest.raises(WorkerError, match="stopped after a rank failed"):
            llm.generate(PROMPTS, params)
    finally:
        llm.close()
    assert not child_pids()


def child_pids() -> list[str]:
    """This process's live (or unreaped) children, from /proc."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    return [pid for task in tasks.iterdir() if (task / "children").exists()
            for pid in (task / "children").read_text().split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_style_launch(engines, tmp_path):
    """What `torchrun --nproc_per_node 2 -m kiln run ...` does: two processes told their rank by the environment."""
    prompts = write_prompts(tmp_path / "p.csv")
    with kiln.LLM(engines["one"], device="cpu") as llm:
        params = kiln.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        expected = [PROMPTS[i] + r.outputs[0].token_ids for i, r in enumerate(llm.generate(PROMPTS, params))]
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = env_for_subprocess(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=port)
        out = tmp_path / f"out{rank}.csv"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kiln", "run", "--engine_dir", str(engines["tp2"]), "--device", "cpu",
             "--input_file", str(prompts), "--max_output_len", "4", "--ignore_eos", "--output_csv", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert "Output [Text 0 Beam 0]" in results[0][0]
    assert results[1][0].strip() == ""  # only rank 0 prints
    assert not (tmp_path / "out1.csv").exists()  # and writes
    with open(tmp_path / "out0.csv", newline="") as f:
        rows = [[int(x) for x in row] for row in csv.reader(f)]
    width = max(len(r) for r in expected)
    assert [row[: len(e)] for row, e in zip(rows, expected)] == expected and all(len(r) == width for r in rows)


def test_group_teardown_that_never_ends_is_abandoned_in_bounded_time(monkeypatch, capsys):
    """A process group whose teardown waits forever (a NCCL peer already gone) must not hang shutdown."""
    import threading
    import time

    from kiln.distributed import launch

    never = threading.Event()
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(launch.dist, "destroy_process_group", lambda: never.wait())
    monkeypatch.setattr(launch, "TEARDOWN_ABANDONED", False)
    start = time.monotonic()
    assert launch.leave_world(timeout_s=0.3) is False
    assert time.monotonic() - start < 2.0
    assert launch.TEARDOWN_ABANDONED and "did not shut down" in capsys.readouterr().err
    never.set()
