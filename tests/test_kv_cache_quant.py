"""INT8 and FP8 KV cache end to end on tiny DBRX (RoPE, GQA, MoE) and MPT (ALiBi) checkpoints: calibration (scales
against an amax taken independently from transformers' MPT), the checkpoint and memory plan, and generation through
prefill, decode, chunked prefill, prefix reuse, beams and preemption against a reference that applies the same
quantization: the float engine whose cache write stores quantize -> dequantize of each key and value (exact on the
torch path). Triton's kernels (interpreted on the CPU) are checked the same way in test_kv_cache_quant_triton.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kiln
from fixtures_kv_cache import FORMATS, calib_text, convert_build, tiny_hf_dir
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_runtime import BLOCK, PROMPTS
from kiln.cli.main import main as kiln_main
from kiln.kernels import reference
from kiln.quant import kv_cache as kvq

CALIB = ["--calib_size", "6", "--calib_max_seq_length", "24"]
GREEDY = kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
BEAMS = kiln.SamplingParams(max_tokens=6, num_beams=3, n=2, ignore_eos=True)


@pytest.fixture(scope="module", params=["dbrx", "mpt"])
def engines(request, tmp_path_factory) -> dict[str, Path]:
    """The float, INT8-KV and FP8-KV engines of one tiny checkpoint (and its directory under "hf")."""
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = tiny_hf_dir(tmp, request.param)
    calib = ["--calib_dataset", str(calib_text(tmp)), *CALIB]
    out = {"hf": model_dir, "float": convert_build(tmp / "float", model_dir)}
    for name, flag in FORMATS.items():
        out[name] = convert_build(tmp / name, model_dir, flag, *calib)
    return out


def layer_scales(engine: Path) -> dict[int, kvq.KVScales]:
    """{layer: its KVScales} as the engine's rank file stores them."""
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        names = [n for n in f.keys() if n.endswith(".attn.k_scale")]
        return {int(n.split(".")[1]): kvq.KVScales.from_scales(f.get_tensor(n), f.get_tensor(n[:-7] + "v_scale"))
                for n in names}


def fake_quant_llm(float_engine: Path, quant_engine: Path, **kwargs) -> kiln.LLM:
    """The float engine whose cache write stores dequantize(quantize(x)) with the quantized engine's scales: the
    values the quantized engine's attention reads, held in float32."""
    llm = kiln.LLM(float_engine, device="cpu", kernel_backend="torch", **kwargs)
    cache_dtype = kvq.kv_cache_dtype(kiln.LLM(quant_engine, device="cpu").info.quant, torch.float32)
    scales = layer_scales(quant_engine)
    by_cache = {id(attn.k_cache): scales[i] for i, attn in enumerate(llm.runner.model.attention_layers())}

    def write(key, value, k_cache, v_cache, slots, kv_scales=None):
        s = by_cache[id(k_cache)]
        k = kvq.dequantize(kvq.quantize(key, s.k_inv, cache_dtype), s.k_scale)
        v = kvq.dequantize(kvq.quantize(value, s.v_inv, cache_dtype), s.v_scale)
        reference.write_kv_cache(k, v, k_cache, v_cache, slots)

    llm.runner.kernels = dataclasses.replace(llm.runner.kernels, write_kv_cache=write)
    return llm


def outputs(llm: kiln.LLM, prompts, params) -> list[tuple[list[int], list]]:
    return [(o.token_ids, o.token_logprobs) for r in llm.generate(prompts, params) for o in r.outputs]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_generation_matches_the_same_quantization_applied_in_torch(engines, fmt):
    """Prefill and decode of a batch whose longer prompts are chunked (6-token steps), then prompts sharing cached
    prefix blocks, then beams: token for token and log-prob for log-prob."""
    quant = kiln.LLM(engines[fmt], device="cpu", kernel_backend="torch")
    assert quant.runner.model.attention_layers()[0].k_cache.dtype == kvq.KV_CACHE_FORMATS[fmt.upper()].dtype
    ref = fake_quant_llm(engines["float"], engines[fmt])
    assert outputs(quant, PROMPTS, GREEDY) == outputs(ref, PROMPTS, GREEDY)
    shared = [PROMPTS[2][:8] + [7, 9], PROMPTS[2][:8] + [300, 301, 302]]  # two full blocks cached by PROMPTS[2]
    blocks = quant.engine.scheduler.block_manager
    hits_before = blocks.num_prefix_hit_tokens
    assert outputs(quant, shared, GREEDY) == outputs(ref, shared, GREEDY)
    assert blocks.num_prefix_hit_tokens >= hits_before + 2 * 8  # both read PROMPTS[2]'s two quantized blocks
    assert outputs(quant, PROMPTS[:2], BEAMS) == outputs(ref, PROMPTS[:2], BEAMS)


def test_preemption_recomputes_into_the_quantized_cache(engines):
    """14 blocks of 4 tokens hold two finished sequences: the scheduler preempts and recomputes, and each
    prompt's tokens are what it gets alone."""
    probe = kiln.LLM(engines["int8"], device="cpu")
    block_bytes = probe.runner.plan.kv_bytes_per_token * BLOCK
    tight = kiln.LLM(engines["int8"], device="cpu", kv_cache_bytes=14 * block_bytes)
    assert tight.runner.num_blocks == 14
    alone = [outputs(probe, [p], GREEDY)[0][0] for p in PROMPTS]
    assert [t for t, _ in outputs(tight, PROMPTS, GREEDY)] == alone


def test_quantized_kv_stays_close_to_float(engines):
    """Sanity of the calibration: the 8-bit caches' next-token log-probs stay near the float cache's."""
    prompt = PROMPTS[2]
    base = kiln.LLM(engines["float"], device="cpu").score(prompt).log_softmax(-1)
    for fmt in FORMATS:
        got = kiln.LLM(engines[fmt], device="cpu").score(prompt).log_softmax(-1)
        assert (got.exp() - base.exp()).abs().max() < 0.05, fmt


def test_checkpoint_records_the_format_and_calibration(engines):
    for fmt in FORMATS:
        config = json.loads((engines[fmt] / "config.json").read_text())
        assert config["quantization"]["kv_cache_quant_algo"] == fmt.upper()
        summary = config["provenance"]["kv_cache_calibration"]
        assert summary["samples"] == 6 and summary["tokens_per_sample"] == 24 and not summary["per_head"]
    float_plan = json.loads((engines["float"] / "config.json").read_text())["memory_plan"]
    for fmt in FORMATS:  # 1 byte per element instead of float32's 4
        plan = json.loads((engines[fmt] / "config.json").read_text())["memory_plan"]
        assert plan["kv_bytes_per_token"] * 4 == float_plan["kv_bytes_per_token"]
    # Both formats saw the same amax: the scales differ by the formats' ranges only.
    int8, fp8 = layer_scales(engines["int8"]), layer_scales(engines["fp8"])
    for layer in int8:
        torch.testing.assert_close(int8[layer].k_scale * 127, fp8[layer].k_scale * 448)
        torch.testing.assert_close(int8[layer].v_scale * 127, fp8[layer].v_scale * 448)


def mpt_amax_from_transformers(model_dir: Path, text: Path, windows: int, length: int) -> list[tuple[float, float]]:
    """Per layer (amax |K|, amax |V|) over the calibration windows, from transformers' MPT: its fused Wqkv output
    (clipped as clip_qkv says; MPT has no RoPE, so these are the cached values)."""
    from transformers import AutoModelForCausalLM

    from kiln.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)[: windows * length]
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    d = model.config.d_model
    found: list[tuple[float, float]] = []
    hooks = [block.attn.Wqkv.register_forward_hook(
        lambda _m, _i, out: found.append((out[..., d:2 * d].abs().max().item(), out[..., 2 * d:].abs().max().item())))
        for block in model.transformer.blocks]
    with torch.no_grad():
        model(torch.tensor(ids).view(windows, length))
    for hook in hooks:
        hook.remove()
    return found


def test_mpt_scales_are_the_calibration_texts_amax(tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    text = calib_text(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["attn_config"].get("clip_qkv") is None  # else the hook above would need the clamp
    convert_build(tmp_path / "int8", model_dir, "--int8_kv_cache", "--calib_dataset", str(text), *CALIB)
    want = mpt_amax_from_transformers(model_dir, text, 6, 24)
    scales = layer_scales(tmp_path / "int8" / "engine")
    for layer, (k_amax, v_amax) in enumerate(want):
        assert torch.allclose(scales[layer].k_scale, torch.tensor(k_amax / 127), rtol=1e-5)
        assert torch.allclose(scales[layer].v_scale, torch.tensor(v_amax / 127), rtol=1e-5)


def test_per_head_scales(tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    calib = ["--calib_dataset", str(calib_text(tmp_path)), *CALIB]
    convert_build(tmp_path / "layer", model_dir, "--int8_kv_cache", *calib)
    convert_build(tmp_path / "head", model_dir, "--int8_kv_cache", "--per_head_kv_scales", *calib)
    per_layer, per_head = layer_scales(tmp_path / "layer" / "engine"), layer_scales(tmp_path / "head" / "engine")
    for layer in per_layer:
        assert per_layer[layer].k_scale.unique().numel() == 1
        assert per_head[layer].k_scale.unique().numel() > 1
        assert torch.equal(per_head[layer].k_scale.max().expand(6), per_layer[layer].k_scale)
    tokens = outputs(kiln.LLM(tmp_path / "head" / "engine", device="cpu"), PROMPTS[:3], GREEDY)
    assert all(len(t) == GREEDY.max_tokens for t, _ in tokens)


def test_tensor_parallel_engine_matches_one_rank(tmp_path):
    """tp 2 (gloo on the CPU): each rank holds its kv heads' per-head scales; greedy tokens equal one rank's."""
    model_dir = tiny_hf_dir(tmp_path, "dbrx")  # 4 heads, 2 kv heads: one kv head and its scales per rank
    calib = ["--int8_kv_cache", "--per_head_kv_scales", "--calib_dataset", str(calib_text(tmp_path)), *CALIB]
    one = convert_build(tmp_path / "tp1", model_dir, *calib)
    two = convert_build(tmp_path / "tp2", model_dir, *calib, "--tp_size", "2")
    full = layer_scales(one)
    for rank in range(2):
        with safe_open(str(two / f"rank{rank}.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("layers.0.attn.k_scale"), full[0].k_scale[rank:rank + 1])
    assert full[0].k_scale[0] != full[0].k_scale[1]  # per head: a swapped shard would show
    want = [t for t, _ in outputs(kiln.LLM(one, device="cpu"), PROMPTS, GREEDY)]
    with kiln.LLM(two, device="cpu") as llm:
        assert [t for t, _ in outputs(llm, PROMPTS, GREEDY)] == want


@pytest.mark.parametrize("argv, message", [
    (["--int8_kv_cache", "--fp8_kv_cache"], "both an INT8 and an FP8 KV cache"),
    (["--kv_cache_dtype", "fp16"], "--kv_cache_dtype fp16 is not one kiln runs"),
    (["--calib_size", "8"], "--calib_size: this quantization is not implemented"),  # without a KV cache to calibrate
    (["--int8_kv_cache", "--calib_dataset", "no_such_file.txt"], "no_such_file.txt is not a file"),
    (["--int8_kv_cache", "--calib_dataset", str(kvq.__file__).replace("quant/kv_cache.py", "eval/data/heldout.txt")],
     "is the held-out text that kiln perplexity measures on"),
    (["--int8_kv_cache", "--calib_size", "0"], "--calib_size must be >= 1"),
])
def test_bad_kv_cache_flags_are_one_line(argv, message, tmp_path, capsys):
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "c").exists()


def test_build_int8_kv_cache_flag_needs_a_calibrated_checkpoint(tmp_path, capsys):
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(tmp_path / "c")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "e"),
                      "--int8_kv_cache"]) == 2
    assert "was converted with no KV-cache quantization; convert with --int8_kv_cache" in capsys.readouterr().err


def test_dummy_weights_and_bench_get_an_8bit_cache(tmp_path):
    """Dummy weights have nothing to calibrate on: unit scales (amax 1), and `kiln bench --kv_cache_dtype`."""
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--fp8_kv_cache", "--output_dir", str(tmp_path / "c")]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["provenance"]["kv_cache_calibration"]["unit_scales"]
    with safe_open(str(tmp_path / "c" / "rank0.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("layers.0.attn.v_scale"), torch.full((config["num_key_value_heads"],),
                                                                              1 / 448.0).to(f.get_tensor(
                                                                                  "layers.0.attn.v_scale").dtype))
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--kv_cache_dtype", "int8", "--batch_size", "2",
                      "--input_len", "8", "--output_len", "3", "--device", "cpu", "--no_tune", "--warmup", "0",
                      "--output_json", str(tmp_path / "b.json")]) == 0
    engine = json.loads((tmp_path / "b.json").read_text())["engine"]
    layers, kv_heads, head = config["num_hidden_layers"], config["num_key_value_heads"], config["head_size"]
    assert engine["kv_cache_quant_algo"] == "INT8" and engine["kv_bytes_per_token"] == 2 * layers * kv_heads * head


def test_quantize_and_one_step_build_calibrate_too(tmp_path):
    """quantize.py's --kv_cache_dtype (with int8_wo) and the legacy one-step build's --int8_kv_cache (default
    calibration: the shipped text)."""
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    assert kiln_main(["quantize", "--model_dir", str(model_dir), "--qformat", "int8_wo", "--kv_cache_dtype", "fp8",
                      "--calib_dataset", str(calib_text(tmp_path)), "--calib_size", "4", "--calib_max_seq_length",
                      "16", "--device", "cpu", "--output_dir", str(tmp_path / "q")]) == 0
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == ("W8A16", "FP8")
    assert kiln_main(["build", "--model_dir", str(model_dir), "--int8_kv_cache", "--output_dir", str(tmp_path / "e"),
                      "--max_input_len", "24", "--max_seq_len", "48"]) == 0
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == "INT8"
    assert config["provenance"]["kv_cache_calibration"]["text"] == "calibration.txt"
    tokens = outputs(kiln.LLM(tmp_path / "e", device="cpu"), PROMPTS[:2], GREEDY)
    assert all(len(t) == GREEDY.max_tokens for t, _ in tokens)


def test_published_fp8_kv_scales_are_loaded_not_recalibrated(tmp_path, capsys):
    """A checkpoint that carries vLLM's per-layer k_scale/v_scale (as llm-compressor writes them): --fp8_kv_cache
    takes them as they are; a plain convert leaves them unread; a checkpoint missing some is refused."""
    cfg = mpt_published_config(vocab_size=512)
    state = published_state(hf_mpt_model(cfg))
    published = {f"transformer.blocks.{i}.attn.{w}": torch.tensor(0.01 * (i + 1) + (0.005 if w == "v_scale" else 0))
                 for i in range(cfg["n_layers"]) for w in ("k_scale", "v_scale")}
    model_dir = save_checkpoint({**state, **published}, cfg, tmp_path / "hf")
    engine = convert_build(tmp_path / "fp8", model_dir, "--fp8_kv_cache")
    config = json.loads((engine / "config.json").read_text())
    assert config["provenance"]["kv_cache_calibration"] == {"text": None, "published_scales": True}
    for layer, scales in layer_scales(engine).items():
        assert torch.allclose(scales.k_scale, torch.full((6,), 0.01 * (layer + 1)))
        assert torch.allclose(scales.v_scale, torch.full((6,), 0.01 * (layer + 1) + 0.005))
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "plain")]) == 0
    del published["transformer.blocks.1.attn.v_scale"]
    broken = save_checkpoint({**state, **published}, cfg, tmp_path / "broken")
    assert kiln_main(["convert", "--model_dir", str(broken), "--fp8_kv_cache", "--output_dir",
                      str(tmp_path / "b")]) == 2
    assert "lacks transformer.blocks.1.attn.v_scale" in capsys.readouterr().err


def test_build_reports_twice_the_tokens_of_bf16(tmp_path, capsys):
    """`kiln build --memory_gib` counts the 8-bit cache: twice the KV tokens of a bf16 cache fit."""
    fit = {}
    for name, flags in (("bf16", []), ("int8", ["--int8_kv_cache"]), ("fp8", ["--fp8_kv_cache"])):
        assert kiln_main(["convert", "--preset", "mpt-tiny", "--dtype", "bfloat16", *flags, "--output_dir",
                          str(tmp_path / name / "c")]) == 0
        capsys.readouterr()
        assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / name / "c"), "--output_dir",
                          str(tmp_path / name / "e"), "--memory_gib", "1", "--no_tune"]) == 0
        out = capsys.readouterr().out
        fit[name] = int(out.split("in 1 GiB per rank: ")[1].split(" KV tokens fit")[0])
        assert ("1 byte per element" in out) == bool(flags)
    assert abs(fit["int8"] - 2 * fit["bf16"]) <= 1 and fit["fp8"] == fit["int8"]
