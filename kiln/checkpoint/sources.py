"""Where convert gets each full (unsharded) kiln tensor: a Hugging Face checkpoint through the family's weight map,
or dummy random weights made without any source file."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import torch

from kiln.checkpoint.hf_reader import CheckpointError, HFCheckpoint, read_json
from kiln.checkpoint.safety import check_claimed_layers
from kiln.config import ConfigError, ModelConfig
from kiln.models.family import Family, expected_sources, find_rule, rules_for_checkpoint, sources_for
from kiln.models.transforms import TRANSFORMS
from kiln.quant.kv_published import PUBLISHED_SCALE_PATTERNS


class HFWeightSource:
    """Full kiln tensors made from a Hugging Face checkpoint by the family's weight rules."""

    def __init__(self, checkpoint: HFCheckpoint, family: Family, config: ModelConfig, source_layers: int) -> None:
        self.checkpoint, self.config = checkpoint, config
        # The family's own layout, or another published one (DBRX "converted") that maps onto the same kiln names.
        self.rules = rules_for_checkpoint(family, config, checkpoint.names())
        self._check_names(family, source_layers)

    def _check_names(self, family: Family, source_layers: int) -> None:
        """Fail before writing anything if a tensor is missing or a tensor is not understood."""
        present = self.checkpoint.names()
        # The claim is checked against the names present before any list is sized by it (an edited n_layers of
        # 10^9 would otherwise build a set of billions of names).
        check_claimed_layers(self.rules, present, source_layers, self.checkpoint.dir)
        needed = expected_sources(self.rules, self.config.num_hidden_layers)
        missing = sorted(needed - present)
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) missing from {self.checkpoint.dir}: {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else "")
            )
        known = expected_sources(self.rules, source_layers)
        # Published KV-cache scales (vLLM's k_scale/v_scale) are read by kiln.quant.kv_published, not the weight map.
        ignored = [re.compile(p) for p in (*family.ignored_sources, *PUBLISHED_SCALE_PATTERNS)]
        unexpected = sorted(n for n in present - known if not any(p.search(n) for p in ignored))
        if unexpected:
            raise CheckpointError(
                f"{len(unexpected)} unexpected tensor(s) in {self.checkpoint.dir} that the {family.name} weight map "
                f"does not use: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
                + "; is this the right model family and config.json?"
            )

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        rule = find_rule(self.rules, name)
        names = sources_for(rule, name)
        tensors = [self.checkpoint.get(n) for n in names]
        for n, t in zip(names, tensors):
            if not t.dtype.is_floating_point:  # .to(dtype) would turn integers into weights without a word
                raise CheckpointError(f"{n} in {self.checkpoint.dir} holds {t.dtype} values where weights are "
                                      "floating point; the file is damaged or not this model's")
        try:
            full = TRANSFORMS[rule.transform](tensors, self.config)
        except RuntimeError as err:  # a reshape that does not fit: the tensor has the wrong size
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
            raise CheckpointError(f"cannot make {name} from {shapes}: {err}") from err
        if tuple(full.shape) != tuple(shape):
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
            raise CheckpointError(
                f"shape mismatch for {name}: made {tuple(full.shape)} from {shapes}, but config.json implies "
                f"{tuple(shape)}"
            )
        return full


class DummyWeightSource:
    """Random weights at the model's real shapes: normal(0, 0.02) for matrices, ones for norm weights, zeros for
    biases. Each tensor is seeded by its name, so every tp/pp split of the same dummy model holds the same numbers.
    With `tied_head` (a model whose LM head is its embedding, as MPT's), the head is seeded as the embedding."""

    def __init__(self, seed: int = 0, device: str = "cpu", std: float = 0.02, tied_head: bool = False) -> None:
        self.seed, self.device, self.std, self.tied_head = seed, torch.device(device), std, tied_head

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.tied_head and name == "lm_head.weight":
            name = "embed_tokens.weight"
        # On the drawing device like the weights: SmoothQuant folds its factors (on that device) into the norms.
        if name.endswith(".bias"):
            return torch.zeros(shape, device=self.device)
        if len(shape) == 1 and "norm" in name:
            return torch.ones(shape, device=self.device)
        return torch.randn(shape, generator=self._generator(name), device=self.device).mul_(self.std)

    def in_memory_record(self) -> dict[str, Any]:
        """What config.json records of an engine whose weights are drawn at load (kiln.checkpoint.in_memory)."""
        return {"source": "dummy", "seed": self.seed, "std": self.std, "device": self.device.type,
                "tied_head": self.tied_head}

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str) -> "DummyWeightSource":
        """The source an in-memory record describes; CheckpointError (one line) for a record kiln did not write."""
        seed, std, device = record.get("seed"), record.get("std"), record.get("device")
        valid = (record.get("source") == "dummy" and isinstance(seed, int) and not isinstance(seed, bool)
                 and isinstance(std, (int, float)) and 0 < std < 1e3 and device in ("cpu", "cuda")
                 and isinstance(record.get("tied_head"), bool))
        if not valid:
            raise CheckpointError(f"{where}: weights_in_memory {record} is not a dummy-weight record kiln writes "
                                  "(source dummy, integer seed, std > 0, device cpu or cuda); rebuild the engine")
        return cls(seed, device, float(std), record["tied_head"])

    def _generator(self, name: str) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return gen

    def random_quantized(self, name: str, method: Any, shape: tuple[int, ...],
                         dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """A weight-only quantized weight drawn straight in its format (kiln.quant.dummy_weights): what
        `method.quantize` returns, without a float weight to round."""
        from kiln.quant.dummy_weights import random_quantized

        return random_quantized(method, shape, dtype, self.std, self._generator(name), self.device)


def dummy_hf_config(preset: str | None, config_path: str | Path | None) -> dict:
    """The Hugging Face style config of dummy weights: a copy of a built-in preset, or a config.json file."""
    if preset is not None:
        from kiln.models import PRESETS

        return json.loads(json.dumps(PRESETS[preset][1]))
    return read_json(Path(str(config_path)), "--config file")


def keep_first_layers(config: ModelConfig, num_layers: int | None) -> None:
    """--num_layers: keep the model's first N layers (a slice at full width for measuring)."""
    if num_layers is None:
        return
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ConfigError(f"--num_layers must be between 1 and the model's {config.num_hidden_layers} layers")
    config.num_hidden_layers = num_layers
