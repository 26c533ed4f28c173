"""Numbers read from environment variables, refused with the variable's name when they are not numbers (a bare
`float(os.environ[...])` fails with "could not convert string to float" and no hint of which variable)."""

from __future__ import annotations

import math
import os

from kiln.config import ConfigError


def env_float(name: str, default: float, low: float = 0.0) -> float:
    """The variable `name` as a finite number > `low`, or `default` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > low):
        raise ConfigError(f"environment variable {name}={raw!r} must be a number > {low:g}; fix or unset it")
    return value


def env_int(name: str) -> int | None:
    """The variable `name` as an integer, or None when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer; fix or unset it") from None
