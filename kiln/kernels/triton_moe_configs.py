"""Tile configs of the fused MoE: the dataclasses, the size-based defaults, the table that `fused_moe` looks configs
up in, and their JSON form in an engine's config.json.

Plain Python (no triton import), so that `kiln build` and engine loading can read and write configs on machines
without triton. The launcher (triton_moe.py) and the tuner use this table; `kiln build` on a GPU tunes it per shape
and token bucket and stores it in the engine's "kernels" section, and loading the engine registers it here
(kiln.kernels.apply_engine_kernel_choices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GemmTile:
    """Column and reduction tile of one grouped GEMM, with its launch shape."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    """Tiles of the fused MoE: rows per sorted block (shared by both GEMMs), L2 grouping, and each GEMM's tile."""

    block_m: int
    group_m: int
    up: GemmTile
    down: GemmTile


MoeKey = tuple[int, int, int, int]  # (token bucket, hidden, ffn, local experts)
_MOE_CONFIGS: dict[MoeKey, MoeConfig] = {}
MAX_TOKEN_BUCKET = 4096


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def token_bucket(num_tokens: int) -> int:
    """Tokens rounded up to a power of two (capped at 4096): the batch sizes that share one tuned config."""
    return min(_next_power_of_2(max(num_tokens, 1)), MAX_TOKEN_BUCKET)


def token_buckets(max_num_tokens: int) -> list[int]:
    """Every bucket a step of at most `max_num_tokens` tokens can fall in: 1, 2, 4, ... up to its own bucket."""
    top = token_bucket(max_num_tokens)
    return [1 << i for i in range(top.bit_length())]


def moe_config_key(num_tokens: int, hidden: int, ffn: int, num_experts: int) -> MoeKey:
    """The table key of a call's shape."""
    return (token_bucket(num_tokens), hidden, ffn, num_experts)


def register_moe_config(key: MoeKey, config: MoeConfig) -> None:
    """Record a (tuned) config for a shape key; later fused_moe calls of that shape use it."""
    _MOE_CONFIGS[key] = config


def registered_moe_configs() -> dict[MoeKey, MoeConfig]:
    """A copy of the table (for tests and reports)."""
    return dict(_MOE_CONFIGS)


def clear_moe_configs() -> None:
    """Forget every registered config (fused_moe falls back to the defaults)."""
    _MOE_CONFIGS.clear()


def default_moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """Tiles by rows per expert: decode-sized blocks stream the weights with the smallest M tl.dot takes and deep
    K tiles; prefill-sized blocks use 64-128 rows so each weight tile feeds the tensor cores many times."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoeConfig(16, 1, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))
    if rows_per_expert <= 64:
        return MoeConfig(32, 4, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))
    if rows_per_expert <= 256:
        return MoeConfig(64, 8, GemmTile(64, 64, 4, 4), GemmTile(128, 64, 4, 4))
    return MoeConfig(128, 8, GemmTile(64, 64, 8, 4), GemmTile(128, 64, 8, 4))


def lookup_moe_config(num_tokens: int, hidden: int, ffn: int, num_experts: int, top_k: int) -> MoeConfig:
    """The registered config of this shape's key, else the default."""
    key = moe_config_key(num_tokens, hidden, ffn, num_experts)
    return _MOE_CONFIGS.get(key) or default_moe_config(num_tokens, top_k, num_experts)


def config_to_dict(config: MoeConfig) -> dict[str, Any]:
    """JSON form: {"block_m", "group_m", "up": [block_n, block_k, num_warps, num_stages], "down": [...]}."""
    tile = lambda t: [t.block_n, t.block_k, t.num_warps, t.num_stages]  # noqa: E731
    return {"block_m": config.block_m, "group_m": config.group_m, "up": tile(config.up), "down": tile(config.down)}


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _tile_from_list(value: Any, what: str) -> GemmTile:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{what} must be [block_n, block_k, num_warps, num_stages], got {value!r}")
    return GemmTile(*(_positive_int(v, what) for v in value))


def config_from_dict(data: Any, what: str = "fused MoE config") -> MoeConfig:
    """Inverse of config_to_dict; a malformed entry raises ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be an object, got {data!r}")
    missing = [k for k in ("block_m", "group_m", "up", "down") if k not in data]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    block_m = _positive_int(data["block_m"], f"{what} block_m")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"{what} block_m must be a power of two >= 16, got {block_m}")
    return MoeConfig(block_m, _positive_int(data["group_m"], f"{what} group_m"),
                     _tile_from_list(data["up"], f"{what} up"), _tile_from_list(data["down"], f"{what} down"))
