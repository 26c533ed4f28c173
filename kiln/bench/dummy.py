"""An engine of dummy random weights at a preset's or config's shapes, converted and built into a temporary
directory that is removed however the run ends."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from kiln.bench.options import BenchOptions
from kiln.build import build
from kiln.checkpoint.convert import ConvertPlan, convert
from kiln.checkpoint.sources import DummyWeightSource, dummy_hf_config, keep_first_layers
from kiln.config import BuildConfig, ConfigError, ModelConfig, QuantConfig
from kiln.memory import describe
from kiln.models import family_for_hf_config


def dummy_model_config(options: BenchOptions,
                       quant: QuantConfig | None = None) -> tuple[ConvertPlan, ModelConfig]:
    """The convert plan of the dummy model (sharded as --tp_size/--pp_size/--moe_* say), with --num_layers and
    --dtype applied, quantized as `quant` says (random weights drawn straight in the format: nothing to round or calibrate)."""
    hf = dummy_hf_config(options.preset, options.config)
    family = family_for_hf_config(hf)
    config = family.config_from_hf(hf, options.dtype)
    keep_first_layers(config, options.num_layers)
    provenance = {"preset": options.preset, "config": options.config, "dummy": True, "seed": options.seed}
    seq_len = options.input_len + options.output_len
    if seq_len > config.max_position_embeddings:
        # The cases include a 2048-token prefill of the MPT-7B shape (2048 positions) with its outputs.
        # Dummy weights model nothing, and ALiBi or RoPE compute the same numbers at the first positions whatever
        # the table's length, so a dummy model's position limit is stretched to the case rather than refused.
        provenance["max_position_embeddings_of_the_config"] = config.max_position_embeddings
        config.max_position_embeddings = seq_len
    source = DummyWeightSource(options.seed, _dummy_device(options), tied_head=config.tie_word_embeddings)
    from kiln.bench.multirank import dummy_mapping

    # An 8-bit KV cache gets unit scales: dummy weights have nothing to calibrate on, and speed does not depend on them.
    kv = options.kv_cache_dtype.upper() if options.kv_cache_dtype else None
    quant = dataclasses.replace(quant or QuantConfig(), kv_cache_quant_algo=kv)
    plan = ConvertPlan(family, config, dummy_mapping(options, config), source, quant, provenance)
    return plan, config


def _dummy_device(options: BenchOptions) -> str:
    """Random weights are drawn on the GPU when there is one (as convert's --dummy_device cuda): minutes faster for
    real shapes."""
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device).type


def bench_build_config(options: BenchOptions, config: ModelConfig) -> BuildConfig:
    """Limits that fit every case exactly: the largest batch, prefilled in one step."""
    seq_len = options.input_len + options.output_len
    if seq_len > config.max_position_embeddings:
        raise ConfigError(f"--input_len + --output_len = {seq_len} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}; shorten the case")
    batch = max(options.batch_sizes)
    return BuildConfig(max_batch_size=batch, max_input_len=options.input_len, max_seq_len=seq_len, max_beam_width=1,
                       max_num_tokens=batch * options.input_len)


@contextlib.contextmanager
def dummy_engine(options: BenchOptions, log: Callable[[str], None] = print,
                 quant: QuantConfig | None = None) -> Iterator[Path]:
    """Convert dummy weights (quantized as `quant` says) and build an engine for the bench's cases in a temporary
    directory (kernels tuned on a GPU unless options.tune is off); yield the engine directory and remove everything
    afterwards. With options.in_memory the engine has no rank files: its ranks draw the weights when they load."""
    plan, config = dummy_model_config(options, quant)
    limits = bench_build_config(options, config)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        quantized = "" if plan.quant.quant_algo is None else f", weight-only {plan.quant.quant_algo}"
        log(f"dummy {config.architecture} ({config.dtype}{quantized}, {config.num_hidden_layers} layers): converting "
            f"and building in {tmp}")
        stretched = plan.provenance.get("max_position_embeddings_of_the_config")
        if stretched is not None:
            log(f"note: the case needs {config.max_position_embeddings} positions, the config has {stretched}: the "
                "dummy model's limit is raised to the case (dummy weights; positions are computed the same way)")
        if options.in_memory:
            log("weights in memory: each rank draws them when it loads; no rank file is written")
        convert(plan, tmp / "checkpoint", progress=False, weights_in_memory=options.in_memory)
        _, memory = build(tmp / "checkpoint", tmp / "engine", limits, tune=options.tune, log=log)
        log(describe(memory, limits, None, plan.quant.kv_cache_quant_algo))  # before anything is allocated
        yield tmp / "engine"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
