"""Shared helpers of kiln's Triton launchers: input checks that raise clear errors, and device facts."""

from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    tensor: object,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
    last_dim_contiguous: bool = True,
) -> torch.Tensor:
    """Check rank, dtype, device and inner-dimension contiguity of one launcher argument; return it."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {tensor.dtype}; the kernel takes {allowed}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {device}; move it there")
    if last_dim_contiguous and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {tensor.stride()}); "
                         "call .contiguous() first")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise when `tensor` does not have exactly `shape`."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Raise when `tensor` is not contiguous (kernels that index it flat need that)."""
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (stride {tensor.stride()}); call .contiguous() first")


def check_device(device: torch.device) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only under the interpreter (TRITON_INTERPRET=1)."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"Triton kernels need CUDA tensors, got tensors on {device}")


def dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tiles must be cast to float32 before tl.dot.

    Triton 3.6's interpreter multiplies bfloat16 tiles as their raw uint16 bits (its create_dot skips the bf16
    conversion), so on the CPU, which only the interpreter serves, bf16 tiles are upcast first. On a GPU the
    tensor cores take bf16 directly."""
    return device.type == "cpu" and dtype == torch.bfloat16


# KILN_ASM_DEQUANT=0 turns the PTX dequantization (triton_dequant_asm) off, to time the plain Triton arithmetic it
# replaces; read once (bench_weight_only.py flips the module attribute).
ASM_DEQUANT = os.environ.get("KILN_ASM_DEQUANT", "1") != "0"


def asm_dequant(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weight-only kernels dequantize in PTX: bf16 activations on an NVIDIA GPU (the interpreter and ROCm
    run no PTX; the bf16 magic numbers serve bf16 only)."""
    return ASM_DEQUANT and dtype == torch.bfloat16 and device.type == "cuda" and torch.version.hip is None


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use exact fp32 products ("ieee"), not TF32, so results match the fp32 reference to ~1e-5."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (a small stand-in on the CPU, where the interpreter runs programs in turn)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block(dim: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a kernel holding one row of `dim` elements per program in registers: BLOCK the power of
    two >= dim (16 at least), ~8 elements per thread in flight (4 warps up to 1024, 8 up to 4096: MPT-7B's rows,
    16 above)."""
    block = max(next_power_of_2(dim), 16)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def while_loops(device: torch.device) -> bool:
    """Whether kernels must drive their runtime-bounded loops with `while` instead of `for ... in range`.

    Triton 3.6's interpreter (the only way to run on the CPU) turns range() bounds into Python ints with int() of
    1-element arrays, which NumPy >= 2.4 rejects. On the GPU the `for` form stays: only it is software-pipelined
    (num_stages). Both forms call the same @triton.jit step function, so the interpreter still checks all the math."""
    return device.type == "cpu"


def matmul_output(x: torch.Tensor, n: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The output y [M, N] of x [M, K] @ W[N, K].T (+ bias), and whether it is already final: an empty product (no
    rows or columns) or K = 0 (y is the bias, or zeros) needs no kernel launch."""
    rows, k = x.shape
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return y, True
    if k == 0:
        return (y.zero_() if bias is None else y.copy_(bias.expand(rows, n))), True
    return y, False


_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
SPLIT_COUNTER_SLOTS = 1 << 16  # column blocks per launch (N / BLOCK_N): far above any layer's


def split_counters(device: torch.device) -> torch.Tensor | None:
    """The int32 counters [SPLIT_COUNTER_SLOTS], all 0, that split-K kernels whose last program sums the partials
    count their programs in (each such kernel leaves them 0). One buffer per device, shared by every launch: kiln's
    kernels on a device run in one stream's order, never two at once. Allocated on first use outside a CUDA graph
    capture (None during one: the caller reduces with a second kernel instead); binding allocates it early."""
    counters = _SPLIT_COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _SPLIT_COUNTERS[device] = torch.zeros(SPLIT_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return counters

