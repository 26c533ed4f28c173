"""Launcher of kiln's fused MoE (contract: reference.fused_moe; kernels in triton_moe_kernels.py).

Four launches whatever the batch: align (sort assignments by expert), one grouped GEMM for gate+up with SiLU-GLU in
its epilogue, one grouped GEMM for down with the routing weight applied, and a sum over the top-k choices. Tile
shapes come from a table keyed by (token bucket, hidden, ffn, experts) (triton_moe_configs.py), filled by
`tune_moe_buckets` on the GPU at build time, with a size-based default where it has no entry. Nothing syncs with
the host, so it captures in a CUDA graph."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kiln.kernels.triton_common import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_device, check_shape, check_tensor
from kiln.kernels.triton_common import dot_precision, dot_upcast, next_power_of_2, while_loops
from kiln.kernels.triton_moe_configs import GemmTile, MoeConfig, MoeKey, default_moe_config, lookup_moe_config
from kiln.kernels.triton_moe_configs import moe_config_key, register_moe_config, token_bucket
from kiln.kernels.triton_moe_kernels import moe_align_kernel, moe_down_kernel, moe_gate_up_kernel, moe_sum_kernel

__all__ = ["GemmTile", "MoeConfig", "MoeKey", "AlignedRouting", "align_routing", "default_moe_config", "fused_moe",
           "lookup_moe_config", "moe_config_key", "register_moe_config", "token_bucket", "tune_fused_moe",
           "tune_moe_buckets"]


def _check_moe_inputs(hidden, w13, w2, topk_weights, topk_ids, expert_start) -> None:
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    device = hidden.device
    check_device(device)
    check_tensor("w13", w13, 3, (hidden.dtype,), device)
    check_tensor("w2", w2, 3, (hidden.dtype,), device)
    check_tensor("topk_weights", topk_weights, 2, FLOAT_DTYPES, device, last_dim_contiguous=False)
    check_tensor("topk_ids", topk_ids, 2, INDEX_DTYPES, device, last_dim_contiguous=False)
    tokens, size = hidden.shape
    experts, two_ffn = w13.shape[0], w13.shape[1]
    if two_ffn % 2 != 0:
        raise ValueError(f"w13 must stack [gate; up] rows (2 * ffn), got {two_ffn} rows")
    check_shape("w13", w13, (experts, two_ffn, size))
    check_shape("w2", w2, (experts, size, two_ffn // 2))
    check_shape("topk_ids", topk_ids, (tokens, topk_ids.shape[1]))
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape))
    if not isinstance(expert_start, int) or expert_start < 0:
        raise ValueError(f"expert_start must be a non-negative int, got {expert_start!r}")


@dataclass(frozen=True)
class AlignedRouting:
    """The align step's output: assignment ids sorted by expert in BLOCK_M-padded runs, and each block's expert."""

    sorted_ids: torch.Tensor  # [num_blocks * block_m] int32; num_assignments marks padding
    block_expert: torch.Tensor  # [num_blocks] int32; -1 for blocks past the padded total
    block_m: int


def align_routing(topk_ids: torch.Tensor, num_experts: int, expert_start: int, block_m: int) -> AlignedRouting:
    """Sort the local (token, choice) assignments by expert (as vLLM's moe_align_block_size), in one launch.
    The grid bound needs no sync: every non-empty block holds a real assignment, and each expert adds at most
    one partial block."""
    ids = topk_ids.contiguous()  # [tokens, top_k]
    assignments = ids.numel()
    num_blocks = max(1, min(assignments, assignments // block_m + num_experts))
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    experts_pad = max(16, next_power_of_2(num_experts))
    moe_align_kernel[(1,)](
        ids, sorted_ids, block_expert, assignments, expert_start, num_experts, sorted_ids.numel(), num_blocks,
        BLOCK_M=block_m, EXPERTS_PAD=experts_pad, CHUNK=max(16, min(256, 4096 // experts_pad)), num_warps=4,
    )
    return AlignedRouting(sorted_ids, block_expert, block_m)


@functools.lru_cache(maxsize=None)
def _shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on this GPU (opt-in limit); 160 KiB where torch does not say."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 160 * 1024))


def _fitting_stages(tile: GemmTile, block_m: int, b_tiles: int, dtype: torch.dtype, device: torch.device) -> int:
    """The tile's pipeline depth, lowered until its buffers (A and B tiles per stage) fit in shared memory: a
    config tuned for 2-byte types would not fit for fp32 otherwise."""
    per_stage = (block_m + b_tiles * tile.block_n) * tile.block_k * torch.empty((), dtype=dtype).element_size()
    budget = _shared_memory_bytes(device) - 8 * 1024  # room for the kernel's own scratch
    return max(1, min(tile.num_stages, budget // per_stage))


def _launch_gate_up(hidden, w13, act, routing: AlignedRouting, top_k: int, config: MoeConfig) -> None:
    ffn, size = w13.shape[1] // 2, w13.shape[2]
    tile = config.up
    num_m = routing.block_expert.numel()
    moe_gate_up_kernel[(num_m * cdiv(ffn, tile.block_n),)](
        hidden, w13, act, routing.sorted_ids, routing.block_expert, act.shape[0], top_k, ffn, size, num_m,
        hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=config.group_m,
        EVEN_K=size % tile.block_k == 0, DOT_F32=dot_upcast(hidden.dtype, hidden.device),
        PRECISION=dot_precision(hidden.dtype), WHILE_LOOP=while_loops(hidden.device),
        num_warps=tile.num_warps, num_stages=_fitting_stages(tile, config.block_m, 2, hidden.dtype, hidden.device),
    )


def _launch_down(act, w2, weights, part, routing: AlignedRouting, config: MoeConfig) -> None:
    size, ffn = w2.shape[1], w2.shape[2]
    tile = config.down
    num_m = routing.block_expert.numel()
    moe_down_kernel[(num_m * cdiv(size, tile.block_n),)](
        act, w2, part, weights, routing.sorted_ids, routing.block_expert, act.shape[0], size, ffn, num_m,
        act.stride(0), w2.stride(0), w2.stride(1), part.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=config.group_m,
        EVEN_K=ffn % tile.block_k == 0, DOT_F32=dot_upcast(act.dtype, act.device),
        PRECISION=dot_precision(act.dtype), WHILE_LOOP=while_loops(act.device),
        num_warps=tile.num_warps, num_stages=_fitting_stages(tile, config.block_m, 1, act.dtype, act.device),
    )


def _launch_sum(part, out, topk_ids, expert_start: int, num_experts: int) -> None:
    tokens, size = out.shape
    top_k = topk_ids.shape[1]
    block = min(1024, max(16, next_power_of_2(size)))
    moe_sum_kernel[(tokens, cdiv(size, block))](
        part, out, topk_ids, top_k, size, expert_start, num_experts, out.stride(0),
        TOP_K_PAD=max(2, next_power_of_2(top_k)), BLOCK=block, num_warps=4,
    )


def fused_moe(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden]: rows [gate; up]
    w2: torch.Tensor,  # [local_experts, hidden, ffn]
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int = 0,
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:  # [tokens, hidden]
    """Triton version of reference.fused_moe (choices of experts outside this rank's range add nothing)."""
    _check_moe_inputs(hidden, w13, w2, topk_weights, topk_ids, expert_start)
    run = plan_moe_run(hidden, w13.shape[0], w13.shape[1] // 2, topk_ids, expert_start, config)
    if run.routing is None:
        return run.out
    _launch_gate_up(hidden, w13, run.act, run.routing, run.top_k, run.config)
    _launch_down(run.act, w2, topk_weights.contiguous(), run.part, run.routing, run.config)
    _launch_sum(run.part, run.out, run.ids, expert_start, w13.shape[0])
    return run.out


@dataclass(frozen=True)
class MoeRun:
    """One fused-MoE call's config, routing and buffers (routing None: nothing to compute, `out` is zeros)."""

    out: torch.Tensor  # [tokens, hidden]
    config: MoeConfig | None
    ids: torch.Tensor  # [tokens, top_k], contiguous
    top_k: int
    routing: AlignedRouting | None = None
    act: torch.Tensor | None = None  # [assignments, ffn]
    part: torch.Tensor | None = None  # [assignments, hidden] fp32


def plan_moe_run(hidden: torch.Tensor, experts: int, ffn: int, topk_ids: torch.Tensor, expert_start: int,
                 config: MoeConfig | None, act_dtype: torch.dtype | None = None) -> MoeRun:
    """The tiles (looked up unless given), the aligned routing and the buffers of one call (shared by the bf16, the
    weight-only and the W8A8 fused MoE); the intermediate `act` is in `act_dtype` (default: hidden's)."""
    tokens, size = hidden.shape
    top_k = topk_ids.shape[1]
    out = torch.empty(tokens, size, dtype=hidden.dtype, device=hidden.device)
    ids = topk_ids.contiguous()
    if tokens == 0 or top_k == 0 or experts == 0:
        return MoeRun(out.zero_(), config, ids, top_k)
    config = config or lookup_moe_config(tokens, size, ffn, experts, top_k)
    routing = align_routing(ids, experts, expert_start, config.block_m)
    act = torch.empty(tokens * top_k, ffn, dtype=act_dtype or hidden.dtype, device=hidden.device)
    part = torch.empty(tokens * top_k, size, dtype=torch.float32, device=hidden.device)
    return MoeRun(out, config, ids, top_k, routing, act, part)


_BLOCK_M_CANDIDATES = (16, 32, 64, 128)
_TILE_CANDIDATES = tuple(
    GemmTile(n, k, w, s)
    for n, k, w, s in ((64, 64, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 8, 4),
                       (128, 128, 8, 3), (256, 64, 8, 3), (32, 128, 4, 5))
)
# Short timings: the build tunes every token bucket of an engine's MoE shape, and should finish in a minute or two.
_WARMUP_MS, _REP_MS = 3, 10


def block_m_candidates(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, ...]:
    """Row-block sizes worth timing: up to twice the expected rows per expert (at least 16). Larger blocks would be
    mostly padding, so only prefill-sized buckets try them; this keeps build-time tuning short."""
    rows = num_tokens * top_k / max(num_experts, 1)
    return tuple(m for m in _BLOCK_M_CANDIDATES if m == 16 or m <= 2 * rows)


def _time_best(launch, tiles: tuple[GemmTile, ...]) -> tuple[GemmTile, float]:
    """The fastest tile for `launch(tile)` by median CUDA-event time (tiles that do not fit or do not compile for
    this GPU are skipped; if none works the time is inf and the caller keeps its default)."""
    import triton.testing
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    best, best_ms = tiles[0], float("inf")
    for tile in tiles:
        try:
            ms = triton.testing.do_bench(lambda: launch(tile), warmup=_WARMUP_MS, rep=_REP_MS, return_mode="median")
        except (OutOfResources, CompilationError):
            continue
        if ms < best_ms:
            best, best_ms = tile, ms
    return best, best_ms


def tune_fused_moe(
    num_tokens: int, hidden: int, ffn: int, num_experts: int, top_k: int,
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None, register: bool = True,
    block_ms: tuple[int, ...] | None = None,
) -> MoeConfig:
    """Time candidate tiles of both grouped GEMMs at this shape on the current GPU (random routing) and return the
    fastest config, registering it for the shape's key unless `register` is False. `block_ms` limits the row
    blocks tried (default: all). On the CPU it returns the default: interpreter timings say nothing about a GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    default = default_moe_config(num_tokens, top_k, num_experts)
    if device.type != "cuda":
        return default
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    w13 = torch.randn(num_experts, 2 * ffn, hidden, dtype=dtype, device=device) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, ffn, dtype=dtype, device=device) * ffn**-0.5
    scores = torch.rand(num_tokens, num_experts, device=device)
    weights, ids = scores.softmax(-1).topk(top_k, dim=-1)
    act = torch.empty(num_tokens * top_k, ffn, dtype=dtype, device=device)
    part = torch.empty(num_tokens * top_k, hidden, dtype=torch.float32, device=device)
    best, best_ms = default, float("inf")
    for block_m in block_ms or _BLOCK_M_CANDIDATES:
        routing = align_routing(ids, num_experts, 0, block_m)
        probe = MoeConfig(block_m, default.group_m, default.up, default.down)

        def up(tile: GemmTile) -> None:
            _launch_gate_up(x, w13, act, routing, top_k, MoeConfig(block_m, probe.group_m, tile, probe.down))

        def down(tile: GemmTile) -> None:
            _launch_down(act, w2, weights, part, routing, MoeConfig(block_m, probe.group_m, probe.up, tile))

        up_tile, up_ms = _time_best(up, _TILE_CANDIDATES)
        down_tile, down_ms = _time_best(down, _TILE_CANDIDATES)
        if up_ms + down_ms < best_ms:
            best, best_ms = MoeConfig(block_m, default.group_m, up_tile, down_tile), up_ms + down_ms
    if register:
        register_moe_config(moe_config_key(num_tokens, hidden, ffn, num_experts), best)
    return best


def tune_moe_buckets(
    buckets: list[int], hidden: int, ffn: int, num_experts: int, top_k: int, dtype: torch.dtype,
    device: torch.device, budget_s: float = 120.0, log: Callable[[str], None] | None = None,
) -> dict[int, tuple[MoeConfig, bool]]:
    """Tune one MoE shape (this rank's experts) for each token bucket, smallest first, and return
    {bucket: (config, tuned)}. Buckets left when `budget_s` seconds have passed keep their default (tuned False),
    so a build never runs away; so do all buckets on a CPU."""
    start = time.perf_counter()
    table: dict[int, tuple[MoeConfig, bool]] = {}
    for bucket in buckets:
        if device.type != "cuda" or time.perf_counter() - start > budget_s:
            table[bucket] = (default_moe_config(bucket, top_k, num_experts), False)
            continue
        config = tune_fused_moe(bucket, hidden, ffn, num_experts, top_k, dtype, device, register=False,
                                block_ms=block_m_candidates(bucket, top_k, num_experts))
        table[bucket] = (config, True)
        if log is not None:
            log(f"  fused MoE {bucket:5d} tokens: block_m {config.block_m}, up {config.up}, down {config.down} "
                f"({time.perf_counter() - start:.0f} s)")
    return table
