"""Multi-rank engines on the CPU (gloo, fp32, tiny models) against the same model on one rank: for every family
tp 2, pp 2 and tp 2 x pp 2; DBRX expert parallel (ep 2, ep 4) and tensor parallel over experts; MPT's 6 heads at
tp 3 and its qk_ln under tp (KV heads split and replicated); greedy tokens identical, logits (LLM.score) within
1e-4, seeded sampling with logprobs and beam search identical; pipeline engines run every step of several sequences
as pp micro-batches here. Each engine is started once (kiln spawns its ranks) and checked on several prompts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import kiln
from fixtures_baichuan import make_baichuan_checkpoint
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, random_state, save_checkpoint
from kiln.cli.main import main as kiln_main

# Lengths 1 to 21: single tokens, a prompt spanning two KV blocks of 16, and different lengths batched together.
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], list(range(40, 61)), [42], [101, 7, 7, 203, 64, 9, 11, 12]]
GREEDY = kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SEEDED = kiln.SamplingParams(max_tokens=5, temperature=0.9, top_k=50, seed=1234, ignore_eos=True, logprobs=3)
BEAMS = kiln.SamplingParams(max_tokens=5, num_beams=3, n=2, ignore_eos=True)  # forked sequences, block copies


@dataclasses.dataclass
class Reference:
    """One source checkpoint and what its one-rank engine says."""

    hf_dir: Path
    base_args: tuple[str, ...]
    tokens: list[list[int]]
    scores: list[torch.Tensor]
    sampled: list[tuple[list[int], list[float]]]
    beams: list[list[tuple[list[int], float]]]
    micro_batched: int = 0  # pipeline steps the driver ran as micro-batches


def convert_build(tmp: Path, model_dir: Path, *extra: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), "--dtype",
                      "float32", *extra]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "8", "--max_input_len", "64", "--max_seq_len", "96"]) == 0
    return tmp / "engine"


def run_engine(engine: Path) -> Reference:
    with kiln.LLM(engine, device="cpu") as llm:
        tokens = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]
        scores = [llm.score(PROMPTS[0]), llm.score(PROMPTS[2])]
        sampled = [(r.outputs[0].token_ids, r.outputs[0].token_logprobs) for r in llm.generate(PROMPTS[:3], SEEDED)]
        beams = [[(o.token_ids, o.cumulative_logprob) for o in r.outputs] for r in llm.generate(PROMPTS[:2], BEAMS)]
        micro_batched = getattr(llm.runner, "micro_batched_steps", 0)
    return Reference(Path(), (), tokens, scores, sampled, beams, micro_batched)


def reference_for(tmp: Path, hf_dir: Path, *base_args: str) -> Reference:
    ref = run_engine(convert_build(tmp, hf_dir, *base_args))
    ref.hf_dir, ref.base_args = hf_dir, base_args
    return ref


def check_engine(tmp: Path, ref: Reference, *extra: str) -> None:
    pipeline = "--pp_size" in extra
    if pipeline:  # every step of several sequences runs as pp micro-batches (prefill and decode, beams, sampling)
        os.environ["KILN_PP_MICROBATCH_MIN_TOKENS"] = "0"
    try:
        got = run_engine(convert_build(tmp, ref.hf_dir, *ref.base_args, *extra))
    finally:
        os.environ.pop("KILN_PP_MICROBATCH_MIN_TOKENS", None)
    assert (got.micro_batched > 10) == pipeline
    assert got.tokens == ref.tokens
    for ours, theirs in zip(got.scores, ref.scores):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-4
    for (toks, lps), (ref_toks, ref_lps) in zip(got.sampled, ref.sampled):
        assert toks == ref_toks
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4
    for outs, ref_outs in zip(got.beams, ref.beams):
        assert [t for t, _ in outs] == [t for t, _ in ref_outs]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(outs, ref_outs))


@pytest.fixture(scope="module")
def dbrx_ref(tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp("dbrx")
    hf_dir, _, _ = make_dbrx_checkpoint(tmp)
    return reference_for(tmp / "one", hf_dir)


@pytest.fixture(scope="module")
def mpt_ref(tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp("mpt")
    cfg = mpt_published_config()  # 6 heads: split 3 + 3 at tp 2 and 2 + 2 + 2 at tp 3
    hf_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf")
    return reference_for(tmp / "one", hf_dir)


@pytest.fixture(scope="module", params=["gqa", "mqa"])
def mpt_qk_ln_ref(request, tmp_path_factory) -> tuple[str, Reference]:
    """qk_ln with 2 KV heads (split over tp 2: the key LayerNorm spans both ranks) or with one (MQA: replicated on
    every rank at tp 3, so its statistics must not be counted three times)."""
    tmp = tmp_path_factory.mktemp(f"mpt_qk_ln_{request.param}")
    attn = {"qk_ln": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2} if request.param == "gqa" else \
        {"qk_ln": True, "attn_type": "multiquery_attention"}
    cfg = mpt_published_config(attn_config=attn, no_bias=False)
    hf_dir = save_checkpoint(random_state(cfg), cfg, tmp / "hf", shards=1)
    return request.param, reference_for(tmp / "one", hf_dir)


@pytest.fixture(scope="module")
def baichuan_ref(tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp("baichuan")
    hf_dir, _, _ = make_baichuan_checkpoint(tmp, "v2_13b")  # ALiBi, 6 heads, NormHead
    return reference_for(tmp / "one", hf_dir, "--model_version", "v2_13b")


@pytest.mark.parametrize("extra", [
    ("--tp_size", "2"),  # tensor parallel attention and experts (moe_tp_mode 2, the default)
    ("--pp_size", "2"),
    ("--tp_size", "2", "--pp_size", "2"),
    ("--tp_size", "2", "--moe_tp_mode", "1"),  # ep 2
    ("--tp_size", "4", "--moe_tp_mode", "1"),  # ep 4; 2 KV heads replicated over 4 ranks
], ids=["tp2", "pp2", "tp2xpp2", "ep2", "ep4"])
def test_dbrx(tmp_path, dbrx_ref, extra):
    check_engine(tmp_path, dbrx_ref, *extra)


@pytest.mark.parametrize("extra", [
    ("--tp_size", "2"),
    ("--pp_size", "2"),
    ("--tp_size", "2", "--pp_size", "2"),
    ("--tp_size", "3"),
], ids=["tp2", "pp2", "tp2xpp2", "tp3"])
def test_mpt(tmp_path, mpt_ref, extra):
    check_engine(tmp_path, mpt_ref, *extra)


def test_mpt_qk_ln(tmp_path, mpt_qk_ln_ref):
    kind, ref = mpt_qk_ln_ref
    check_engine(tmp_path, ref, "--tp_size", "2" if kind == "gqa" else "3")


@pytest.mark.parametrize("extra", [
    ("--tp_size", "2"),
    ("--pp_size", "2"),
    ("--tp_size", "2", "--pp_size", "2"),
], ids=["tp2", "pp2", "tp2xpp2"])
def test_baichuan(tmp_path, baichuan_ref, extra):
    check_engine(tmp_path, baichuan_ref, *extra)


def test_convert_workers_flag_is_accepted_and_changes_nothing(tmp_path, mpt_ref):
    base = ("--model_dir", str(mpt_ref.hf_dir), "--tp_size", "2")
    assert kiln_main(["convert", *base, "--output_dir", str(tmp_path / "a")]) == 0
    assert kiln_main(["convert", *base, "--workers", "4", "--output_dir", str(tmp_path / "b")]) == 0
    for rank in range(2):
        name = f"rank{rank}.safetensors"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert kiln_main(["convert", *base, "--workers", "0", "--output_dir", str(tmp_path / "c")]) == 2
