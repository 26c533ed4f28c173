"""Published AutoGPTQ / AutoAWQ checkpoints loaded by `kiln convert`: tiny MPT and Baichuan checkpoints written in
the published layouts by this test's OWN packers (from the formats' descriptions in docs/quantization.md, not kiln's
functions), converted, built and run; each engine must give the logits of a float model whose weights are the
dequantized published weights.

The formats, as the packers here write them (w[o, k] = (q[k, o] - zero[g(k), o]) * scale[g(k), o]):
- GPTQ: qweight int32 [in * bits / 32, out], 32 / bits values per word along the input dim, lowest bits first;
  qzeros int32 [groups, out * bits / 32] packed the same way along the output dim, holding zero - 1 for
  checkpoint_format "gptq" (v1) and zero for "gptq_v2"; scales float16 [groups, out]; g_idx int32 [in] = k // G
  (group_size -1: one group).
- AWQ GEMM: qweight int32 [in, out / 8] and qzeros int32 [groups, out / 8], eight nibbles per word along the output
  dim, the nibble at shift 4 * i holding column 8 * j + (0, 2, 4, 6, 1, 3, 5, 7)[i]; scales float16 [groups, out].
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures_baichuan import BaichuanReference, make_baichuan_checkpoint, save_published
from fixtures_mpt import mpt_published_config, random_state, reference_greedy, reference_logits, save_checkpoint
from test_quant_group_wise import build, check_scores, one_error_line
from kiln.cli.main import main as kiln_main

MPT_LINEARS = ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")
BAICHUAN_LINEARS = ("self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_SLOT_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 tensor with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int64 values -> int32 words of 32 / bits values each along `dim`, the first value in the lowest bits."""
    per = 32 // bits
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    words = sum(v[..., j] << (bits * j) for j in range(per))
    return to_int32(words).movedim(-1, dim)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] int64 nibbles -> [rows, cols / 8] int32 in AWQ's interleaved order."""
    v = values.reshape(values.shape[0], -1, 8)
    return to_int32(sum(v[..., AWQ_SLOT_COLUMN[i]] << (4 * i) for i in range(8)))


def random_layer(out: int, inp: int, bits: int, group: int, sym: bool, gen: torch.Generator,
                 order: torch.Tensor | None = None):
    """Random published values: q [in, out], zero [groups, out], scale [groups, out] float16, g_idx [in], and the
    float weight [out, in] they stand for. v1 zeros avoid 0 (AutoGPTQ's v1 cannot store it). `order` (act-order):
    the inputs in the order GPTQ quantized them, so input order[i] is in group i // G."""
    g = inp if group == -1 else group
    groups = -(-inp // g)
    top = 2**bits
    q = torch.randint(0, top, (inp, out), generator=gen)
    zero = torch.full((groups, out), top // 2) if sym else torch.randint(1, top, (groups, out), generator=gen)
    scale = ((torch.rand(groups, out, generator=gen) + 0.5) * (0.16 / top)).half()
    gk = torch.arange(inp) // g
    if order is not None:
        gk = torch.empty_like(gk)
        gk[order] = torch.arange(inp) // g
    w = ((q - zero[gk]).double() * scale[gk].double()).t().float()  # [out, in]
    return q, zero, scale, gk, w


def publish(state: dict, prefixes: list[str], fmt: dict, seed: int) -> tuple[dict, dict]:
    """(published tensors, float reference state): each linear `<prefix>.weight` replaced by its packed tensors."""
    gen = torch.Generator().manual_seed(seed)
    published, reference = dict(state), dict(state)
    bits, group, sym = fmt.get("bits", 4), fmt["group_size"], fmt.get("sym", False)
    orders: dict[str, torch.Tensor] = {}  # act-order: linears of one module (gate, up) share their inputs' order
    for prefix in prefixes:
        out, inp = state[prefix + ".weight"].shape
        order = orders.setdefault(f"{prefix.rsplit('.', 1)[0]}/{inp}", torch.randperm(inp, generator=gen)) \
            if fmt.get("desc_act") else None
        q, zero, scale, gk, w = random_layer(out, inp, bits, group, sym, gen, order)
        del published[prefix + ".weight"]
        reference[prefix + ".weight"] = w
        if fmt["quant_method"] == "awq":
            parts = {"qweight": pack_awq(q), "qzeros": pack_awq(zero), "scales": scale}
        else:
            stored = zero - 1 if fmt.get("checkpoint_format", "gptq") == "gptq" else zero
            parts = {"qweight": pack_words(q, bits, 0), "qzeros": pack_words(stored, bits, 1), "scales": scale,
                     "g_idx": gk.to(torch.int32)}
        published.update({f"{prefix}.{k}": v for k, v in parts.items()})
    return published, reference


def convert_and_build(tmp: Path, hf_dir: Path, tp: int, *extra: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp / "ckpt"), "--dtype",
                      "float32", "--tp_size", str(tp), *extra]) == 0
    return build(tmp)


GPTQ = {"quant_method": "gptq", "desc_act": False}
MPT_CASES = [  # (format, tp): v1 and v2 zeros, sym and asym, 4 and 8 bit, groups 32 / 64 / -1, AWQ
    ({**GPTQ, "bits": 4, "group_size": 32, "sym": False}, 1),
    ({**GPTQ, "bits": 4, "group_size": 64, "sym": True, "checkpoint_format": "gptq_v2"}, 2),
    ({**GPTQ, "bits": 8, "group_size": -1, "sym": True}, 1),
    ({**GPTQ, "bits": 8, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"}, 2),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}, 2),
    ({**GPTQ, "bits": 4, "group_size": 32, "sym": False, "desc_act": True}, 2),  # shuffled g_idx, row-parallel cut
]


@pytest.mark.parametrize("fmt, tp", MPT_CASES)
def test_mpt_published_checkpoint_runs_its_dequantized_weights(fmt, tp, tmp_path):
    cfg = mpt_published_config()  # d_model 48, ffn 192: groups of 32 leave a short last group; tp 2 cuts a group
    prefixes = [f"transformer.blocks.{i}.{n}" for i in range(cfg["n_layers"]) for n in MPT_LINEARS]
    published, reference = publish(random_state(cfg), prefixes, fmt, seed=1)
    hf_dir = save_checkpoint(published, {**cfg, "quantization_config": fmt}, tmp_path / "hf")
    engine = convert_and_build(tmp_path, hf_dir, tp)
    check_scores(engine, lambda p: reference_logits(reference, cfg, p),
                 lambda p: reference_greedy(reference, cfg, p, 6))


BAICHUAN_CASES = [
    ("v2_13b", {**GPTQ, "bits": 4, "group_size": 32, "sym": False}, 2),
    ("v2_7b", {**GPTQ, "bits": 4, "group_size": -1, "sym": False, "checkpoint_format": "gptq_v2"}, 1),
    ("v1_13b", {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "GEMM"}, 1),
    ("v2_7b", {**GPTQ, "bits": 8, "group_size": 32, "sym": True, "desc_act": True,
               "checkpoint_format": "gptq_v2"}, 2),
]


@pytest.mark.parametrize("version, fmt, tp", BAICHUAN_CASES)
def test_baichuan_published_checkpoint_runs_its_dequantized_weights(version, fmt, tp, tmp_path):
    """Baichuan's gate and up are fused into one kiln weight: their values, scales and zeros concatenate."""
    _, state, cfg = make_baichuan_checkpoint(tmp_path / "float", version)
    prefixes = [f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in BAICHUAN_LINEARS]
    published, reference = publish(state, prefixes, fmt, seed=2)
    hf_dir = save_published(published, cfg, tmp_path / "hf", "safetensors", 2)
    (hf_dir / "quantize_config.json").write_text(json.dumps(fmt))  # AutoGPTQ's own file (AWQ: read the same way)
    engine = convert_and_build(tmp_path, hf_dir, tp, "--model_version", version)
    ref = BaichuanReference(reference, cfg, version)
    check_scores(engine, ref.logits, lambda p: ref.greedy(p, 6))


@pytest.mark.parametrize("fmt, named", [
    ({**GPTQ, "bits": 3, "group_size": 32}, "4- and 8-bit GPTQ, not 3-bit"),
    ({**GPTQ, "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "checkpoint_format \"marlin\""),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "4-bit GEMM packing"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "cannot load this published quantization"),
])
def test_formats_kiln_cannot_run_exactly_are_refused_by_name(fmt, named, tmp_path, capsys):
    cfg = mpt_published_config()
    hf_dir = save_checkpoint(random_state(cfg), {**cfg, "quantization_config": fmt}, tmp_path / "hf")
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "is a quantized checkpoint" in line and named in line, line
    assert not (tmp_path / "out").exists()


def mpt_gptq_checkpoint(tmp: Path, change=None) -> Path:
    cfg = mpt_published_config()
    fmt = {**GPTQ, "bits": 4, "group_size": 32, "sym": False}
    prefixes = [f"transformer.blocks.{i}.{n}" for i in range(cfg["n_layers"]) for n in MPT_LINEARS]
    published, _ = publish(random_state(cfg), prefixes, fmt, seed=4)
    if change is not None:
        change(published, random_state(cfg))
    return save_checkpoint(published, {**cfg, "quantization_config": fmt}, tmp / "hf")


def leave_one_layer_float(published: dict, floats: dict) -> None:
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        del published[f"transformer.blocks.1.ffn.up_proj.{part}"]
    published["transformer.blocks.1.ffn.up_proj.weight"] = floats["transformer.blocks.1.ffn.up_proj.weight"]


def float_scales_as_int(published: dict, floats: dict) -> None:
    published["transformer.blocks.0.attn.Wqkv.qweight"] = published["transformer.blocks.0.attn.Wqkv.qweight"].float()


@pytest.mark.parametrize("change, flags, named", [
    (leave_one_layer_float, [], "transformer.blocks.1.ffn.up_proj.weight is not quantized"),
    (float_scales_as_int, [], "transformer.blocks.0.attn.Wqkv holds qweight torch.float32"),
    (None, ["--use_weight_only", "--weight_only_precision", "int4_gptq"], "is already quantized (W4A16_GPTQ)"),
])
def test_published_checkpoint_problems_are_one_line(change, flags, named, tmp_path, capsys):
    hf_dir = mpt_gptq_checkpoint(tmp_path, change)
    argv = ["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "out"), *flags]
    assert kiln_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # A damaged tensor is found while reading (after tqdm's lines); the rest before any tensor is read.
    assert named in err[-1] and "Traceback" not in "".join(err) and (len(err) == 1) != (change is float_scales_as_int)
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("desc_act, tp, one_step", [(False, 2, False), (True, 1, False), (False, 1, True)])
def test_gptq_for_llama_file_beside_the_float_checkpoint(desc_act, tp, one_step, tmp_path):
    """Baichuan's README: `--quant_ckpt_path ./baichuan-2-13b-4bit-gs64.safetensors`: GPTQ-for-LLaMa's one file of v1
    tensors under the Hugging Face names, beside the float checkpoint (config, tokenizer, unquantized layers)."""
    from safetensors.torch import save_file

    hf_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b")
    prefixes = [f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in BAICHUAN_LINEARS]
    fmt = {**GPTQ, "bits": 4, "group_size": 32, "sym": False, "desc_act": desc_act}
    published, reference = publish(state, prefixes, fmt, seed=5)
    quantized = {n: t.contiguous() for n, t in published.items() if n.rsplit(".", 1)[0] in prefixes}
    save_file(quantized, str(tmp_path / "baichuan-2-13b-4bit-gs32.safetensors"))
    flags = ["--model_version", "v2_13b", "--quant_ckpt_path", str(tmp_path / "baichuan-2-13b-4bit-gs32.safetensors"),
             "--use_weight_only", "--weight_only_precision", "int4_gptq", "--per_group", "--group_size", "32"]
    if one_step:  # the legacy build.py's spelling: kiln build --model_dir ... --quant_ckpt_path ...
        engine = tmp_path / "engine"
        assert kiln_main(["build", "--model_dir", str(hf_dir), "--output_dir", str(engine), "--dtype", "float32",
                          "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64", *flags]) == 0
    else:
        engine = convert_and_build(tmp_path, hf_dir, tp, *flags)
    ref = BaichuanReference(reference, cfg, "v2_13b")
    check_scores(engine, ref.logits, lambda p: ref.greedy(p, 6))
    if one_step:
        return
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["group_size"], quant["act_order"]) == ("W4A16_GPTQ", 32, desc_act)


def test_quant_ckpt_path_without_the_float_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--use_weight_only", "--weight_only_precision", "int4_gptq",
                      "--quant_ckpt_path", "x.safetensors"]) == 2
    assert "--quant_ckpt_path needs --model_dir" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
