"""Compile kiln's weight-only kernels for an H100 (sm_90) on a machine without a GPU and count the SASS instructions
of their main loop: a first answer to "is this kernel issue-bound?" before any device time is spent.

Each SM issues at most 4 warp-instructions per clock, so a loop that runs I instructions per thread with W warps over
a tile of B stored bytes can stream at most 4 B / (I W) bytes per clock per SM: times 132 SMs and 1.755 GHz, the
'issue bound' printed (an H100 SXM reads HBM at about 3.0-3.3 TB/s, so a bound near that is a kernel that cannot
reach its floor whatever the memory system does). Triton's compiler and ptxas ship in the triton wheel; nvdisasm too.

    python benchmarks/sass_weight_only.py            # both kernels, INT4/INT8, per channel and group 128
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels.triton_weight_only_gemv_kernels import weight_only_gemv_kernel
from kiln.kernels.triton_weight_only_kernels import weight_only_kernel

SMS, CLOCK_GHZ = 132, 1.755


def _compile(fn, pointers: dict, ints: list[str], consts: dict, warps: int, stages: int):
    sig = {**pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in consts}}
    # every pointer and integer divisible by 16, as Triton specializes real layers' sizes and strides
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + len(ints))}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def tensor_core_kernel(bits: int, group: int, asm: bool, block_n: int = 64, block_k: int = 256, warps: int = 4,
                       stages: int = 4):
    pointers = {name: "*bf16" for name in ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "part_ptr")}
    pointers.update(w_ptr="*i8", part_ptr="*fp32", count_ptr="*i32")
    ints = ["M", "N", "K", "KW", "k_offset", "v_per_split", "stride_xm", "stride_wn", "stride_sn", "stride_ym"]
    consts = dict(BITS=bits, GROUP=group, HAS_ZERO=group > 0, HAS_BIAS=False, SPLIT=True, BLOCK_M=16,
                  BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=True, DOT_F32=False, PRECISION="tf32", LAST_REDUCES=True,
                  WHILE_LOOP=False, ASM=asm)
    return _compile(weight_only_kernel, pointers, ints, consts, warps, stages)


def one_row_kernel(bits: int, group: int, block_n: int = 64, block_k: int = 256, warps: int = 4, stages: int = 4):
    pointers = {name: "*bf16" for name in ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "part_ptr")}
    pointers.update(x_ptr="*i32" if bits == 4 else "*bf16", w_ptr="*i8", part_ptr="*fp32", count_ptr="*i32")
    ints = ["N", "K", "KW", "k_offset", "v_per_split", "stride_wn", "stride_sn"]
    consts = dict(BITS=bits, GROUP=group, HAS_ZERO=group > 0, HAS_BIAS=False, SPLIT=True, BLOCK_N=block_n,
                  BLOCK_K=block_k, EVEN_K=True, PREFETCH=stages >= 2, LAST_REDUCES=True, WHILE_LOOP=False)
    return _compile(weight_only_gemv_kernel, pointers, ints, consts, warps, stages)


def main_loop(kernel) -> tuple[int, Counter]:
    """(instructions, opcode counts) of the longest backward-branching loop of the kernel's SASS."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(kernel.asm["cubin"])
    lines = subprocess.run([nvdisasm, "-c", handle.name], capture_output=True, text=True, check=True).stdout.splitlines()
    os.unlink(handle.name)
    address = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
    code = [(int(m.group(1), 16), m.group(2)) for line in lines for m in [address.search(line)] if m]
    labels = {}
    for index, line in enumerate(lines):
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            following = [int(m.group(1), 16) for rest in lines[index + 1:] for m in [address.search(rest)] if m]
            if following:
                labels[label.group(1)] = following[0]
    best: list[str] = []
    for at, text in code:
        branch = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", text)
        if branch and labels.get(branch.group(1), at) < at:
            body = [t for a, t in code if labels[branch.group(1)] <= a <= at]
            best = max(best, body, key=len)
    ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in best)
    return len(best), ops


def report(name: str, kernel, warps: int, tile_bytes: int) -> None:
    count, ops = main_loop(kernel)
    per_byte = count * warps / tile_bytes  # warp-instructions per stored byte
    bound = 4 / per_byte * SMS * CLOCK_GHZ / 1e3
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
    print(f"| {name} | {count} | {per_byte:.3f} | {bound:.2f} | {top} |", flush=True)


def main() -> None:
    print("| kernel (64 rows x tile, 4 warps) | loop instructions per thread | warp-instructions per byte | "
          "issue bound TB/s | most frequent |")
    print("|---|---|---|---|---|")
    for bits, group in ((4, 0), (4, 128), (8, 0)):
        block_k = 256 if bits == 4 and group == 0 else 128
        tile = 64 * block_k * bits // 8
        label = f"int{bits}" + (f" g{group}" if group else "")
        for asm in (False, True):
            report(f"tensor cores, {label}, {'PTX' if asm else 'plain'} dequant",
                   tensor_core_kernel(bits, group, asm, block_k=block_k), 4, tile)
        report(f"one-row FMA, {label}", one_row_kernel(bits, group, block_k=block_k), 4, tile)


if __name__ == "__main__":
    main()
