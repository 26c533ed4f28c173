"""Checks that keep a hostile or damaged checkpoint from making kiln read outside its directory, build lists sized by
a number someone edited, or write a model that cannot fit where it is written."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch

from kiln.config import ConfigError, Mapping, ModelConfig
from kiln.models.family import Family, WeightRule

GB = 1e9


class UnsafeCheckpointError(ValueError):
    """A checkpoint that points kiln at files outside its own directory."""


def contained_file(root: Path, entry: Any, where: str) -> Path:
    """The file `entry` (a relative name from an index) inside `root`; refuse absolute paths, `..` and symlinks that
    resolve outside `root`, so that a checkpoint can never make kiln read another file on the host."""
    if not isinstance(entry, str) or not entry:
        raise UnsafeCheckpointError(f"{where} names {entry!r}, which is not a file name")
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    absolute = PurePosixPath(entry).is_absolute() or entry.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", entry)
    if absolute or ".." in parts:
        raise UnsafeCheckpointError(f"{where} names {entry!r}, outside the model directory {root}; a checkpoint may "
                                    "only name files inside its own directory")
    return resolved_inside(root, root / entry, where)


def resolved_inside(root: Path, path: Path, where: str) -> Path:
    """`path` if it resolves (symlinks followed) inside `root`; else refuse."""
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafeCheckpointError(f"{where}: {path.name} resolves to {real}, outside the model directory {root} (a "
                                    "symlink that escapes); copy the file into the directory instead")
    return path


def layers_present(rules: list[WeightRule], names: set[str]) -> int:
    """How many layers the checkpoint's tensors hold: one more than the highest layer index any per-layer rule's
    source name matches (0 when none). Counted from the names present, never from the config's claim."""
    patterns = [re.compile("^" + re.escape(src).replace(r"\{layer\}", r"(\d+)") + "$")
                for rule in rules if "{layer}" in rule.kiln for src in rule.sources]
    highest = -1
    for name in names:
        for pattern in patterns:
            match = pattern.match(name)
            if match:
                highest = max(highest, int(match.group(1)))
                break
    return highest + 1


def check_claimed_layers(rules: list[WeightRule], names: set[str], claimed: int, model_dir: Path) -> None:
    """Refuse a config.json that claims more layers than the weights hold, before any list is sized by the claim."""
    present = layers_present(rules, names)
    if claimed > present:
        raise ConfigError(f"config.json in {model_dir} claims {claimed} layers, but its weight files hold tensors for "
                          f"{present}; fix the layer count in config.json (or use --num_layers to keep fewer)")


def model_bytes(family: Family, config: ModelConfig) -> tuple[int, int]:
    """(total bytes, largest tensor's elements) of the full model in its dtype, from meta models of one and two layers
    (so that the estimate costs the same whatever the layer count)."""
    def meta_sizes(layers: int) -> tuple[int, int]:
        small = dataclasses.replace(config, num_hidden_layers=layers)
        with torch.device("meta"):
            params = list(family.model_class(small, Mapping()).parameters())
        return sum(p.numel() for p in params), max(p.numel() for p in params)

    one, largest = meta_sizes(1)
    two, _ = meta_sizes(2)
    total = one + (two - one) * (config.num_hidden_layers - 1)
    return total * config.torch_dtype.itemsize, largest


def check_fits(family: Family, config: ModelConfig, output_dir: Path, dummy: bool,
               free_bytes: Callable[[Path], int] | None = None) -> None:
    """Refuse, before anything is written, a checkpoint larger than the free space where it goes, or a dummy model
    one of whose tensors (drawn in float32) is larger than the host's memory: say how many bytes it would need."""
    needed, largest = model_bytes(family, config)
    parent = existing_parent(output_dir)
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(parent)
    if needed > free:
        raise ConfigError(f"this checkpoint needs {needed / GB:,.1f} GB, and {parent} has {free / GB:,.1f} GB free; "
                          "free space, choose another --output_dir, or shrink the model (--num_layers)")
    memory = host_memory_bytes()
    if dummy and memory and largest * 4 > memory:
        raise ConfigError(f"a tensor of this dummy model needs {largest * 4 / GB:,.1f} GB to generate, more than this "
                          f"host's {memory / GB:,.1f} GB of memory; use smaller sizes in the config")


def existing_parent(path: Path) -> Path:
    """The nearest directory of `path` (or its parents) that exists: where the disk usage can be asked."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def host_memory_bytes() -> int:
    """Physical memory of the host, or 0 where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def config_from_hf(family: Family, hf: dict[str, Any], dtype: str | None, **extra: Any) -> ModelConfig:
    """The family's config_from_hf, with a missing key or a value of the wrong JSON type (a list, null, a number in a
    string) reported as one line naming it instead of a traceback from inside the family's code."""
    try:
        return family.config_from_hf(hf, dtype, **extra)
    except ConfigError:
        raise
    except KeyError as err:
        raise ConfigError(f"config.json lacks {err.args[0]!r}, which a {family.name} config needs") from err
    except (TypeError, AttributeError, ValueError) as err:
        raise ConfigError(f"config.json has a value of the wrong type for a {family.name} config ({err}); numbers "
                          "must be JSON numbers and sections JSON objects") from err
