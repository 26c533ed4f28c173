"""Dummy engines whose weights never touch the disk (kiln.checkpoint.in_memory): the same logits, bit for bit, as the
same dummy engine written to rank files and loaded (every weight-only format, MoE experts, tp 2), no rank file, no
float copy of a quantized weight while the rank loads, finite logits at DBRX's full depth, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kiln
from kiln.bench import BenchOptions
from kiln.bench.dummy import dummy_engine
from kiln.bench.precisions import precision_quant
from kiln.checkpoint.hf_reader import CheckpointError
from kiln.cli.main import main as kiln_main
from kiln.config import ConfigError
from kiln.memory import MemoryPlan, check_weights_fit

PROMPT = [5, 17, 3, 250, 99, 7, 42, 11]


def dbrx_config(tmp: Path, layers: int = 2, hidden: int = 256) -> str:
    """A small DBRX whose input widths hold whole groups of 128 (the preset's 64 would make one partial group)."""
    config = {"architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": hidden, "n_heads": 4,
              "n_layers": layers, "max_seq_len": 64, "vocab_size": 512, "tie_word_embeddings": False,
              "attn_config": {"clip_qkv": 8, "kv_n_heads": 2, "rope_theta": 500000},
              "ffn_config": {"ffn_hidden_size": 256, "moe_num_experts": 4, "moe_top_k": 2,
                             "moe_normalize_expert_weights": 1, "ffn_act_fn": {"name": "silu"}}}
    path = tmp / f"dbrx-{layers}x{hidden}.json"
    path.write_text(json.dumps(config))
    return str(path)


def options(in_memory: bool, **kw) -> BenchOptions:
    base = dict(dtype="bfloat16", batch_sizes=[1], input_len=8, output_len=4, device="cpu", tune=False, seed=7,
                weights_in_memory=in_memory)
    return BenchOptions(**{**base, **kw})


def engine_logits(opts: BenchOptions, precision: str, group_size: int = 128) -> torch.Tensor:
    """The prompt's logits [tokens, vocab] float32 from the dummy engine of `opts`; checks where its weights are."""
    quant = precision_quant(precision, group_size)
    with dummy_engine(opts, log=lambda line: None, quant=quant) as engine:
        files = sorted(p.name for p in engine.rglob("*.safetensors"))
        world = opts.tp_size * opts.pp_size
        assert files == ([] if opts.weights_in_memory else [f"rank{r}.safetensors" for r in range(world)])
        llm = kiln.LLM(engine, device="cpu", kv_cache_bytes=1 << 20)
        try:
            return llm.score(PROMPT)
        finally:
            llm.close()


@pytest.mark.parametrize("precision, kv", [("none", None), ("int8", None), ("int4", None), ("int4_awq", None),
                                           ("int4_awq", "int8"), ("fp8", "fp8"), ("int8_sq", None)])
def test_in_memory_dbrx_equals_the_engine_on_disk(precision, kv, tmp_path):
    """Every format, with the scale sources convert puts in front of the weights (unit KV scales, FP8's dummy input
    scales, SmoothQuant's smoothing on absmax 1)."""
    config = dbrx_config(tmp_path)
    on_disk = engine_logits(options(False, config=config, kv_cache_dtype=kv), precision)
    in_memory = engine_logits(options(True, config=config, kv_cache_dtype=kv), precision)
    assert torch.isfinite(in_memory).all() and in_memory.abs().max() > 0
    assert torch.equal(in_memory, on_disk)


@pytest.mark.parametrize("preset, precision", [("mpt-tiny", "none"), ("baichuan-tiny", "int4_gptq"),
                                               ("baichuan-tiny-rope", "int8")])
def test_in_memory_dense_families_equal_the_engine_on_disk(preset, precision):
    """MPT's ALiBi slopes and tied head, Baichuan2's normalised head: computed again on the placed model."""
    on_disk = engine_logits(options(False, preset=preset), precision, group_size=32)
    in_memory = engine_logits(options(True, preset=preset), precision, group_size=32)
    assert torch.equal(in_memory, on_disk)


@pytest.mark.parametrize("shard", [dict(tp_size=2, moe_tp_mode=1), dict(pp_size=2)], ids=["ep2", "pp2"])
def test_in_memory_two_ranks_equal_the_engine_on_disk(shard, tmp_path):
    """Expert parallel or two pipeline stages (gloo): each spawned rank draws its own part through convert's
    sharding."""
    kw = dict(config=dbrx_config(tmp_path), **shard)
    on_disk = engine_logits(options(False, **kw), "int4_awq")
    in_memory = engine_logits(options(True, **kw), "int4_awq")
    assert torch.equal(in_memory, on_disk)


class LargestFloat(TorchDispatchMode):
    """The largest floating-point tensor any op produces while active (numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def test_loading_never_makes_a_float_copy_of_quantized_experts(tmp_path):
    """The rank is built on meta and its experts drawn in the format: no float tensor as large as one layer's w13
    (experts x 2 ffn x hidden) exists at any time while it loads (the old path allocated every layer's in bf16)."""
    opts = options(True, config=dbrx_config(tmp_path, hidden=256))
    w13 = 4 * 2 * 256 * 256
    with dummy_engine(opts, log=lambda line: None, quant=precision_quant("int4_awq", 128)) as engine:
        with LargestFloat() as watch:
            llm = kiln.LLM(engine, device="cpu", kv_cache_bytes=1 << 20)
        llm.close()
    assert 0 < watch.largest < w13  # the embedding/head (512 x 256) are the largest float tensors


@pytest.mark.parametrize("precision", ["int4", "int4_awq"])
def test_full_depth_int4_dummy_logits_are_finite(precision, tmp_path):
    """DBRX's 40 layers of random INT4 weights (at a narrow width): the residual stream stays finite and moderate."""
    opts = options(True, config=dbrx_config(tmp_path, layers=40, hidden=256))
    logits = engine_logits(opts, precision)
    assert torch.isfinite(logits).all()
    assert 0 < logits.abs().max() < 100 and logits.std() > 1e-3  # neither blown up nor collapsed


def test_build_plans_memory_from_the_model(tmp_path):
    """No rank file to check: the plan's weight bytes are the parameters', the same as the engine on disk's."""
    plans = {}
    for in_memory in (False, True):
        with dummy_engine(options(in_memory, config=dbrx_config(tmp_path)), lambda line: None,
                          precision_quant("int4_awq", 128)) as engine:
            raw = json.loads((engine / "config.json").read_text())
            plans[in_memory] = raw["memory_plan"]
            assert ("weights_in_memory" in raw) == in_memory
    assert plans[True] == plans[False] and plans[True]["quantized_bytes"] > 0
    record = raw["weights_in_memory"]
    assert record == {"source": "dummy", "seed": 7, "std": 0.02, "device": "cpu", "tied_head": False}


def test_edited_record_is_refused_in_one_line(tmp_path):
    with dummy_engine(options(True, preset="mpt-tiny"), lambda line: None) as engine:
        path = engine / "config.json"
        raw = json.loads(path.read_text())
        raw["weights_in_memory"]["seed"] = "seven"
        path.chmod(0o644)
        path.write_text(json.dumps(raw))
        with pytest.raises(CheckpointError, match="not a dummy-weight record") as err:
            kiln.LLM(engine, device="cpu")
        assert "\n" not in str(err.value)


def test_weights_that_cannot_fit_are_refused_before_allocating():
    gib = 1 << 30
    plan = MemoryPlan(weight_bytes=70 * gib, kv_bytes_per_token=1 << 16, activation_bytes=2 * gib)
    check_weights_fit(plan, free_bytes=139 * gib, min_kv_bytes=gib)
    with pytest.raises(ConfigError, match=r"needs 73\.00 GiB per rank .* 60\.00 GiB free; quantize") as err:
        check_weights_fit(plan, free_bytes=60 * gib, min_kv_bytes=gib)
    assert "\n" not in str(err.value)


def test_bench_defaults_to_weights_in_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert kiln_main(["bench", "--preset", "dbrx-tiny", "--num_layers", "1", "--device", "cpu", "--batch_size", "1",
                      "--input_len", "6", "--output_len", "3", "--warmup", "0", "--weight_only_precision", "int4",
                      "--output_json", str(out)]) == 0
    engine = json.loads(out.read_text())["engine"]
    assert engine["weights_in_memory"] is True and engine["load_s"] > 0
    printed = capsys.readouterr().out
    assert "no rank file is written" in printed and "weights per rank:" in printed
    assert "(weights drawn in memory)" in printed
    assert BenchOptions(preset="mpt-tiny", compare_hf=True).in_memory is False  # transformers reads the rank file
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--device", "cpu", "--batch_size", "1", "--input_len", "4",
                      "--output_len", "2", "--warmup", "0", "--weights-on-disk", "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())["engine"]["weights_in_memory"] is False
    assert BenchOptions(preset="mpt-tiny", weights_in_memory=False).in_memory is False


@pytest.mark.parametrize("argv, message", [
    (["--preset", "mpt-tiny", "--weights_in_memory", "--compare_hf"], "--compare_hf needs them in a rank file"),
    (["--engine_dir", "/nonexistent", "--weights_in_memory"], "has its weights in its rank files"),
])
def test_bench_refusals_are_one_line(argv, message, capsys):
    assert kiln_main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_full_dbrx_in_bf16_is_refused_before_allocating(capsys):
    """DBRX-132B in bf16 (264 GB a rank) on this machine: refused in one line before any weight is allocated (the
    model is built on meta; an OOM kill halfway through drawing would be the alternative)."""
    from kiln.memory import free_memory_bytes

    free = free_memory_bytes(torch.device("cpu"))
    if free is None or free > 250 * 2**30:
        pytest.skip("needs a machine where 264 GB of weights cannot fit")
    argv = ["bench", "--preset", "dbrx", "--dtype", "bfloat16", "--device", "cpu", "--batch_size", "1",
            "--input_len", "16", "--output_len", "4", "--no_tune"]
    assert kiln_main(argv) == 2
    err = capsys.readouterr().err
    assert "the engine needs 24" in err and len(err.strip().splitlines()) == 1


def test_convert_weights_in_memory_builds_and_runs_as_the_disk_engine(tmp_path):
    """`kiln convert --preset ... --weights_in_memory`, `kiln build`, then any runtime (LLM here): no rank file
    anywhere, the logits of the engine converted to disk."""
    engines = {}
    for name, extra in (("disk", []), ("memory", ["--weights_in_memory"])):
        assert kiln_main(["convert", "--preset", "dbrx-tiny", "--dtype", "bfloat16", "--seed", "5", "--tp_size", "2",
                          "--use_weight_only", "--weight_only_precision", "int4_awq", "--group_size", "32",
                          "--output_dir", str(tmp_path / name / "ckpt"), *extra]) == 0
        assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / name / "ckpt"), "--output_dir",
                          str(tmp_path / name / "engine"), "--max_batch_size", "2", "--max_input_len", "16",
                          "--max_seq_len", "32"]) == 0
        engines[name] = tmp_path / name / "engine"
    assert not list((tmp_path / "memory").rglob("*.safetensors"))
    logits = {}
    for name, engine in engines.items():
        with kiln.LLM(engine, device="cpu", kv_cache_bytes=1 << 20) as llm:
            logits[name] = llm.score(PROMPT)
    assert torch.equal(logits["memory"], logits["disk"])


def test_convert_weights_in_memory_refuses_a_real_checkpoint(tmp_path, capsys):
    repo = Path(__file__).resolve().parent.parent
    assert kiln_main(["convert", "--model_dir", str(repo / "models" / "mpt-books"), "--weights_in_memory",
                      "--output_dir", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "weights in memory are dummy weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ckpt").exists()


def test_dummy_source_draws_every_tensor_on_its_device():
    """Norms and biases come from the drawing device like the weights: SmoothQuant folds its factors (computed from
    the weights there) into the norms, which failed on a GPU when they came from the CPU (the meta device stands in
    for a second device here)."""
    from kiln.checkpoint.sources import DummyWeightSource

    source = DummyWeightSource(device="meta")
    for name in ("layers.0.norm_1.weight", "layers.0.attn.out_proj.bias"):  # (meta has no generator for weights)
        assert source.full_tensor(name, (8,)).device.type == "meta", name
