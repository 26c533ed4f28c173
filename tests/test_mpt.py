"""MPT against transformers' MptForCausalLM (what it implements) and against an independent float64 reference of
llm-foundry's MPT (GQA/MQA, qk_ln, biases, logit_scale, alibi_bias_max, softmax_scale, expansion_ratio, untied head):
logits and greedy tokens through the CLI and the Python API; refusals; both spellings; presets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import kiln
from fixtures_mpt import (hf_mpt_model, mpt_published_config, published_state, random_state, reference_greedy,
                          reference_logits, save_checkpoint)
from kiln.cli.main import main as kiln_main
from kiln.config import ConfigError
from kiln.models import PRESETS, family_for_architecture
from kiln.models.mpt import config_from_hf

PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [42]]


def convert_build(tmp: Path, model_dir: Path, *extra: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), *extra]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "64", "--max_seq_len", "128"]) == 0
    return tmp / "engine"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def hf_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- config translation and refusals ----

def test_both_spellings_are_the_mpt_family():
    assert family_for_architecture("MPTForCausalLM").name == "mpt"
    assert family_for_architecture("MptForCausalLM").name == "mpt"


def test_published_configs_translate():
    c7 = config_from_hf(PRESETS["mpt-7b"][1])
    assert (c7.hidden_size, c7.num_attention_heads, c7.num_key_value_heads, c7.num_hidden_layers) == (4096, 32, 32, 32)
    assert (c7.intermediate_size, c7.vocab_size, c7.max_position_embeddings) == (16384, 50432, 2048)
    assert c7.position_embedding_type == "alibi" and c7.alibi_bias_max == 8 and c7.hidden_act == "gelu"
    assert c7.tie_word_embeddings and not c7.linear_bias and not c7.norm_bias and c7.logit_scale is None
    assert c7.dtype == "bfloat16" and c7.clip_qkv is None and not c7.qk_layernorm and c7.softmax_scale is None
    c30 = config_from_hf(PRESETS["mpt-30b"][1])
    assert (c30.hidden_size, c30.num_attention_heads, c30.num_hidden_layers) == (7168, 64, 48)
    assert (c30.intermediate_size, c30.max_position_embeddings, c30.head_size) == (28672, 8192, 112)


def test_config_fields():
    cfg = mpt_published_config(logit_scale="inv_sqrt_d_model", expansion_ratio=3, no_bias=False,
                               attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True,
                                            "clip_qkv": 6, "softmax_scale": 0.25, "alibi_bias_max": 16})
    c = config_from_hf(cfg, "bfloat16")
    assert c.logit_scale == pytest.approx(1 / math.sqrt(48)) and c.intermediate_size == 144
    assert c.linear_bias and c.norm_bias and c.num_key_value_heads == 2 and c.qk_layernorm
    assert c.clip_qkv == 6.0 and c.softmax_scale == 0.25 and c.alibi_bias_max == 16.0 and c.dtype == "bfloat16"
    assert config_from_hf(mpt_published_config(logit_scale=0.5)).logit_scale == 0.5
    assert config_from_hf(mpt_published_config(attn_config={"attn_type": "multiquery_attention"})).num_key_value_heads == 1
    assert config_from_hf(mpt_published_config(ffn_config={"ffn_type": "mptmlp", "ffn_hidden_size": 100})
                          ).intermediate_size == 100


def test_each_spelling_gets_its_own_codes_defaults():
    """A key left out takes the default of the code the name selects: llm-foundry's no_bias false and alibi false
    (refused: that is a learned-position model), transformers' no_bias true and alibi true."""
    bare = {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 64}
    tf = config_from_hf({**bare, "architectures": ["MptForCausalLM"]})
    assert not tf.linear_bias and tf.position_embedding_type == "alibi"
    remote = config_from_hf({**bare, "architectures": ["MPTForCausalLM"], "attn_config": {"alibi": True}})
    assert remote.linear_bias and remote.norm_bias
    with pytest.raises(ConfigError, match="alibi"):
        config_from_hf({**bare, "architectures": ["MPTForCausalLM"]})


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"attn_config": {"prefix_lm": True}}, "prefix_lm"),
    ({"attn_config": {"attn_uses_sequence_id": True}}, "attn_uses_sequence_id"),
    ({"attn_config": {"alibi": False}}, "learned position embeddings"),
    ({"attn_config": {"alibi": False}, "learned_pos_emb": False}, "no position information"),
    ({"attn_config": {"rope": True, "alibi": False}}, "rope"),
    ({"attn_config": {"qk_gn": True}}, "qk_gn"),
    ({"attn_config": {"fused_qkv": False}}, "fused_qkv"),
    ({"attn_config": {"sliding_window_size": 128}}, "sliding_window_size"),
    ({"attn_config": {"attn_logit_softcapping": 30.0}}, "softcapping"),
    ({"attn_config": {"attn_type": "grouped_query_attention"}}, "kv_n_heads"),
    ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 4}}, "kv_n_heads"),
    ({"attn_config": {"kv_n_heads": 2}}, "kv_n_heads"),
    ({"attn_config": {"attn_type": "cross_attention"}}, "attn_type"),
    ({"attn_config": {"softmax_scale": 0}}, "softmax_scale"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type"),
    ({"ffn_config": {"ffn_type": "mb_moe"}}, "ffn_type"),
    ({"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}}, "ffn_act_fn"),
    ({"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}}, "ffn_act_fn"),
    ({"logit_scale": "inv_d_model"}, "logit_scale"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"fc_type": "te"}, "fc_type"),
    ({"residual_modification": "layer"}, "residual_modification"),
    ({"expansion_ratio": 2.01}, "expansion_ratio"),
]


@pytest.mark.parametrize("over,field", REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_configs_are_refused(over, field):
    with pytest.raises(ConfigError, match=field) as err:
        config_from_hf(mpt_published_config(**over))
    assert "not supported" in str(err.value)


def test_refusal_through_the_cli_writes_nothing(tmp_path, capsys):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(mpt_published_config(attn_config={"prefix_lm": True})))
    assert kiln_main(["convert", "--config", str(cfg_path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "attn_config.prefix_lm=True is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- against transformers ----

@pytest.fixture(scope="module")
def mpt_fp32(tmp_path_factory):
    """The remote-code spelling, 6 heads (ALiBi slopes for a head count that is not a power of two), clip_qkv that
    bites, sharded .bin files with an index and without lm_head, as mpt-7b and mpt-30b are published."""
    tmp = tmp_path_factory.mktemp("mpt")
    cfg = mpt_published_config(attn_config={"clip_qkv": 0.5})
    hf = hf_mpt_model(cfg)
    model_dir = save_checkpoint(published_state(hf), cfg, tmp / "hf", shards=3, fmt="bin")
    assert (model_dir / "pytorch_model.bin.index.json").is_file()
    return convert_build(tmp, model_dir), hf, cfg


def test_tied_head_is_the_embedding(mpt_fp32):
    engine, hf, _ = mpt_fp32
    with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
        assert "lm_head.weight" not in published_state(hf)
        assert torch.equal(f.get_tensor("lm_head.weight"), hf.transformer.wte.weight.detach())
        assert torch.equal(f.get_tensor("embed_tokens.weight"), hf.transformer.wte.weight.detach())


def test_logits_match_transformers_fp32(mpt_fp32):
    engine, hf, _ = mpt_fp32
    llm = kiln.LLM(engine)
    for prompt in PROMPTS:
        ours, ref = llm.score(prompt), hf_logits(hf, prompt)
        assert ours.shape == ref.shape and rel_err(ours, ref) < 1e-4


def test_clip_qkv_is_exercised(mpt_fp32):
    """The same weights without the clamp give other logits, so the test above checks the clamp."""
    _, hf, cfg = mpt_fp32
    unclipped = hf_mpt_model(mpt_published_config())
    unclipped.load_state_dict(hf.state_dict())
    assert rel_err(hf_logits(unclipped, PROMPTS[2]), hf_logits(hf, PROMPTS[2])) > 1e-3


def test_greedy_batch_matches_transformers(mpt_fp32):
    engine, hf, _ = mpt_fp32
    outs = kiln.LLM(engine).generate(PROMPTS, kiln.SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)


def test_transformers_spelling_single_file_with_tied_head_written(tmp_path):
    """`MptForCausalLM` in config.json, one safetensors file that also holds the tied `lm_head.weight` (as
    transformers may save it), 4 heads."""
    cfg = mpt_published_config(architectures=["MptForCausalLM"], d_model=32, n_heads=4)
    hf = hf_mpt_model(cfg, seed=3)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    llm = kiln.LLM(convert_build(tmp_path, save_checkpoint(state, cfg, tmp_path / "hf", shards=1)))
    for prompt in PROMPTS[:2]:
        assert rel_err(llm.score(prompt), hf_logits(hf, prompt)) < 1e-4


def test_bf16_within_bf16_noise(tmp_path):
    """kiln in bf16 is about as close to fp32 transformers as transformers in bf16 is."""
    cfg = mpt_published_config(attn_config={"clip_qkv": 0.5})
    hf = hf_mpt_model(cfg, seed=1)
    llm = kiln.LLM(convert_build(tmp_path, save_checkpoint(published_state(hf), cfg, tmp_path / "hf"),
                                 "--dtype", "bfloat16"))
    hf_bf16 = hf_mpt_model(cfg, seed=1).to(torch.bfloat16)
    hf_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()})
    for prompt in PROMPTS[:3]:
        ref, ref_bf16, ours = hf_logits(hf, prompt), hf_logits(hf_bf16, prompt).float(), llm.score(prompt)
        hf_err, our_err = (ref_bf16 - ref).abs().max(), (ours - ref).abs().max()
        assert our_err < 2 * hf_err + 0.02 * ref.abs().max(), (our_err, hf_err)
        assert rel_err(ours, ref) < 0.05


# ---- against the independent reference (what transformers lacks) ----

def test_reference_agrees_with_transformers(mpt_fp32):
    """The plain-torch reference is itself checked on the features both implement."""
    _, hf, cfg = mpt_fp32
    for prompt in PROMPTS[:3]:
        assert rel_err(reference_logits(published_state(hf), cfg, prompt), hf_logits(hf, prompt)) < 1e-5


FEATURES: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    # name: (config overrides, the same config with the feature removed, to show the check can fail)
    "gqa": ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}}, None),
    "mqa": ({"attn_config": {"attn_type": "multiquery_attention"}}, None),
    "qk_ln_bias": ({"no_bias": False, "attn_config": {"qk_ln": True, "attn_type": "grouped_query_attention",
                                                      "kv_n_heads": 3}},
                   {"no_bias": False, "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 3}}),
    "no_bias_false": ({"no_bias": False}, {"no_bias": True}),
    "logit_scale_inv_sqrt": ({"logit_scale": "inv_sqrt_d_model"}, {}),
    "logit_scale_number": ({"logit_scale": 0.3}, {}),
    "alibi_bias_max_softmax_scale": ({"attn_config": {"alibi_bias_max": 16, "softmax_scale": 0.6}},
                                     {"attn_config": {"softmax_scale": 0.6}}),
    "expansion_ratio_untied": ({"expansion_ratio": 3, "tie_word_embeddings": False}, {"expansion_ratio": 3}),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_logits_match_reference(tmp_path, name):
    over, without = FEATURES[name]
    cfg = mpt_published_config(**over)
    state = random_state(cfg, seed=len(name))
    llm = kiln.LLM(convert_build(tmp_path, save_checkpoint(state, cfg, tmp_path / "hf")))
    for prompt in PROMPTS[:3]:
        ref = reference_logits(state, cfg, prompt)
        assert rel_err(llm.score(prompt), ref) < 1e-4, name
    if without is not None:  # the feature changes the logits, so the comparison above checks it
        assert rel_err(reference_logits(state, mpt_published_config(**without), PROMPTS[2]),
                       reference_logits(state, cfg, PROMPTS[2])) > 1e-3


def test_greedy_batch_matches_reference_all_features(tmp_path):
    cfg = mpt_published_config(no_bias=False, logit_scale=2.0, expansion_ratio=3,
                               attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True,
                                            "clip_qkv": 1.0, "alibi_bias_max": 12, "softmax_scale": 0.5})
    state = random_state(cfg, seed=11)
    llm = kiln.LLM(convert_build(tmp_path, save_checkpoint(state, cfg, tmp_path / "hf")))
    outs = llm.generate(PROMPTS, kiln.SamplingParams(max_tokens=22, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == reference_greedy(state, cfg, prompt, 22)


# ---- presets ----

def test_tiny_preset_converts_builds_and_generates(tmp_path):
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--dtype", "float32", "--output_dir",
                      str(tmp_path / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    out = kiln.LLM(tmp_path / "engine").generate(PROMPTS[:2], kiln.SamplingParams(max_tokens=8, temperature=0.0))
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]
    with safe_open(str(tmp_path / "ckpt" / "rank0.safetensors"), "pt") as f:  # dummy weights tie the head too
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("embed_tokens.weight"))


def test_mpt7b_preset_one_layer_shapes(tmp_path):
    assert kiln_main(["convert", "--preset", "mpt-7b", "--num_layers", "1", "--output_dir", str(tmp_path / "c")]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["architecture"] == "MptForCausalLM"
    expected = {"embed_tokens.weight": [50432, 4096], "lm_head.weight": [50432, 4096], "norm.weight": [4096],
                "layers.0.attn.qkv_proj.weight": [12288, 4096], "layers.0.attn.o_proj.weight": [4096, 4096],
                "layers.0.ffn.up_proj.weight": [16384, 4096], "layers.0.ffn.down_proj.weight": [4096, 16384],
                "layers.0.input_norm.weight": [4096], "layers.0.post_attn_norm.weight": [4096]}
    with safe_open(str(tmp_path / "c" / "rank0.safetensors"), "pt") as f:
        assert {n: f.get_slice(n).get_shape() for n in f.keys()} == expected
        assert f.get_slice("embed_tokens.weight").get_dtype() == "BF16"


def test_mpt30b_preset_shapes_without_allocating():
    """mpt-30b at its real shapes on the meta device (no weights): names and shapes of one block and the ends."""
    from kiln.checkpoint.convert import meta_model
    from kiln.config import Mapping

    family, hf = PRESETS["mpt-30b"]
    config = family.config_from_hf(hf)
    params = {n: tuple(p.shape) for n, p in meta_model(family, config, Mapping()).named_parameters()}
    assert len(params) == 3 + 6 * 48
    assert params["embed_tokens.weight"] == params["lm_head.weight"] == (50432, 7168)
    assert params["layers.47.attn.qkv_proj.weight"] == (3 * 7168, 7168)
    assert params["layers.0.ffn.up_proj.weight"] == (28672, 7168)
    assert params["layers.0.ffn.down_proj.weight"] == (7168, 28672)
