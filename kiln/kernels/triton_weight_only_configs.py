"""Launch configs of the fused weight-only kernel (triton_weight_only_kernels.weight_only_kernel): the dataclass, the
size-based default, the candidates `kiln build` times on the GPU, and their JSON form in an engine's config.json
(kernels.weight_only). Plain Python (no triton import), so that build and loading read and write them anywhere.

A choice is keyed by (row bucket, N, K, bits, group size) for the fused path's row counts (1..64); prefill rows
(dequantize + cuBLAS) have nothing to tune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FUSED_MAX_ROWS = 64  # above: dequantize once, then cuBLAS
WO_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WoKey = tuple[int, int, int, int, int]  # (row bucket, N, K, bits, group_size)


@dataclass(frozen=True)
class WoConfig:
    """BLOCK_N output rows per program, BLOCK_K logical inputs per tile (a divisor of the group size for group-wise
    weights), split_k slices of K (0: as many as make about two programs per SM), warps and pipeline stages; gemv:
    one row of bf16 x goes to the fp32-FMA kernel (triton_weight_only_gemv) instead of the tensor-core one, where
    num_stages 1 loads each tile when it is multiplied and 2 or more loads the next tile meanwhile (a register
    double buffer: Triton's own pipelining covers only loads that feed a dot)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    gemv: bool = False


def wo_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: the batch sizes that share one choice (1..64)."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


def default_block_k(bits: int, group: int) -> int:
    """128 stored bytes per row per tile per channel; group-wise, the largest of 128/64/32 dividing G."""
    if group == 0:
        return 256 if bits == 4 else 128
    return next(b for b in (128, 64, 32) if group % b == 0)


def default_wo_config(rows: int, bits: int, group: int, k: int = 0) -> WoConfig:
    """The untuned choice: 64 rows of W per program, the default tile depth (halved, down to 32, until it divides K:
    whole tiles need no mask along K and load as vectors), split K automatically."""
    block_k = default_block_k(bits, group)
    while k and k % block_k and block_k > 32:
        block_k //= 2
    return WoConfig(64, block_k, 0, 4, 4 if rows <= 16 else 3)


# (block_n, stored bytes per row per tile, warps, stages): 2-16 KiB of weights per stage. Few, because each distinct
# tile compiles once per row block (16, 32, 64) and the build's tuning should take well under a minute. The last two
# give each warp 32 rows of W (two wgmma row tiles per warpgroup): the per-tile work around the dequantization (x's
# tile, barriers, addresses) is shared by twice the bytes, 0.205 sm_90 warp-instructions per byte for INT4 group 128
# against 0.25-0.26 with 16 rows a warp, 0.164 / 0.154 against 0.18 for INT4 / INT8 per channel
# (benchmarks/sass_weight_only.py's count, session 10).
_TILES = ((64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (32, 128, 4, 4), (16, 256, 4, 4), (128, 64, 4, 4),
          (128, 128, 4, 3))


# The one-row FMA kernel's tiles: (block_n, stored bytes per row per tile, warps, stages, split_k). Stages 2:
# the next tile prefetched, 1: not (both compile to the same registers otherwise). Fixed splits beside the automatic
# one: with one row a program holds few registers, so an SM fits more of them than the automatic two, and more
# programs keep more weight bytes in flight.
_GEMV_TILES = ((64, 128, 4, 2, 0), (32, 128, 4, 2, 0), (128, 128, 8, 2, 0), (64, 64, 4, 2, 0), (64, 128, 4, 1, 0),
               (64, 128, 4, 2, 4), (64, 128, 4, 2, 8), (32, 128, 4, 2, 8))


def candidate_wo_configs(rows: int, bits: int, group: int) -> list[WoConfig]:
    """The configs the build times for one (row bucket, N, K, format): each tile with automatic split-K, and the first
    without a split; group-wise tiles never cross a group (deeper ones are cut to the group size)."""
    out: list[WoConfig] = []
    for index, (block_n, nbytes, warps, stages) in enumerate(_TILES):
        if nbytes > 128 and rows > 16:
            continue  # deep tiles spill registers with 32-64 rows of x (ptxas, sm_90)
        block_k = nbytes * 8 // bits
        if group:
            block_k = min(block_k, default_block_k(bits, group))
        if rows > 16:
            stages = min(stages, 3)
        for split in ((0, 1) if index == 0 else (0,)):
            config = WoConfig(block_n, block_k, split, warps, stages)
            if config not in out:
                out.append(config)
    if rows == 1:
        for block_n, nbytes, warps, stages, split in _GEMV_TILES:
            block_k = nbytes * 8 // bits
            if group:
                block_k = min(block_k, default_block_k(bits, group))
            config = WoConfig(block_n, block_k, split, warps, stages, True)
            if config not in out:
                out.append(config)
    return out


def config_to_list(config: WoConfig) -> list[int]:
    return [config.block_n, config.block_k, config.split_k, config.num_warps, config.num_stages, int(config.gemv)]


def _power_of_two(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{what} must be a power of two >= {low}, got {value!r}")
    return value


def config_from_list(data: Any, what: str) -> WoConfig:
    """Inverse of config_to_list (engines built before the gemv flag have five entries); a malformed entry raises
    ValueError naming what is wrong."""
    if not isinstance(data, (list, tuple)) or len(data) not in (5, 6):
        raise ValueError(f"{what} must be [block_n, block_k, split_k, num_warps, num_stages, gemv], got {data!r}")
    block_n, block_k, split, warps, stages = data[:5]
    gemv = data[5] if len(data) == 6 else 0
    if gemv not in (0, 1) or isinstance(gemv, float):
        raise ValueError(f"{what} gemv must be 0 or 1, got {gemv!r}")
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= 64:
        raise ValueError(f"{what} split_k must be an integer in 0..64, got {split!r}")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
        raise ValueError(f"{what} num_stages must be an integer in 1..8, got {stages!r}")
    return WoConfig(_power_of_two(block_n, f"{what} block_n", 16), _power_of_two(block_k, f"{what} block_k", 32),
                    split, _power_of_two(warps, f"{what} num_warps", 1), stages, bool(gemv))


def entry_to_dict(rows: int, shape: tuple[int, int, int, int], config: WoConfig | None, tuned: bool,
                  triton_us: float | None = None, bf16_us: float | None = None) -> dict[str, Any]:
    """One recorded choice: rows, the shape (n, k, bits, group), the config (None: the default) and the times."""
    n, k, bits, group = shape
    entry: dict[str, Any] = {"rows": rows, "n": n, "k": k, "bits": bits, "group_size": group, "tuned": tuned,
                             "config": None if config is None else config_to_list(config)}
    if triton_us is not None:
        entry["triton_us"] = round(triton_us, 2)
    if bf16_us is not None:
        entry["bf16_cublas_us"] = round(bf16_us, 2)  # the same matmul on an unquantized weight, for reference
    return entry


def table_from_entries(entries: Any) -> dict[WoKey, WoConfig]:
    """{(row bucket, N, K, bits, group): config} of the tuned entries; a malformed entry is a ValueError."""
    if not isinstance(entries, list):
        raise ValueError(f"kernels.weight_only entries must be a list, got {type(entries).__name__}")
    table: dict[WoKey, WoConfig] = {}
    for entry in entries:
        keys = ("rows", "n", "k", "bits", "group_size")
        if not isinstance(entry, dict) or not all(key in entry for key in keys):
            raise ValueError(f"kernels.weight_only entry {entry!r} lacks one of {', '.join(keys)}")
        if not entry.get("tuned") or entry.get("config") is None:
            continue
        rows, n, k, bits, group = (entry[key] for key in keys)
        if rows not in WO_ROW_BUCKETS or bits not in (4, 8) or not all(isinstance(v, int) and v > 0 for v in (n, k)):
            raise ValueError(f"kernels.weight_only entry {entry!r}: rows must be one of {WO_ROW_BUCKETS}, bits 4 or "
                             "8, n and k positive")
        config = config_from_list(entry["config"], f"kernels.weight_only config for rows {rows}, {n}x{k}")
        if group and group % config.block_k:
            raise ValueError(f"kernels.weight_only entry {entry!r}: block_k must divide the group size")
        table[(rows, n, k, bits, group)] = config
    return table


def rows_configs(table: dict[WoKey, WoConfig], n: int, k: int, bits: int, group: int) -> tuple[WoConfig, ...]:
    """For one weight, the config at each row count 0..FUSED_MAX_ROWS (tuned where the table has it, else the
    default), so that a call picks its config by indexing with its row count."""
    return tuple(table.get((wo_bucket(rows), n, k, bits, group)) or default_wo_config(rows, bits, group, k)
                 for rows in range(FUSED_MAX_ROWS + 1))
