"""What a model family declares: its architecture names, how its Hugging Face config maps to kiln's, and its weight
map as data (Hugging Face names -> kiln names, with fusions and named transforms)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kiln.config import ModelConfig


@dataclass(frozen=True)
class WeightRule:
    """One kiln parameter made from one or more Hugging Face tensors. `{layer}` in both patterns stands for the
    layer index; `transform` names a function in kiln.models.transforms (applied to the sources in order)."""

    kiln: str
    sources: tuple[str, ...]
    transform: str = "identity"

    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.kiln).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


@dataclass(frozen=True)
class WeightLayout:
    """Another published layout of a family's weights (e.g. DBRX "converted" for AutoGPTQ, experts split into one
    Linear each), recognised by a tensor name that only this layout has; its rules map it onto the same kiln names."""

    name: str
    marker: str  # a regex that some tensor name of this layout matches, and no name of the family's own layout
    # (config, the checkpoint's tensor names) -> rules; the names let it check a count it sizes lists by
    weight_rules: Callable[[ModelConfig, set[str]], list[WeightRule]]


@dataclass(frozen=True)
class Family:
    """A registered model family. `presets` are Hugging Face style config dicts for dummy weights at real shapes."""

    name: str
    architectures: tuple[str, ...]
    model_class: type
    config_from_hf: Callable[..., ModelConfig]
    weight_rules: Callable[[ModelConfig], list[WeightRule]]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignored_sources: tuple[str, ...] = ()  # regexes of checkpoint tensors that carry nothing kiln needs
    layouts: tuple[WeightLayout, ...] = ()  # other published layouts of the same weights


def layout_of(family: Family, names: set[str]) -> WeightLayout | None:
    """The other layout whose marker some tensor name matches; None for the family's own layout."""
    for layout in family.layouts:
        marker = re.compile(layout.marker)
        if any(marker.search(n) for n in names):
            return layout
    return None


def rules_for_checkpoint(family: Family, config: ModelConfig, names: set[str]) -> list[WeightRule]:
    """The weight rules that read a checkpoint holding tensors `names`: its layout's, else the family's own."""
    layout = layout_of(family, names)
    return layout.weight_rules(config, names) if layout is not None else family.weight_rules(config)


def hf_dtype(hf: dict[str, Any], default: str = "float32") -> str:
    """The dtype a Hugging Face config declares (`torch_dtype` in older files, `dtype` in newer ones)."""
    value = hf.get("torch_dtype") or hf.get("dtype") or default
    return str(value).replace("torch.", "")


def sources_for(rule: WeightRule, kiln_name: str) -> list[str]:
    match = rule.regex().match(kiln_name)
    if match is None:
        raise KeyError(kiln_name)
    layer = match.groupdict().get("layer")
    return [s.replace("{layer}", layer) if layer is not None else s for s in rule.sources]


def find_rule(rules: list[WeightRule], kiln_name: str) -> WeightRule:
    for rule in rules:
        if rule.regex().match(kiln_name):
            return rule
    raise KeyError(f"no weight rule makes {kiln_name}")


def expected_sources(rules: list[WeightRule], num_layers: int) -> set[str]:
    """Every Hugging Face tensor name the rules read for a model of `num_layers` layers."""
    names: set[str] = set()
    for rule in rules:
        layers = range(num_layers) if "{layer}" in rule.kiln else [None]
        for layer in layers:
            names.update(s.replace("{layer}", str(layer)) if layer is not None else s for s in rule.sources)
    return names


def identity(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    return tensors[0]
