"""Configs of the thin-matrix (decode) GEMM: the dataclass, row buckets, the candidates the build times, and the JSON
form of the build's choices in an engine's config.json.

Plain Python (no triton import), so that `kiln build` and engine loading can read and write choices on machines
without triton. A choice is keyed by (row bucket, out features N, in features K); a key without a Triton config
means cuBLAS (F.linear) won there, or nothing was tuned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_ROWS = 16  # decode batch sizes the GEMV serves; more rows are a GEMM, cuBLAS's domain
ROW_BUCKETS = (1, 2, 4, 8, 16)
# Rows of the tile the dot path multiplies: tl.dot needs at least 16 on each side, and every bucket fits in 16, so
# all buckets share one compiled kernel per tile.
DOT_ROWS = 16

GemvKey = tuple[int, int, int]  # (row bucket, N, K)


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape: BLOCK_N weight rows per program, BLOCK_K of K per step, SPLIT_K programs along K (their fp32
    partials summed by a second, deterministic pass), warps and pipeline stages. `dot` multiplies a [BLOCK_N,
    BLOCK_K] weight tile by the transposed [BLOCK_K, 16] input tile on the tensor cores; without it (one row only)
    each thread multiplies and adds in fp32 registers, one reduction at the end."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    dot: bool = True


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two (1, 2, 4, 8, 16): the batch sizes that share one choice."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


def gemv_key(rows: int, n: int, k: int) -> GemvKey:
    """The table key of a call's shape."""
    return (row_bucket(rows), n, k)


# The build times these (few, so tuning stays within its budget); each tile is tried without split-K and with the
# split that gives about two programs per SM (see split_candidates). Tiles stream 16-32 KiB of weights per stage.
DOT_TILES = ((64, 128, 4, 4), (32, 256, 4, 4), (128, 128, 8, 3), (16, 512, 4, 3))  # block_n, block_k, warps, stages
FMA_TILES = ((16, 512, 4, 2), (8, 1024, 4, 2))  # one row only


def split_candidates(n: int, k: int, block_n: int, block_k: int, sms: int) -> tuple[int, ...]:
    """1, and the smallest power of two that makes at least two programs per SM (when the N blocks alone are
    fewer), capped so that every split keeps at least two K steps."""
    programs = -(-n // block_n)
    steps = -(-k // block_k)
    split = 1
    while programs * split < 2 * sms and split * 2 * 2 <= steps and split < 16:
        split *= 2
    return (1,) if split == 1 else (1, split)


def candidate_configs(rows: int, n: int, k: int, sms: int) -> list[GemvConfig]:
    """The configs the build times for one (row bucket, N, K); FMA tiles only for one row."""
    out = []
    for tiles, dot in ((DOT_TILES, True), (FMA_TILES if rows == 1 else (), False)):
        for block_n, block_k, warps, stages in tiles:
            for split in split_candidates(n, k, block_n, block_k, sms):
                out.append(GemvConfig(block_n, block_k, split, warps, stages, dot))
    return out


def default_config() -> GemvConfig:
    """The config a direct `gemv` call without one uses (the tests and the benchmark's untuned rows)."""
    return GemvConfig(64, 128, 1, 4, 4, True)


def config_to_list(config: GemvConfig) -> list[Any]:
    """JSON form: [block_n, block_k, split_k, num_warps, num_stages, dot]."""
    return [config.block_n, config.block_k, config.split_k, config.num_warps, config.num_stages, config.dot]


def _power_of_two(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{what} must be a power of two >= {low}, got {value!r}")
    return value


def config_from_list(data: Any, what: str = "GEMV config") -> GemvConfig:
    """Inverse of config_to_list; a malformed entry raises ValueError naming what is wrong."""
    if not isinstance(data, (list, tuple)) or len(data) != 6:
        raise ValueError(f"{what} must be [block_n, block_k, split_k, num_warps, num_stages, dot], got {data!r}")
    block_n, block_k, split, warps, stages, dot = data
    if not isinstance(dot, bool):
        raise ValueError(f"{what} dot must be true or false, got {dot!r}")
    if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= 64:
        raise ValueError(f"{what} split_k must be an integer in 1..64, got {split!r}")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
        raise ValueError(f"{what} num_stages must be an integer in 1..8, got {stages!r}")
    return GemvConfig(_power_of_two(block_n, f"{what} block_n", 16 if dot else 1),
                      _power_of_two(block_k, f"{what} block_k", 16), split,
                      _power_of_two(warps, f"{what} num_warps", 1), stages, dot)


def entry_to_dict(rows: int, n: int, k: int, config: GemvConfig | None, tuned: bool,
                  triton_us: float | None = None, cublas_us: float | None = None) -> dict[str, Any]:
    """One recorded choice: the shape, who won ("triton" with its config, or "cublas") and the times measured."""
    entry: dict[str, Any] = {"rows": rows, "n": n, "k": k, "tuned": tuned,
                             "kernel": "cublas" if config is None else "triton",
                             "config": None if config is None else config_to_list(config)}
    if triton_us is not None:
        entry["triton_us"] = round(triton_us, 2)
    if cublas_us is not None:
        entry["cublas_us"] = round(cublas_us, 2)
    return entry


def table_from_entries(entries: Any) -> dict[GemvKey, GemvConfig]:
    """{(row bucket, N, K): config} of the tuned entries where Triton won; a malformed entry is a ValueError."""
    if not isinstance(entries, list):
        raise ValueError(f"kernels.linear entries must be a list, got {type(entries).__name__}")
    table: dict[GemvKey, GemvConfig] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not all(key in entry for key in ("rows", "n", "k", "kernel")):
            raise ValueError(f"kernels.linear entry {entry!r} lacks rows, n, k or kernel")
        if not entry.get("tuned") or entry["kernel"] == "cublas":
            continue
        rows, n, k = (entry[key] for key in ("rows", "n", "k"))
        if rows not in ROW_BUCKETS or not all(isinstance(v, int) and v > 0 for v in (n, k)):
            raise ValueError(f"kernels.linear entry {entry!r}: rows must be one of {ROW_BUCKETS} and n, k positive")
        if entry["kernel"] != "triton":
            raise ValueError(f"kernels.linear entry {entry!r}: kernel must be triton or cublas")
        config = config_from_list(entry.get("config"), f"kernels.linear config for rows {rows}, {n}x{k}")
        if not config.dot and rows != 1:
            raise ValueError(f"kernels.linear entry {entry!r}: the FMA (dot false) kernel serves one row only")
        table[(rows, n, k)] = config
    return table


def rows_table(table: dict[GemvKey, GemvConfig], n: int, k: int) -> tuple[GemvConfig | None, ...]:
    """For one weight shape, the config to use at each row count 0..MAX_ROWS (None: F.linear), so a call looks its
    choice up by indexing with its row count."""
    return tuple(None if rows == 0 else table.get(gemv_key(rows, n, k)) for rows in range(MAX_ROWS + 1))
