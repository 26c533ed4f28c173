"""Launch configs of SmoothQuant's INT8 GEMM (kiln.kernels.triton_smoothquant.int8_gemm): the default per call shape
and the short candidate lists that benchmarks/sweep_int8_gemm.py times. Plain Python (no triton import).

Two regimes:

- decode (M <= 16 rows): the GEMM is a weight stream, bound by HBM bandwidth. One 16-row tile (tl.dot's least),
  narrow N tiles and long K tiles, and split-K until the grid holds several programs per SM: an N = 4096 layer in
  128-wide tiles is only 32 programs on an H100's 132 SMs, too few loads in flight to reach the bandwidth.
- prefill (M >= 64): compute bound; big tiles for the int8 tensor cores, split only where the output tiles are
  fewer than the SMs (a short prefill; 2048 rows never split).

Rows in between take 32- or 64-row tiles and the same split rule. Every config gives the same bits: the int32 sums
are exact whatever the split (see int8_gemm)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

DECODE_ROWS = 16  # up to here one 16-row tile covers M
PREFILL_ROWS = 64  # from here big M tiles


@dataclass(frozen=True)
class Int8GemmConfig:
    """One launch: [block_m, block_n] output tiles walked along K in block_k steps, K cut into split_k slices (the
    launcher may use fewer: never an empty slice), num_warps and num_stages (Triton's software pipeline depth)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1

    def __str__(self) -> str:
        split = f" split{self.split_k}" if self.split_k > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}{split}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fill_splits(m: int, n: int, k: int, tile: Int8GemmConfig, sms: int, waves: int) -> int:
    """How many K slices bring the grid to `waves` programs per SM, within two limits: each slice keeps at least
    two K steps (a pipeline needs something to overlap), and the int32 partials (splits x M x N x 4 bytes, written
    and read once) stay under an eighth of the weight's N x K bytes. 1 when the output tiles alone fill the GPU.
    Rounded to the count of whole-step slices the launcher makes of it (9 slices of 64 steps are 8 of 8 steps)."""
    programs = _cdiv(m, tile.block_m) * _cdiv(n, tile.block_n)
    steps = max(1, _cdiv(k, tile.block_k))  # K = 0 still launches one slice
    by_traffic = k // (32 * m)  # splits * m * n * 4 <= n * k / 8
    splits = max(1, min(_cdiv(waves * sms, programs), steps // 2, by_traffic))
    return _cdiv(steps, _cdiv(steps, splits))


# (tile without its split, waves per SM its split aims at). The first of each list is the default; the sweep times
# them all. Tiles stage 9-48 KiB per pipeline stage (H100: 227 KiB of shared memory per block). The defaults are the
# H100 sweep's (session 9, benchmarks/sweep_int8_gemm.py over MPT-7B's four layers, in CUDA graphs): decode 16x16x512
# with 2 warps, 84.6 us a layer at M = 1 and 86.3 at M = 16 (the best config per shape: 82.3 / 85.9; bf16 148 / 150);
# prefill 128x128x128 with 8 warps, the best at every shape (674 us a layer at 2048 rows, bf16 1062).
_DECODE = (
    (Int8GemmConfig(16, 16, 512, 2, 3), 4),
    (Int8GemmConfig(16, 64, 256, 4, 3), 4),
    (Int8GemmConfig(16, 64, 128, 4, 4), 4),
    (Int8GemmConfig(16, 32, 256, 4, 3), 4),
    (Int8GemmConfig(16, 32, 512, 4, 3), 4),
    (Int8GemmConfig(16, 64, 512, 4, 2), 2),
    (Int8GemmConfig(16, 128, 256, 4, 3), 2),
    (Int8GemmConfig(16, 128, 64, 4, 3), 0),  # the first kernel's fixed decode tile, unsplit: the sweep's reference
)
_MIDDLE = (  # block_m 64, cut to 32 for M <= 32 (see _tiles)
    (Int8GemmConfig(64, 128, 128, 4, 3), 2),
    (Int8GemmConfig(64, 64, 256, 4, 3), 4),
    (Int8GemmConfig(64, 128, 64, 8, 3), 0),  # the first kernel's fixed tile for 16 < M <= 64
)
_PREFILL = (
    (Int8GemmConfig(128, 128, 128, 8, 3), 1),
    (Int8GemmConfig(128, 128, 128, 4, 4), 1),
    (Int8GemmConfig(128, 256, 64, 8, 3), 1),
    (Int8GemmConfig(128, 256, 128, 8, 3), 1),
    (Int8GemmConfig(64, 128, 128, 4, 4), 1),
    (Int8GemmConfig(64, 256, 128, 8, 3), 1),
    (Int8GemmConfig(256, 128, 64, 8, 3), 1),
    (Int8GemmConfig(128, 128, 64, 8, 3), 0),  # the first kernel's fixed prefill tile
)


def _tiles(m: int) -> tuple[tuple[Int8GemmConfig, int], ...]:
    if m <= DECODE_ROWS:
        return _DECODE
    if m < PREFILL_ROWS:
        return tuple((replace(t, block_m=32) if m <= 32 else t, w) for t, w in _MIDDLE)
    return _PREFILL


def _with_split(m: int, n: int, k: int, sms: int, tile: Int8GemmConfig, waves: int) -> Int8GemmConfig:
    """The tile with its split: waves 0 means never split."""
    return replace(tile, split_k=fill_splits(m, n, k, tile, sms, waves) if waves else 1)


def candidate_int8_configs(m: int, n: int, k: int, sms: int) -> list[Int8GemmConfig]:
    """The configs the sweep times for M rows of x [M, K] against an [N, K] weight on `sms` SMs (at most 8; the
    default first)."""
    return [_with_split(m, n, k, sms, tile, waves) for tile, waves in _tiles(m)]


@lru_cache(maxsize=4096)  # called per launch; a model has a few shapes and row counts
def default_int8_config(m: int, n: int, k: int, sms: int) -> Int8GemmConfig:
    """The config int8_gemm uses when given none."""
    tile, waves = _tiles(m)[0]
    return _with_split(m, n, k, sms, tile, waves)
