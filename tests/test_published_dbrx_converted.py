"""DBRX in the "converted" layout (LnL-AI/dbrx-base-converted-v2 and the AutoGPTQ checkpoints made from it): Wqkv
split into q_proj/k_proj/v_proj, each expert's w1/v1/w2 an nn.Linear of its own (`ffn.experts.mlp.<e>.w1.weight`
[ffn, d], `.v1.weight` [ffn, d], `.w2.weight` [d, ffn] = expert e's block of the fused w2, transposed), AutoGPTQ's
`auto_gptq/modeling/dbrx_converted.py` module names; the router, norms, embedding and head stay float.

This test splits a tiny transformers DbrxForCausalLM into that layout with its OWN code, replaces every quantized
Linear by random published GPTQ tensors (test_published_group_wise's packers, written from the format's description),
and checks kiln's engine against transformers' DbrxForCausalLM holding the dequantized weights, put back into the
fused layout by this test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_dbrx import dbrx_published_config, hf_dbrx_model, hf_scorers
from fixtures_mpt import save_checkpoint
from test_published_group_wise import GPTQ, convert_and_build, publish
from test_quant_group_wise import check_scores, one_error_line
from kiln.cli.main import main as kiln_main

ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def converted_state(model: torch.nn.Module, cfg: dict) -> dict[str, torch.Tensor]:
    """The fused published state -> the converted layout (float)."""
    experts, ffn, d = cfg["ffn_config"]["moe_num_experts"], cfg["ffn_config"]["ffn_hidden_size"], cfg["d_model"]
    kv = cfg["attn_config"]["kv_n_heads"] * d // cfg["n_heads"]
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        base = name.rsplit(".", 1)[0]
        if name.endswith("attn.Wqkv.weight"):
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), t.split([d, kv, kv])):
                out[f"{base[: -len('Wqkv')]}{part}.weight"] = rows.contiguous()
        elif ".ffn.experts.mlp." in name:
            w = t.view(experts, ffn, d)
            for e in range(experts):
                out[f"{name}.weight".replace("mlp.", f"mlp.{e}.")] = (w[e].t() if name.endswith("w2") else w[e]
                                                                      ).contiguous()
        else:
            out[name] = t
    return out


def fused_state(converted: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """The inverse: the converted layout's (dequantized) floats -> transformers' fused DBRX state."""
    experts = cfg["ffn_config"]["moe_num_experts"]
    state = {}
    for i in range(cfg["n_layers"]):
        attn, mlp = f"transformer.blocks.{i}.norm_attn_norm.attn", f"transformer.blocks.{i}.ffn.experts.mlp"
        state[f"{attn}.Wqkv.weight"] = torch.cat([converted[f"{attn}.{p}.weight"] for p in ATTN[:3]])
        for w in ("w1", "v1", "w2"):
            parts = [converted[f"{mlp}.{e}.{w}.weight"] for e in range(experts)]
            state[f"{mlp}.{w}"] = torch.cat([p.t() if w == "w2" else p for p in parts])
    split = (".attn.q_proj.", ".attn.k_proj.", ".attn.v_proj.", ".experts.mlp.")
    rest = {n: t for n, t in converted.items() if not any(s in n for s in split)}
    return {**rest, **state}


def quantized_prefixes(cfg: dict) -> list[str]:
    experts = cfg["ffn_config"]["moe_num_experts"]
    names = []
    for i in range(cfg["n_layers"]):
        names += [f"transformer.blocks.{i}.norm_attn_norm.attn.{p}" for p in ATTN]
        names += [f"transformer.blocks.{i}.ffn.experts.mlp.{e}.{w}" for e in range(experts) for w in ("w1", "v1", "w2")]
    return names


def converted_checkpoint(tmp: Path, fmt: dict | None, seed: int = 3, change=None, stated: dict | None = None):
    """(checkpoint dir, transformers model holding the weights the checkpoint stands for). `stated`: the
    quantization_config written to config.json when it differs from the one the tensors were packed with."""
    cfg = dbrx_published_config()
    model = hf_dbrx_model(cfg, seed)
    state = converted_state(model, cfg)
    if fmt is not None:
        state, reference = publish(state, quantized_prefixes(cfg), fmt, seed)
        model.load_state_dict(fused_state(reference, cfg))
    if change is not None:
        change(state)
    hf_cfg = {**cfg, "model_type": "dbrx_converted"}  # as AutoGPTQ dispatches the converted model
    if fmt is not None:
        hf_cfg["quantization_config"] = stated or fmt
    return save_checkpoint(state, hf_cfg, tmp / "hf"), model


def test_converted_float_layout_runs_as_the_fused_one(tmp_path):
    """The unquantized converted checkpoint (dbrx-base-converted-v2 itself) maps onto the same kiln weights."""
    hf_dir, model = converted_checkpoint(tmp_path, None)
    engine = convert_and_build(tmp_path, hf_dir, 1)
    check_scores(engine, *hf_scorers(model))


CASES = [  # (format, tp, extra convert flags): v1 and v2 zeros, 4 and 8 bit, groups 32 and -1, tp/ep over experts
    ({**GPTQ, "bits": 4, "group_size": 32, "sym": False}, 1, []),
    ({**GPTQ, "bits": 4, "group_size": 32, "sym": True, "checkpoint_format": "gptq_v2"}, 2, []),
    ({**GPTQ, "bits": 8, "group_size": -1, "sym": False}, 2, ["--moe_tp_mode", "1"]),
]


@pytest.mark.parametrize("fmt, tp, flags", CASES)
def test_converted_gptq_checkpoint_runs_its_dequantized_weights(fmt, tp, flags, tmp_path):
    """ffn 48 with groups of 32: w2's inputs end in a short group, and tp 2 (moe_tp_mode 2) cuts one."""
    hf_dir, model = converted_checkpoint(tmp_path, fmt)
    check_scores(convert_and_build(tmp_path, hf_dir, tp, *flags), *hf_scorers(model))
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"]
    # group_size -1: one group as wide as the widest input (64), a power of two for the fused MoE's kernels
    group = 32 if fmt["group_size"] > 0 else 64
    assert (quant["quant_algo"], quant["group_size"]) == (f"W{fmt['bits']}A16_GPTQ", group)
    experts = load_file(str(tmp_path / "ckpt" / "rank0.safetensors"))
    assert experts["layers.0.ffn.w13"].dtype == torch.int8 and "layers.0.ffn.w2_zero" in experts


def test_desc_act_with_plain_groups_runs_as_plain_groups(tmp_path):
    """desc_act true in the config, but every g_idx is k // G: nothing to permute, the fused MoE runs it."""
    fmt = {**GPTQ, "bits": 4, "group_size": 32, "sym": False}
    hf_dir, model = converted_checkpoint(tmp_path, fmt, stated={**fmt, "desc_act": True})
    engine = convert_and_build(tmp_path, hf_dir, 1)
    check_scores(engine, *hf_scorers(model))


def drop_expert(state: dict) -> None:
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        del state[f"transformer.blocks.1.ffn.experts.mlp.2.v1.{part}"]


def regroup_k_proj(state: dict) -> None:
    """k_proj packed with groups of 16 (4 groups over 64 inputs) while the config says 32."""
    prefix = "transformer.blocks.0.norm_attn_norm.attn.k_proj"
    scales = state[f"{prefix}.scales"]
    state[f"{prefix}.scales"] = scales.repeat_interleave(2, dim=0)
    state[f"{prefix}.qzeros"] = state[f"{prefix}.qzeros"].repeat_interleave(2, dim=0)
    state[f"{prefix}.g_idx"] = (torch.arange(64) // 16).to(torch.int32)


@pytest.mark.parametrize("fmt, change, named", [
    ({**GPTQ, "bits": 4, "group_size": 32}, drop_expert, "transformer.blocks.1.ffn.experts.mlp.2.v1"),
    ({**GPTQ, "bits": 4, "group_size": 16}, None, "group_size 16: kiln's fused MoE runs groups of 32, 64, 128"),
    ({**GPTQ, "bits": 4, "group_size": 32, "desc_act": True}, None,
     "transformer.blocks.0.ffn.experts.mlp.0.v1.g_idx is an act-order permutation"),
])
def test_what_the_fused_moe_cannot_run_is_one_line(fmt, change, named, tmp_path, capsys):
    hf_dir, _ = converted_checkpoint(tmp_path, fmt, change=change)
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert named in line and "Traceback" not in line, line
    assert not (tmp_path / "out").exists()


def resize_expert(state: dict) -> None:
    """Expert 1's w1 in layer 0 packed with 64 outputs (q_proj's tensors) where ffn is 48."""
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        state[f"transformer.blocks.0.ffn.experts.mlp.1.w1.{part}"] = \
            state[f"transformer.blocks.0.norm_attn_norm.attn.q_proj.{part}"].clone()


@pytest.mark.parametrize("change, named", [
    (regroup_k_proj, "k_proj.weight has 4 groups over 64 inputs, not groups of 32"),
    (resize_expert, "(64, 64): transformer.blocks.0.ffn.experts.mlp.1.w1.weight;"),
])
def test_damaged_layers_are_named_while_read(change, named, tmp_path, capsys):
    """Found while the fused weight is read (after convert's progress lines): the last line names the layer."""
    hf_dir, _ = converted_checkpoint(tmp_path, {**GPTQ, "bits": 4, "group_size": 32}, change=change)
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert named in err[-1], err
    assert "Traceback" not in "".join(err) and not (tmp_path / "out").exists()


def test_experts_of_another_size_than_the_config_are_named(tmp_path, capsys):
    hf_dir, _ = converted_checkpoint(tmp_path, {**GPTQ, "bits": 4, "group_size": 32})
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["ffn_config"]["ffn_hidden_size"] = 40  # the experts hold 48
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "shape mismatch for layers.0.ffn.w13: its quantized values are (4, 96, 64), but config.json implies " \
           "(4, 80, 64)" in err[-1], err
    assert not (tmp_path / "out").exists()


def test_an_edited_expert_count_is_one_line(tmp_path, capsys):
    hf_dir, _ = converted_checkpoint(tmp_path, None)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["ffn_config"]["moe_num_experts"] = 4000  # within the config bounds (4096)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "out")]) == 2
    assert "claims 4000 experts (ffn_config.moe_num_experts), but the checkpoint's tensors hold experts " \
           "0..3" in one_error_line(capsys)
