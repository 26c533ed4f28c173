"""The thin-matrix (decode) GEMM against F.linear through Triton's interpreter (tiny, odd shapes; split-K on and off;
both kernel paths), its input checks, its config table in an engine's config.json, the per-layer binding, and that
CPU engines never use it. The GPU half (real shapes, CUDA graphs) is tests/test_gemv_gpu.py."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from interpreted_triton import interpret_triton  # noqa: E402

_KERNEL_MODULES = ("kiln.kernels.triton_jit_common", "kiln.kernels.triton_gemv_kernels", "kiln.kernels.triton_gemv")


if INTERPRET:
    interpret_triton(_KERNEL_MODULES)

from kiln.checkpoint.kiln_format import load_artifact  # noqa: E402
from kiln.cli.main import main as kiln_main  # noqa: E402
from kiln.kernels import REFERENCE, bind_linear_matmuls, engine_gemv_table  # noqa: E402
from kiln.kernels import kernels_section, select_kernels  # noqa: E402
from kiln.kernels import reference  # noqa: E402
from kiln.kernels import triton_gemv as tg  # noqa: E402
from kiln.kernels import triton_gemv_configs as cfg  # noqa: E402
from kiln.kernels.triton_gemv_configs import GemvConfig  # noqa: E402
from kiln.layers.linear import ColumnParallelLinear, LinearBase, QKVParallelLinear, RowParallelLinear  # noqa: E402

CPU = torch.device("cpu")
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}
DOT = GemvConfig(16, 32, 1, 4, 1, True)
DOT_SPLIT = GemvConfig(32, 16, 3, 4, 1, True)
FMA = GemvConfig(8, 64, 1, 4, 1, False)
FMA_SPLIT = GemvConfig(4, 16, 4, 4, 1, False)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def inputs(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    """x, weight, bias at unit output scale (so the dtype tolerances apply to the outputs)."""
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    weight = (torch.randn(n, k, device=DEVICE) * max(k, 1) ** -0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    return x, weight, b


def expected(x, weight, bias) -> torch.Tensor:
    """F.linear in float32, rounded once to the dtype (as a float32-accumulating kernel rounds)."""
    return reference.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


# (rows, N, K, config, bias): odd N and K (masked tails), K shorter than a step, several K steps per split,
# a split count that does not divide the steps, and one row through the FMA path.
CASES = [
    (1, 37, 53, DOT, False), (2, 19, 300, DOT, True), (3, 64, 128, DOT_SPLIT, True), (4, 33, 97, DOT_SPLIT, False),
    (5, 50, 10, DOT, True), (1, 45, 200, DOT_SPLIT, True), (1, 37, 53, FMA, True), (1, 70, 301, FMA_SPLIT, False),
    (1, 24, 256, FMA_SPLIT, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k,config,bias", CASES)
def test_gemv_matches_linear(rows, n, k, config, bias, dtype):
    x, weight, b = inputs(rows, n, k, dtype, bias)
    assert_close(tg.gemv(x, weight, b, config), expected(x, weight, b))


def test_gemv_fp16_strided_rows_and_default_config():
    x_wide, weight, b = inputs(3, 40, 2 * 64, torch.float16, True)
    x = x_wide[:, :64]  # rows with a stride of 128: a view, as a slice of a fused output gives
    weight = weight[:, :64].contiguous()
    assert_close(tg.gemv(x, weight, b), expected(x, weight, b))


def test_split_k_is_deterministic_and_agrees_with_one_pass():
    x, weight, b = inputs(2, 48, 160, torch.float32, True)
    split = GemvConfig(16, 16, 5, 4, 1, True)
    first, second = tg.gemv(x, weight, b, split), tg.gemv(x, weight, b, split)
    assert torch.equal(first, second)  # a fixed-order second pass, no atomics
    torch.testing.assert_close(first, tg.gemv(x, weight, b, DOT), rtol=1e-5, atol=1e-5)


def test_more_splits_than_k_steps_and_empty_k():
    x, weight, b = inputs(1, 20, 40, torch.float32, True)
    assert_close(tg.gemv(x, weight, b, GemvConfig(16, 16, 64, 4, 1, True)), expected(x, weight, b))  # 3 steps
    x0, w0, b0 = inputs(2, 5, 0, torch.float32, True)
    assert torch.equal(tg.gemv(x0, w0, b0, DOT), b0.expand(2, 5))


def test_bad_inputs_are_rejected_with_what_to_do():
    x, weight, b = inputs(2, 8, 16, torch.float32, True)
    bad = [
        ((x[0], weight, None, None), "2 dimensions"),
        ((x.to(torch.int32), weight, None, None), "dtype"),
        ((x, weight.to(torch.bfloat16), None, None), "weight has dtype"),
        ((x, weight[:, :12], None, None), "takes 12"),
        ((x, weight.t().contiguous().t(), None, None), "contiguous"),
        ((torch.randn(17, 16, device=DEVICE), weight, None, None), "1..16 rows.*F.linear"),
        ((x[:0], weight, None, None), "1..16 rows"),
        ((x, weight, b[:5], None), r"bias must have shape \(8,\)"),
        ((x, weight, b.to(torch.float16), None), "bias has dtype"),
        ((x, weight, None, FMA), "one row"),
        ((x, weight, None, (16, 32, 1, 4, 1, True)), "GemvConfig"),
        ((x.to("meta"), weight.to("meta"), None, None), "CUDA tensors"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            tg.gemv(*args)


# ---- configs and the engine's table -------------------------------------------------------------------------------


def test_row_buckets_and_per_row_lookup():
    assert [cfg.row_bucket(r) for r in range(1, 17)] == [1, 2, 4, 4] + [8] * 4 + [16] * 8
    table = {(1, 8, 16): FMA, (4, 8, 16): DOT, (16, 8, 16): DOT_SPLIT, (2, 9, 16): DOT}
    rows = cfg.rows_table(table, 8, 16)
    assert len(rows) == 17 and rows[0] is None and rows[1] == FMA and rows[2] is None
    assert rows[3] == rows[4] == DOT and rows[5:9] == (None,) * 4 and rows[9:] == (DOT_SPLIT,) * 8


def test_candidates_are_few_and_fma_only_for_one_row():
    one, many = cfg.candidate_configs(1, 4096, 4096, 132), cfg.candidate_configs(8, 4096, 4096, 132)
    assert any(not c.dot for c in one) and all(c.dot for c in many) and len(one) <= 12 and len(many) <= 8
    assert cfg.split_candidates(4096, 4096, 64, 128, 132) == (1, 8)  # 64 blocks of N -> 512 programs
    assert cfg.split_candidates(50432, 4096, 64, 128, 132) == (1,)  # the LM head fills the GPU alone
    assert cfg.split_candidates(64, 256, 16, 128, 132) == (1,)  # two K steps: nothing to split


def test_config_json_round_trip_and_bad_entries():
    for config in (DOT, DOT_SPLIT, FMA, FMA_SPLIT):
        assert cfg.config_from_list(json.loads(json.dumps(cfg.config_to_list(config)))) == config
    for bad in ([64, 128, 1, 4, 4], [48, 128, 1, 4, 4, True], [8, 128, 1, 4, 4, True], [64, 128, 0, 4, 4, True],
                [64, 128, 1, 3, 4, True], [64, 128, 1, 4, 4, 1], "64,128"):
        with pytest.raises(ValueError):
            cfg.config_from_list(bad)


def test_table_keeps_tuned_triton_winners_only():
    entries = [cfg.entry_to_dict(1, 8, 16, FMA, True, 3.0, 4.0), cfg.entry_to_dict(2, 8, 16, None, True, 5.0, 4.0),
               cfg.entry_to_dict(4, 8, 16, DOT, False), cfg.entry_to_dict(16, 32, 8, DOT_SPLIT, True)]
    assert entries[1]["kernel"] == "cublas" and entries[0]["triton_us"] == 3.0
    assert cfg.table_from_entries(json.loads(json.dumps(entries))) == {(1, 8, 16): FMA, (16, 32, 8): DOT_SPLIT}
    for bad in ([{"rows": 3, "n": 8, "k": 16, "kernel": "triton", "tuned": True, "config": cfg.config_to_list(DOT)}],
                [{"rows": 2, "n": 8, "k": 16, "kernel": "triton", "tuned": True, "config": cfg.config_to_list(FMA)}],
                [{"rows": 1, "n": 8, "kernel": "triton", "tuned": True}], "entries"):
        with pytest.raises(ValueError):
            cfg.table_from_entries(bad)


@pytest.fixture(scope="module")
def mpt_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemv")
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--num_layers", "1", "--dtype", "float32", "--output_dir",
                      str(tmp / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--max_num_tokens", "64"]) == 0
    return tmp / "engine"


def engine_shapes(engine) -> list[tuple[int, int]]:
    """The weight shapes of the engine's linear layers and LM head, read off the model itself."""
    from kiln.checkpoint.convert import meta_model
    from kiln.layers.embedding import LMHead

    info = load_artifact(engine, "engine")
    meta = meta_model(info.family, info.model, info.mapping)
    return sorted({tuple(m.weight.shape) for m in meta.modules() if isinstance(m, (LinearBase, LMHead))})


def with_winners(engine, device: str, winners: dict) -> dict:
    """The engine's config with some entries marked tuned Triton winners (as a GPU build records them)."""
    raw = json.loads((engine / "config.json").read_text())
    raw["kernels"]["device"], raw["kernels"]["tuned"] = device, True
    for entry in raw["kernels"]["linear"]["entries"]:
        key = (entry["rows"], entry["n"], entry["k"])
        entry["tuned"] = True
        if key in winners:
            entry.update(kernel="triton", config=cfg.config_to_list(winners[key]))
    return json.loads(json.dumps(raw))


def test_build_records_every_linear_shape_untuned_on_the_cpu(mpt_engine):
    section = load_artifact(mpt_engine, "engine").raw["kernels"]
    linear = section["linear"]
    assert section["tuned"] is False and linear["dtype"] == "float32"
    shapes = engine_shapes(mpt_engine)
    assert len(shapes) >= 4  # qkv, o, up, down (and the head)
    assert sorted({(e["n"], e["k"]) for e in linear["entries"]}) == shapes
    assert [e["rows"] for e in linear["entries"]] == [1, 2, 4, 8, 16] * len(shapes)
    assert all(e["kernel"] == "cublas" and not e["tuned"] for e in linear["entries"])
    assert engine_gemv_table({"kernels": section}, CPU) == {}


def test_engine_choices_reach_the_kernel_set(mpt_engine):
    n, k = engine_shapes(mpt_engine)[0]
    raw = with_winners(mpt_engine, "cpu", {(1, n, k): FMA, (8, n, k): DOT})
    assert select_kernels(CPU, "triton", engine_config=raw).gemv == {(1, n, k): FMA, (8, n, k): DOT}
    assert select_kernels(CPU, "torch", engine_config=raw).gemv == {}
    with pytest.warns(RuntimeWarning, match="tuned on NVIDIA Imaginary Y2.*cuBLAS"):
        other = select_kernels(CPU, "triton", engine_config=with_winners(mpt_engine, "NVIDIA Imaginary Y2",
                                                                           {(1, n, k): FMA}))
    assert other.gemv == {}
    broken = with_winners(mpt_engine, "cpu", {(1, n, k): FMA})
    broken["kernels"]["linear"]["entries"][0]["config"] = [64, 128]
    with pytest.raises(ValueError, match="kernels.linear section is malformed.*rebuild"):
        select_kernels(CPU, "triton", engine_config=broken)


def test_gemv_is_not_tuned_without_a_gpu():
    section = kernels_section(CPU, None, torch.bfloat16, 8, tune=True, linear_shapes=[(64, 32), (64, 32), (8, 32)])
    assert section["tuned"] is False and len(section["linear"]["entries"]) == 10


# ---- the layers' hook ---------------------------------------------------------------------------------------------


def layers(dtype: torch.dtype) -> torch.nn.ModuleList:
    torch.manual_seed(1)
    mods = torch.nn.ModuleList([QKVParallelLinear(48, 3, 1, 16, True, dtype), RowParallelLinear(48, 40, True, dtype),
                                ColumnParallelLinear(40, 72, False, dtype)])
    for mod in mods:
        for p in mod.parameters():
            p.data.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return mods.to(DEVICE)


def test_bound_layers_use_the_gemv_where_it_won_and_f_linear_elsewhere(monkeypatch):
    mods = layers(torch.float32)
    x = {48: torch.randn(16, 48, device=DEVICE), 40: torch.randn(16, 40, device=DEVICE)}
    before = [[m(x[m.in_features][:rows]) for rows in (1, 3, 9)] for m in mods]
    table = {(1, 80, 48): FMA, (4, 80, 48): DOT_SPLIT, (16, 40, 48): DOT, (2, 99, 48): DOT}
    assert tg.bind_gemv(mods, table) == 2
    assert isinstance(mods[0].matmul, tg.GemvMatmul) and isinstance(mods[1].matmul, tg.GemvMatmul)
    assert mods[2].matmul is F.linear and LinearBase.matmul is F.linear  # no winner: the class's F.linear
    launches = []
    launch = tg._launch
    monkeypatch.setattr(tg, "_launch", lambda *a: launches.append(a[3]) or launch(*a))
    for m, outs in zip(mods, before):
        for rows, ref in zip((1, 3, 9), outs):
            torch.testing.assert_close(m(x[m.in_features][:rows]), ref, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(mods[2](x[40][:rows]), ref) for rows, ref in zip((1, 3, 9), before[2]))  # F.linear
    # qkv: 1 row FMA, 3 rows (bucket 4) split dot, 9 rows cuBLAS; o_proj (bias after the reduction): 9 rows only
    assert launches == [FMA, DOT_SPLIT, DOT]
    launches.clear()
    assert torch.equal(mods[0](x[48][:17]), F.linear(x[48][:17], mods[0].weight, mods[0].bias)) and not launches


def test_cpu_and_torch_engines_never_bind():
    mods = layers(torch.float32)
    kernels = select_kernels(CPU, "triton")
    table = {(1, 80, 48): DOT}
    assert bind_linear_matmuls(mods, REFERENCE, torch.device("cuda")) == 0  # the torch set
    assert bind_linear_matmuls(mods, dataclasses.replace(kernels, gemv=table), CPU) == 0
    assert all(m.matmul is F.linear for m in mods)


def test_cpu_engine_output_is_unchanged_by_recorded_choices(mpt_engine, tmp_path):
    import shutil

    from kiln.llm import LLM
    from kiln.sampling_params import SamplingParams

    n, k = engine_shapes(mpt_engine)[0]
    tuned = tmp_path / "tuned"
    shutil.copytree(mpt_engine, tuned)
    raw = with_winners(mpt_engine, "cpu", {(r, n, k): DOT for r in cfg.ROW_BUCKETS})
    (tuned / "config.json").write_text(json.dumps(raw))
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2)
    outs = []
    for engine in (mpt_engine, tuned):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the device matches: no warning either
            llm = LLM(engine, device="cpu")
        assert llm.runner.gemv_layers == 0
        assert all(m.matmul is F.linear for m in llm.runner.model.modules() if isinstance(m, LinearBase))
        outs.append(llm.generate([[1, 2, 3, 4, 5]], params)[0].outputs[0])
        llm.close()
    assert outs[0].token_ids == outs[1].token_ids and outs[0].token_logprobs == outs[1].token_logprobs


def test_triton_wins_only_by_the_margin_and_an_exhausted_budget_keeps_cublas():
    assert tg.GemvTiming(DOT, 0.9, 1.0).winner == DOT
    assert tg.GemvTiming(DOT, 0.98, 1.0).winner is None  # within 3% of cuBLAS: not worth leaving it
    assert tg.GemvTiming(None, float("inf"), 1.0).winner is None  # no candidate ran
    # Past the budget nothing is timed (nor allocated on the device): every row bucket records cuBLAS, untuned.
    entries = tg.tune_linear_shapes([(8, 16), (8, 16), (32, 8)], torch.bfloat16, torch.device("cuda"), budget_s=-1)
    assert [(e["n"], e["k"], e["rows"]) for e in entries] == [(32, 8, r) for r in cfg.ROW_BUCKETS] + \
        [(8, 16, r) for r in cfg.ROW_BUCKETS]
    assert all(e["kernel"] == "cublas" and not e["tuned"] for e in entries)
