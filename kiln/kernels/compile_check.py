"""Compile kiln's newer Triton kernels for an H100 (sm_90) without a GPU: Triton's compiler, LLVM and ptxas ship in
the triton wheel. The interpreter (CI's way of running kernels) executes a kernel's Python body and so misses what
only the compiler checks: the types of every branch of a constexpr `if` that returns, inline PTX
(triton_dequant_asm.py), fp8 dots. Run as a module in a process without TRITON_INTERPRET (the tests do):

    python -m kiln.kernels.compile_check      # prints one JSON object: case -> "ok" or the compiler's error line
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

H100 = ("cuda", 90, 32)
_SIZES = ("N", "K", "KW", "hidden", "ffn", "hidden_w", "ffn_w", "v_per_split")


def compile_for_h100(fn: Any, consts: dict, pointer_types: dict, default_pointer: str = "*bf16",
                     scalar_types: dict | None = None, num_warps: int = 4, num_stages: int = 3) -> Any:
    """Compile `fn` with these constexprs; pointer arguments (named *_ptr) typed from `pointer_types`, the rest int32
    unless `scalar_types` says otherwise (an eps: fp32); pointers, strides and sizes divisible by 16 as Triton
    specializes real layers'. The result's asm holds the PTX and the cubin ptxas made of it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    scalars = scalar_types or {}
    signature = {n: "constexpr" if n in consts else pointer_types.get(n, default_pointer) if n.endswith("_ptr")
                 else scalars.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in consts and n not in scalars and (n.endswith("_ptr") or n.startswith("stride") or n in _SIZES)}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget(*H100), options=options)


def _weight_only_cases() -> dict[str, Callable[[], Any]]:
    from kiln.kernels.triton_weight_only_gemv_kernels import weight_only_gemv_kernel
    from kiln.kernels.triton_weight_only_kernels import weight_only_kernel

    cases: dict[str, Callable[[], Any]] = {}
    for bits, group, asm in ((4, 0, True), (4, 128, True), (8, 0, True), (8, 64, True), (4, 0, False)):
        consts = dict(BITS=bits, GROUP=group, HAS_ZERO=group > 0, HAS_BIAS=False, SPLIT=True, BLOCK_M=16,
                      BLOCK_N=64, BLOCK_K=128, EVEN_K=True, DOT_F32=False, PRECISION="tf32", LAST_REDUCES=True,
                      WHILE_LOOP=False, ASM=asm)
        cases[f"weight_only int{bits} g{group} asm={asm}"] = lambda c=consts: compile_for_h100(
            weight_only_kernel, c, {"w_ptr": "*i8", "part_ptr": "*fp32", "count_ptr": "*i32"})
    for bits, group in ((4, 0), (4, 128), (8, 0)):
        consts = dict(BITS=bits, GROUP=group, HAS_ZERO=group > 0, HAS_BIAS=True, SPLIT=True, BLOCK_N=64,
                      BLOCK_K=128, EVEN_K=False, PREFETCH=True, LAST_REDUCES=True, WHILE_LOOP=False)
        pointers = {"x_ptr": "*i32" if bits == 4 else "*bf16", "w_ptr": "*i8", "part_ptr": "*fp32",
                    "count_ptr": "*i32"}
        cases[f"one_row int{bits} g{group}"] = lambda c=consts, p=pointers: compile_for_h100(
            weight_only_gemv_kernel, c, p)
    return cases


def _moe_cases() -> dict[str, Callable[[], Any]]:
    from kiln.kernels import triton_moe_group_wise_kernels as gw
    from kiln.kernels import triton_moe_w8a8_kernels as w8a8
    from kiln.kernels import triton_moe_weight_only_kernels as wo

    cases: dict[str, Callable[[], Any]] = {}
    pointers = {"sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", "w13_ptr": "*i8", "w2_ptr": "*i8",
                "topk_weights_ptr": "*fp32", "out_ptr": "*fp32"}
    for bits in (4, 8):
        common = dict(BITS=bits, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, EVEN_K=True, DOT_F32=False,
                      PRECISION="tf32", WHILE_LOOP=False, ASM=True)
        for fn, extra in ((wo.moe_wo_gate_up_kernel, {}), (wo.moe_wo_down_kernel, {}),
                          (gw.moe_gw_gate_up_kernel, {"GROUP": 128}), (gw.moe_gw_down_kernel, {"GROUP": 128})):
            consts = {k: v for k, v in {**common, **extra}.items() if k in fn.arg_names}
            cases[f"{fn.__name__} int{bits}"] = lambda f=fn, c=consts: compile_for_h100(f, c, pointers)
    for int_dot in (True, False):
        eight = "*i8" if int_dot else "*fp8e4nv"
        w8_pointers = {"x_ptr": eight, "w13_ptr": eight, "w2_ptr": eight, "a_ptr": eight, "w2_act_ptr": "*i8",
                       "x_scale_ptr": "*fp32", "s13_ptr": "*fp32", "s2_ptr": "*fp32", "a_scale_ptr": "*fp32",
                       "smoother_ptr": "*fp32", "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                       "out_ptr": "*fp32", "topk_weights_ptr": "*fp32"}
        for per_channel in (True, False):
            tiles = dict(INT_DOT=int_dot, PER_CHANNEL=per_channel, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1,
                         EVEN_K=True, WHILE_LOOP=False)
            kind = f"{'int8' if int_dot else 'fp8'} per_channel={per_channel}"
            cases[f"moe_w8a8_gate_up {kind}"] = lambda t=tiles, p=w8_pointers, q=int_dot: compile_for_h100(
                w8a8.moe_w8a8_gate_up_kernel, {**t, "QUANT_OUT": q}, p)
            cases[f"moe_w8a8_down {kind}"] = lambda t=tiles, p=w8_pointers: compile_for_h100(
                w8a8.moe_w8a8_down_kernel, {**t, "ROW_SCALE": True}, p)
    return cases


def _w8a8_dense_cases() -> dict[str, Callable[[], Any]]:
    """SmoothQuant's quantizing norm / smoother / activation kernels and INT8 GEMM; FP8's GEMV, quantization
    and quantizing norm / activation."""
    from kiln.kernels import triton_fp8_fused as fp8_fused
    from kiln.kernels import triton_fp8_gemv as fp8
    from kiln.kernels import triton_fp8_quant as fp8_quant
    from kiln.kernels import triton_smoothquant as sq
    from kiln.kernels.triton_smoothquant_configs import default_int8_config

    quant = {"q_ptr": "*i8", "act_scale_ptr": "*fp32", "out_scale_ptr": "*fp32", "smoother_ptr": "*fp32"}
    cases: dict[str, Callable[[], Any]] = {}
    for per_token in (True, False):
        cases[f"sq add_norm_quant per_token={per_token}"] = lambda t=per_token: compile_for_h100(
            sq._add_norm_quant_kernel, dict(HAS_RESIDUAL=True, HAS_BIAS=True, RMS=False, PER_TOKEN=t, BLOCK=4096),
            quant, scalar_types={"eps": "fp32"})
        cases[f"sq smooth_quant per_token={per_token}"] = lambda t=per_token: compile_for_h100(
            sq._smooth_quant_kernel, dict(HAS_SMOOTHER=True, PER_TOKEN=t, BLOCK=4096), quant)
        cases[f"sq act_quant per_token={per_token}"] = lambda t=per_token: compile_for_h100(
            sq._act_quant_kernel, dict(GATED=True, PER_TOKEN=t, BLOCK=4096), quant)
    gemm = {"a_ptr": "*i8", "b_ptr": "*i8", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "part_ptr": "*i32",
            "count_ptr": "*i32"}
    for rows, k, bias in ((1, 4096, False), (40, 4000, True), (2048, 4096, False)):  # decode split, ragged K, prefill
        c = default_int8_config(rows, 4096, k, 132)
        consts = dict(HAS_BIAS=bias, SPLIT=c.split_k > 1, EVEN_K=k % c.block_k == 0, WHILE_LOOP=False,
                      BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k)
        cases[f"sq int8_gemm {c}"] = lambda t=consts, c=c: compile_for_h100(
            sq._int8_gemm_kernel, t, gemm, num_warps=c.num_warps, num_stages=c.num_stages)
    for per_channel in (True, False):
        cases[f"fp8 gemv per_channel={per_channel}"] = lambda c=per_channel: compile_for_h100(
            fp8.fp8_gemv_kernel, dict(K=4096, ROW_SCALES=c, PER_CHANNEL=c, HAS_BIAS=True, DOT_F32=False,
                                      PRECISION="tf32", TILES_PER_SPLIT=8 if c else 32, SPLIT=c, WHILE_LOOP=False,
                                      BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
            {"x_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "part_ptr": "*fp32",
             "count_ptr": "*i32"})
    for mode in (fp8_quant.DYNAMIC, fp8_quant.STATIC, fp8_quant.GIVEN_PER_ROW):
        cases[f"fp8 quantize rows mode={mode}"] = lambda m=mode: compile_for_h100(
            fp8_quant.quantize_fp8_rows_kernel, dict(SCALE=m, BLOCK=16384),
            {"q_ptr": "*u8", "scale_ptr": "*fp32", "out_scale_ptr": "*fp32"})
    fp8_out = {"q_ptr": "*u8", "scale_ptr": "*fp32", "out_scale_ptr": "*fp32"}
    for mode in (fp8_quant.DYNAMIC, fp8_quant.STATIC):
        cases[f"fp8 fused add_norm mode={mode}"] = lambda m=mode: compile_for_h100(
            fp8_fused._add_norm_fp8_kernel, dict(HAS_RESIDUAL=True, HAS_BIAS=True, RMS=False, SCALE=m, BLOCK=4096),
            fp8_out, scalar_types={"eps": "fp32"}, num_warps=8)
        cases[f"fp8 fused act gated={mode == fp8_quant.DYNAMIC}"] = lambda m=mode: compile_for_h100(
            fp8_fused._act_fp8_kernel, dict(GATED=m == fp8_quant.DYNAMIC, SCALE=m, BLOCK=16384), fp8_out,
            num_warps=16)
    return cases


def run_all() -> dict[str, dict[str, Any]]:
    """case -> {"ok": bool, "error": the compiler's last line, "ptx_markers": which PTX magic numbers appear}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs the compiler: run it without TRITON_INTERPRET=1")
    results: dict[str, dict[str, Any]] = {}
    for name, build in {**_weight_only_cases(), **_moe_cases(), **_w8a8_dense_cases()}.items():
        try:
            kernel = build()
        except Exception as err:  # noqa: BLE001 - report every case, not just the first failure
            cause = err
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            results[name] = {"ok": False, "error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1:]}"}
            continue
        ptx = kernel.asm["ptx"]
        results[name] = {"ok": bool(kernel.asm.get("cubin")),
                         "ptx_markers": [m for m in ("0x43004300", "0x43084308", "0x7440") if m in ptx]}
    return results


if __name__ == "__main__":
    print(json.dumps(run_all()))
