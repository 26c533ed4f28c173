"""DBRX against transformers' DbrxForCausalLM: logits and greedy tokens, through the CLI and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kiln
from fixtures_dbrx import dbrx_published_config, hf_dbrx_model, make_dbrx_checkpoint, save_published
from fixtures_tokenizers import build_neox_tokenizer_dir
from kiln.cli.main import main as kiln_main

PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [42]]


def convert_build(tmp: Path, model_dir: Path, *extra: str, build_args: tuple[str, ...] = ()) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), *extra]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "64", "--max_seq_len", "128", *build_args]) == 0
    return tmp / "engine"


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def dbrx_fp32(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dbrx")
    model_dir, hf, cfg = make_dbrx_checkpoint(tmp)
    engine = convert_build(tmp, model_dir)
    return engine, hf, model_dir


def test_config_reads_theta_from_attn_config(dbrx_fp32):
    engine, _, _ = dbrx_fp32
    config = json.loads((engine / "config.json").read_text())
    assert config["rotary_base"] == 500000.0  # not transformers' silent 10000 (model-facts.md §1 (a))
    assert config["clip_qkv"] == 0.4 and config["moe_top_k"] == 2 and config["num_key_value_heads"] == 2


def test_logits_match_transformers_fp32(dbrx_fp32):
    engine, hf, _ = dbrx_fp32
    llm = kiln.LLM(engine)
    for prompt in PROMPTS:
        ours = llm.score(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert ours.shape == ref.shape
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, f"relative logit error {rel:.2e}"


def test_wrong_theta_would_be_caught(dbrx_fp32, tmp_path):
    """The logits test can tell theta 500000 from 10000: the same weights with transformers' default differ."""
    engine, hf, _ = dbrx_fp32
    cfg = dbrx_published_config()
    wrong = hf_dbrx_model(cfg)
    rotaries = [m for m in wrong.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    assert rotaries  # one model-wide module in transformers 5, one per attention layer in 4.x
    for rotary in rotaries:
        rotary.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    wrong.load_state_dict(hf.state_dict())
    prompt = PROMPTS[2]
    with torch.no_grad():
        diff = (wrong(torch.tensor([prompt])).logits - hf(torch.tensor([prompt])).logits).abs().max()
    assert diff > 1e-3


def test_greedy_batch_matches_transformers_python_api(dbrx_fp32):
    engine, hf, _ = dbrx_fp32
    llm = kiln.LLM(engine)
    outs = llm.generate(PROMPTS, kiln.SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("layout", ["single", "bin"])
def test_other_checkpoint_layouts(tmp_path, layout):
    cfg = dbrx_published_config()
    hf = hf_dbrx_model(cfg, seed=3)
    model_dir = save_published(hf, cfg, tmp_path / "hf", shards=1, fmt="bin" if layout == "bin" else "safetensors")
    llm = kiln.LLM(convert_build(tmp_path, model_dir))
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert torch.allclose(llm.score(PROMPTS[0]), ref, rtol=1e-4, atol=1e-4)


def test_bf16_within_bf16_noise(tmp_path):
    """kiln in bf16 is as close to the fp32 model as transformers in bf16 is (both against fp32 transformers)."""
    cfg = dbrx_published_config()
    hf = hf_dbrx_model(cfg, seed=1)
    model_dir = save_published(hf, cfg, tmp_path / "hf")
    llm = kiln.LLM(convert_build(tmp_path, model_dir, "--dtype", "bfloat16"))
    hf_bf16 = hf_dbrx_model(cfg, seed=1).to(torch.bfloat16)
    hf_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()})
    for prompt in PROMPTS[:3]:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
            ref_bf16 = hf_bf16(torch.tensor([prompt])).logits[0].float()
        ours = llm.score(prompt)
        hf_err = (ref_bf16 - ref).abs().max()
        our_err = (ours - ref).abs().max()
        assert our_err < 2 * hf_err + 0.02 * ref.abs().max(), (our_err, hf_err)
        assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


def test_cli_end_to_end_with_tokenizer(tmp_path):
    """convert -> build -> run with text prompts of different lengths, batched; --output_json against transformers
    run prompt by prompt on the same token ids."""
    model_dir, hf, _ = make_dbrx_checkpoint(tmp_path, seed=2, vocab_size=512)
    tok_dir = build_neox_tokenizer_dir(tmp_path / "tok", chat_template=False)
    engine = convert_build(tmp_path, model_dir)
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "a"]
    out_json, out_csv, out_npy = tmp_path / "out.json", tmp_path / "out.csv", tmp_path / "out.npy"
    assert kiln_main(["run", "--engine_dir", str(engine), "--tokenizer_dir", str(tok_dir), "--input_text", *texts,
                      "--max_output_len", "20", "--ignore_eos", "--output_json", str(out_json),
                      "--output_csv", str(out_csv), "--output_npy", str(out_npy),
                      "--output_log_probs_npy", str(tmp_path / "lp.npy"),
                      "--output_cum_log_probs_npy", str(tmp_path / "cum.npy"),
                      "--output_logits_npy", str(tmp_path / "logits.npy")]) == 0
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    results = json.loads(out_json.read_text())
    assert len(results) == len(texts)
    import numpy as np

    npy = np.load(out_npy)
    log_probs, cum_log_probs = np.load(tmp_path / "lp.npy"), np.load(tmp_path / "cum.npy")
    step_logits = np.load(tmp_path / "logits_generation.npy")  # [prompts, 1, 20, vocab]: raw logits of each step
    for i, (text, result) in enumerate(zip(texts, results)):
        ids = ref_tok(text)["input_ids"]
        assert result["input_ids"] == ids
        expected = hf_greedy(hf, ids, 20)
        assert result["output_ids"] == [expected]
        assert result["text"] == [ref_tok.decode(expected, skip_special_tokens=True)]
        assert npy[i, : len(ids) + 20].tolist() == ids + expected
        with torch.no_grad():  # the log-prob of each chosen token under transformers' distribution
            logits = hf(torch.tensor([ids + expected])).logits[0, len(ids) - 1: -1].float()
        ref_lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(expected)[:, None])[:, 0]
        torch.testing.assert_close(torch.from_numpy(step_logits[i, 0]), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(log_probs[i, 0]), ref_lp, rtol=0, atol=1e-4)
        assert abs(float(cum_log_probs[i, 0]) - float(ref_lp.sum())) < 1e-3
    assert log_probs.shape == (len(texts), 1, 20) and cum_log_probs.shape == (len(texts), 1)
    assert step_logits.shape == (len(texts), 1, 20, 512)
    # run.py's X_context.npy: every prompt position's logits, prompts concatenated [sum of prompt lengths, vocab]
    context = np.load(tmp_path / "logits_context.npy")
    with torch.no_grad():
        ref_context = torch.cat([hf(torch.tensor([r["input_ids"]])).logits[0].float() for r in results])
    torch.testing.assert_close(torch.from_numpy(context), ref_context, rtol=1e-4, atol=1e-4)
    assert len(out_csv.read_text().splitlines()) == len(texts)


def test_streaming_matches_generate(dbrx_fp32):
    engine, _, _ = dbrx_fp32
    llm = kiln.LLM(engine)
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0)
    streamed: dict[int, list[int]] = {}
    for delta in llm.stream(PROMPTS, params):
        streamed.setdefault(delta.request_id, []).append(delta.token_id)
    full = llm.generate(PROMPTS, params)
    assert [streamed[i] for i in range(len(PROMPTS))] == [o.outputs[0].token_ids for o in full]


def test_seeded_sampling_is_reproducible(dbrx_fp32):
    engine, _, _ = dbrx_fp32
    llm = kiln.LLM(engine)
    params = kiln.SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=7)
    alone = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    batched = llm.generate(PROMPTS, [params, kiln.SamplingParams(max_tokens=5, temperature=0.8), params,
                                     kiln.SamplingParams(max_tokens=3, temperature=0.0)])
    assert batched[0].outputs[0].token_ids == alone
    other = llm.generate([PROMPTS[0]], kiln.SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=8))
    assert other[0].outputs[0].token_ids != alone


def test_n_samples_of_a_seeded_request_differ_and_repeat(dbrx_fp32):
    engine, _, _ = dbrx_fp32
    llm = kiln.LLM(engine)
    params = kiln.SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=3)
    first = [o.token_ids for o in llm.generate([PROMPTS[0]], params)[0].outputs]
    again = [o.token_ids for o in llm.generate([PROMPTS[0]], params)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) == 3
