"""The thin-matrix (decode) GEMM on a real GPU: the decode shapes of MPT-7B, Baichuan2-13B and DBRX in bf16 and fp16
against F.linear, inside a captured CUDA graph replayed twice with fresh inputs; every candidate the build times is
correct (or does not fit this GPU); the build-time tuner's winners run bound to a layer in a graph. Run on the lent
H100/H200 (`gpu` marker; CI skips them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCES = {torch.float16: (2e-3, 3e-3), torch.bfloat16: (1.6e-2, 2e-2), torch.float32: (1e-5, 1e-4)}
# (N, K): MPT-7B qkv, o / down's output, up, down; Baichuan2-13B W_pack, o, gate_up, down; the brief's 10240x5120;
# DBRX qkv at one GPU.
SHAPES = [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384), (15360, 5120), (5120, 5120), (27392, 5120),
          (5120, 13696), (10240, 5120), (8192, 6144)]


def gemv_module():
    from kiln.kernels import triton_gemv  # imported in the test: CPU collection must not depend on a GPU

    return triton_gemv


def expected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def weight_of(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)  # unit-scale outputs


def replay_twice(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Capture fn() (reading the static x) after a warm-up on a side stream, then twice: new x, replay, check."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        assert_close(fn(), expected(x, weight, bias))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, expected(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_decode_shapes_in_a_graph(n, k, dtype):
    tg = gemv_module()
    from kiln.kernels.triton_gemv_configs import GemvConfig

    weight = weight_of(n, k, dtype)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    cases = [(1, GemvConfig(16, 512, 1, 4, 2, False), None), (1, GemvConfig(64, 128, 4, 4, 4, True), bias),
             (3, GemvConfig(32, 256, 2, 4, 4, True), None), (16, GemvConfig(64, 128, 1, 4, 4, True), bias)]
    for rows, config, b in cases:
        x = torch.randn(rows, k, dtype=dtype, device="cuda")
        replay_twice(lambda: tg.gemv(x, weight, b, config), x, weight, b)


@pytest.mark.parametrize("n,k", [(4096, 4096), (5120, 13696), (1000, 999)])
def test_every_candidate_is_correct_or_does_not_fit(n, k):
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from kiln.kernels.triton_common import multiprocessor_count
    from kiln.kernels.triton_gemv_configs import candidate_configs

    tg = gemv_module()
    weight = weight_of(n, k, torch.bfloat16)
    ran = 0
    for rows in (1, 2, 7, 16):
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        for config in candidate_configs(rows, n, k, multiprocessor_count(weight.device)):
            try:
                out = tg.gemv(x, weight, None, config)
            except (OutOfResources, CompilationError):
                continue
            assert_close(out, expected(x, weight, None))
            ran += 1
    assert ran >= 20


def test_split_k_is_bitwise_reproducible():
    from kiln.kernels.triton_gemv_configs import GemvConfig

    tg = gemv_module()
    weight = weight_of(4096, 16384, torch.bfloat16)
    x = torch.randn(4, 16384, dtype=torch.bfloat16, device="cuda")
    config = GemvConfig(64, 128, 8, 4, 4, True)
    first = tg.gemv(x, weight, None, config)
    assert all(torch.equal(first, tg.gemv(x, weight, None, config)) for _ in range(5))


def test_tuned_choices_bound_to_a_layer_run_in_a_graph():
    from kiln.kernels import triton_gemv_configs as cfg
    from kiln.layers.linear import ColumnParallelLinear

    tg = gemv_module()
    entries = tg.tune_linear_shapes([(4096, 4096), (12288, 4096)], torch.bfloat16, torch.device("cuda"), 60.0)
    assert len(entries) == 10 and all(e["tuned"] and e["cublas_us"] > 0 for e in entries)
    table = cfg.table_from_entries(entries)
    layer = ColumnParallelLinear(4096, 12288, False, torch.bfloat16).cuda()
    layer.weight.data.copy_(weight_of(12288, 4096, torch.bfloat16))
    # This layer's shape always gets a row-1 choice (the tuned one where Triton won, else the default config).
    tg.bind_gemv(layer, {(1, 12288, 4096): cfg.default_config(), **table})
    assert isinstance(layer.matmul, tg.GemvMatmul)
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda")
        replay_twice(lambda: layer(x), x, layer.weight, None)
