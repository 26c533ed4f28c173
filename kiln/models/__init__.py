"""Model families and the registry that maps Hugging Face architecture names to them."""

from __future__ import annotations

from typing import Any

from kiln.config import ConfigError
from kiln.models import baichuan, dbrx, mpt
from kiln.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (dbrx.FAMILY, mpt.FAMILY, baichuan.FAMILY)}

ARCHITECTURES: dict[str, Family] = {arch: f for f in FAMILIES.values() for arch in f.architectures}

PRESETS: dict[str, tuple[Family, dict[str, Any]]] = {
    name: (f, preset) for f in FAMILIES.values() for name, preset in f.presets.items()
}


def family_for_architecture(name: str) -> Family:
    """The family of a Hugging Face architecture name; an unknown one is an error that lists the known."""
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unknown architecture {name!r}; kiln supports {known}")
    return ARCHITECTURES[name]


def family_for_hf_config(hf: dict[str, Any]) -> Family:
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError("config.json has no 'architectures' entry; kiln needs it to know the model family")
    return family_for_architecture(archs[0])


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
