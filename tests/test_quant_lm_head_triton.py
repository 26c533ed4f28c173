"""The Triton weight-only kernels bound to a quantized LM head (--quantize_lm_head), INT8 and INT4 per channel and
group-wise INT4, against `x @ dequant(W).T` written out by the test (weight_only_refs), through Triton's interpreter
on the CPU: an odd, padded vocabulary at a small size (the real vocabularies: tests/test_quant_lm_head_gpu.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

import pytest  # noqa: E402
from interpreted_triton import interpret_triton  # noqa: E402

if INTERPRET:
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_gemv_kernels",
                      "kiln.kernels.triton_gemv",
                      "kiln.kernels.triton_weight_only_kernels", "kiln.kernels.triton_weight_only"))

from kiln.config import Mapping, QuantConfig  # noqa: E402
from kiln.kernels.triton_weight_only import WeightOnlyKernelMatmul, bind_weight_only  # noqa: E402
from kiln.layers.embedding import LMHead  # noqa: E402
from kiln.quant.apply import quantize_model  # noqa: E402
from weight_only_refs import group_wise, per_channel  # noqa: E402

ALGOS = {"W8A16": (8, 0), "W4A16": (4, 0), "W4A16_AWQ": (4, 64)}


def quantized_head(vocab: int, hidden: int, tp: int, algo: str, dtype: str,
                   gen: torch.Generator) -> tuple[LMHead, torch.Tensor]:
    """The last tp rank's LM head of a model of `vocab` and `hidden`, quantized as `algo` with random stored
    values; and its dense float64 weight [vocab rows of this rank, hidden] from the test's own dequantization."""
    # What LMHead reads of a model config (the preset's own sizes are not needed to test the head's matmul).
    config = SimpleNamespace(vocab_size=vocab, hidden_size=hidden, logit_scale=None, torch_dtype=getattr(torch, dtype))
    head = LMHead(config, Mapping(tp, tp, 1, tp, 1, tp - 1))  # type: ignore[arg-type]
    bits, group = ALGOS[algo]
    quant = QuantConfig(quant_algo=algo, group_size=group or 128, has_zero_point=bool(group), quantize_lm_head=True)
    assert quantize_model(torch.nn.ModuleList([head]), quant) == 1
    rows = head.weight.shape[0]
    if group:
        weight, scale, zero, dense = group_wise(rows, hidden, bits, group, 0, gen, head.weight_scale.dtype)
        head.weight_zero.data.copy_(zero)
    else:
        weight, scale, dense = per_channel(rows, hidden, bits, gen, head.weight_scale.dtype)
    head.weight.data.copy_(weight)
    head.weight_scale.data.copy_(scale)
    return head.to(DEVICE), dense


def check_bound_head(head: LMHead, dense: torch.Tensor, rows: int, dtype: torch.dtype, gen: torch.Generator,
                     tol: float) -> None:
    torch_matmul = head.matmul
    assert bind_weight_only(torch.nn.ModuleList([head])) == 1
    assert isinstance(head.matmul, WeightOnlyKernelMatmul)
    x = torch.randn(rows, dense.shape[1], generator=gen).to(dtype)
    got = head.matmul(x.to(DEVICE), head.weight, None).double().cpu()  # [rows, vocab rows of this rank]
    want = x.double() @ dense.T
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * want.abs().max()
    ref = torch_matmul(x.to(DEVICE), head.weight, None).double().cpu()  # the torch path of the same head
    assert (got - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_kernels_bind_to_a_quantized_head(algo):
    # An odd vocabulary (padded to 78 over tp 2: 39 rows a rank, not a multiple of any tile); the interpreter is
    # far too slow for the real ones, which tests/test_quant_lm_head_gpu.py runs.
    gen = torch.Generator().manual_seed(len(algo))
    head, dense = quantized_head(77, 128, 2, algo, "float32", gen)
    assert head.weight.shape[0] == 39
    for rows in (1, 5):
        check_bound_head(head, dense, rows, torch.float32, gen, 1e-5)
        head.matmul = head.matmul.fallback  # rebind from the torch matmul for the next row count
