"""`kiln serve` of a 2-rank (tensor parallel) engine with the same one command: greedy completions equal the
single-rank engine's, and SIGTERM ends the server with exit 0 and leaves no rank process behind."""

from __future__ import annotations

import signal
import time

import openai
import pytest

import kiln
from fixtures_serve import MPT_BOOKS, alive, children, shared_mpt_books_engine, start_kiln_serve
from kiln.cli.main import main as kiln_main


@pytest.mark.slow
def test_two_rank_engine_serves_and_stops_cleanly(tmp_path, tmp_path_factory):
    single = shared_mpt_books_engine(tmp_path_factory)
    assert kiln_main(["convert", "--model_dir", str(MPT_BOOKS), "--output_dir", str(tmp_path / "ckpt2"), "--dtype",
                      "float32", "--tp_size", "2"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt2"), "--output_dir", str(tmp_path / "tp2"),
                      "--max_batch_size", "4", "--max_input_len", "64", "--max_seq_len", "128"]) == 0
    prompts = ["Call me Ishmael.", "It was a fine morning"]
    llm = kiln.LLM(single, device="cpu")
    want = [r.outputs[0].text for r in llm.generate(prompts, kiln.SamplingParams(max_tokens=12, temperature=0))]
    proc, url = start_kiln_serve(tmp_path / "tp2")
    try:
        ranks = children(proc.pid)
        assert ranks, "a 2-rank engine runs its second rank in a process of its own"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = client.completions.create(model="tp2", prompt=prompts, max_tokens=12, temperature=0)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in ranks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
