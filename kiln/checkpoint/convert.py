"""convert: a Hugging Face checkpoint (or dummy weights) -> kiln checkpoint (config.json + rank{r}.safetensors).

Each full tensor is read once, transformed, then cut into every rank's shard and appended to that rank's file, so
memory holds a few tensors at a time whatever the model size, and no rank file needs another rank's bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from kiln.checkpoint.atomic import atomic_output_dir
from kiln.checkpoint.hf_reader import CheckpointError
from kiln.checkpoint.kiln_format import IN_MEMORY_KEY
from kiln.checkpoint.output_guard import check_output_dir
from kiln.checkpoint.safety import check_fits
from kiln.checkpoint.safetensors_writer import StreamingSafetensorsWriter
from kiln.checkpoint.tokenizer_files import copy_tokenizer_files
from kiln.config import FORMAT_VERSION, ConfigError, Mapping, ModelConfig, QuantConfig
from kiln.layers.sharding import full_shape, shard_for
from kiln.models.family import Family
from kiln.quant.apply import quantize_model
from kiln.quant.calib_data import calibration_tokens
from kiln.quant.calibrate import CalibrationOptions, calibrate
from kiln.quant.dummy_weights import draws_directly
from kiln.quant.fp8_calibration import with_fp8_input_scales
from kiln.quant.group_wise import group_wise_method, slice_groups
from kiln.quant.kv_calibration import with_kv_scales
from kiln.quant.sq_calibration import with_smoothquant


class WeightSource(Protocol):
    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor: ...


@dataclass
class ConvertPlan:
    """Everything convert needs once the inputs are resolved."""

    family: Family
    config: ModelConfig
    mapping: Mapping
    source: WeightSource
    quant: QuantConfig
    provenance: dict[str, Any]
    kv_calibration: Any = None  # kiln.quant.kv_calibration.KVCalibration for an INT8/FP8 KV cache (None: defaults)
    calibration: CalibrationOptions | None = None  # AWQ/GPTQ; None: group-wise formats round to nearest
    calib_dataset: str | None = None  # a local text file for AWQ/GPTQ (None: kiln's shipped calibration text)


def meta_model(family: Family, config: ModelConfig, mapping: Mapping,
               quant: QuantConfig | None = None) -> torch.nn.Module:
    """The model of one rank without storage: its parameter names, local shapes and shard specs (quantized ones
    when `quant` says so)."""
    with torch.device("meta"):
        model = family.model_class(config, mapping)
    quantize_model(model, quant)
    return model


def rank_parameters(plan: ConvertPlan) -> list[dict[str, torch.nn.Parameter]]:
    return [dict(meta_model(plan.family, plan.config, plan.mapping.for_rank(r), plan.quant).named_parameters())
            for r in range(plan.mapping.world_size)]


def stored_dtype(param: torch.nn.Parameter, dtype: torch.dtype) -> torch.dtype:
    """What a rank file stores for `param`: int8 / FP8 quantized weights and int32 act-order group indices as they
    are, every float in the engine dtype."""
    return param.dtype if param.dtype in (torch.int8, torch.int32, torch.float8_e4m3fn) else dtype


def _quantize_full(param: torch.nn.Parameter, full: torch.Tensor | None, dtype: torch.dtype,
                   scales: dict[str, torch.Tensor], name: str,
                   calibrated: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """A weight-only quantized parameter's full unpacked values; its full scale (and group-wise zero points) wait in
    `scales` for their own turn in the write order (after the layer's bias). `calibrated` is what a calibration
    (GPTQ) chose for this weight instead of rounding to nearest, or a dummy source's values drawn in the format."""
    q, scale, *zero = calibrated or param.weight_only.quantize(full, dtype)  # q [..., out, in]
    scales[name + "_scale"] = scale.to(dtype)  # [..., out] per channel; [..., out, groups] group-wise
    if zero:
        scales[name + "_zero"] = zero[0].to(dtype)
    return q


def checkpoint_config(plan: ConvertPlan) -> dict[str, Any]:
    return {
        "kiln_format_version": FORMAT_VERSION,
        "kind": "checkpoint",
        **plan.config.to_dict(),
        "mapping": plan.mapping.to_dict(),
        "quantization": dataclasses.asdict(plan.quant),
        "provenance": plan.provenance,
    }


def _given_values(calibrated: Any, param: torch.nn.Parameter, name: str) -> tuple[torch.Tensor, ...] | None:
    """The values a calibration or a published checkpoint chose for quantized `param` (q [..., out, in] first), checked
    against its full shape; None for a weight rounded from its float."""
    values = calibrated(name) if hasattr(param, "weight_only") else None
    if values is not None and tuple(values[0].shape) != tuple(full_shape(param)):
        raise CheckpointError(f"shape mismatch for {name}: its quantized values are {tuple(values[0].shape)}, but "
                              f"config.json implies {tuple(full_shape(param))}")
    return values


class TensorSink(Protocol):
    """Where convert puts each rank's tensors, in order: a rank file (StreamingSafetensorsWriter), or the parameters
    of a model in memory (kiln.checkpoint.in_memory)."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


def write_tensors(plan: ConvertPlan, ranks: list[dict[str, torch.nn.Parameter]], order: list[str],
                  writers: list[TensorSink | None], progress: bool) -> None:
    """Read each full tensor once, in the global order, and hand every rank's shard of it to that rank's sink. A
    rank whose parameter dict is empty (and whose sink is None) is skipped: the in-memory path fills one rank."""
    dtype = plan.config.torch_dtype
    scales: dict[str, torch.Tensor] = {}
    calibrated = getattr(plan.source, "quantized_weight", lambda name: None)  # GPTQ's chosen values, by name
    for name in tqdm(order, desc="convert", unit="tensor", disable=not progress):
        holders = [r for r, params in enumerate(ranks) if name in params]
        if not holders:
            continue
        first = ranks[holders[0]][name]
        method = getattr(first, "weight_only", None)
        drawn = getattr(plan.source, "random_quantized", None) if draws_directly(method) else None
        if getattr(first, "is_weight_scale", False):
            full = scales.pop(name)
        elif drawn is not None:  # dummy weights drawn in the stored format: no float copy to round or calibrate
            full = _quantize_full(first, None, dtype, scales, name, drawn(name, first.weight_only, full_shape(first),
                                                                          dtype))
        elif (given := _given_values(calibrated, first, name)) is not None:
            # GPTQ's/AWQ's chosen or a published checkpoint's values: no float copy to read (a published DBRX layer's
            # experts dequantized in float32 would take several times their packed size)
            full = _quantize_full(first, None, dtype, scales, name, given)
        else:
            # int32 (act-order g_idx) stays integer; a quantized weight's float source is read in the engine dtype
            full = plan.source.full_tensor(name, full_shape(first)).to(torch.int32 if first.dtype == torch.int32
                                                                        else dtype)
            if hasattr(first, "weight_only"):  # quantize the full weight once; each rank packs its own shard
                full = _quantize_full(first, full, dtype, scales, name)
        for r in holders:
            shard = shard_for(ranks[r][name], full)
            if hasattr(first, "weight_only"):
                shard = first.weight_only.pack(shard)
            elif hasattr(ranks[r][name], "group_slice"):  # group-wise scale/zero: this rank's group columns
                shard = slice_groups(shard, *ranks[r][name].group_slice)
            writers[r].write(name, shard.contiguous())  # type: ignore[union-attr]
        del full


def with_scale_sources(plan: ConvertPlan, progress: bool) -> ConvertPlan:
    """The plan with the KV-cache and static FP8 input scales in front of its source (calibrated first, on the float
    model, for a real checkpoint; unit or dummy scales for dummy weights)."""
    plan = with_kv_scales(plan, progress)  # an INT8/FP8 KV cache: calibrate its scales first, on the float model
    return with_fp8_input_scales(plan, progress)  # static FP8 activations: calibrate their scales too


def write_order(plan: ConvertPlan, progress: bool) -> tuple[ConvertPlan, list[str]]:
    """The plan with SmoothQuant's smoothing in front of its source (when the format asks for it), and the global
    order in which tensors are made: the one-rank model's parameter order."""
    full_model = meta_model(plan.family, plan.config, Mapping(), plan.quant)
    plan = with_smoothquant(plan, dict(full_model.named_parameters()), progress)  # SmoothQuant: calibrate, smooth
    return plan, [name for name, _ in full_model.named_parameters()]


def convert(plan: ConvertPlan, output_dir: str | Path, progress: bool = True, weights_in_memory: bool = False) -> Path:
    """Write the kiln checkpoint of `plan` to `output_dir` atomically and return its path. With `weights_in_memory`
    (dummy weights only) no rank file is written: config.json records how to draw the weights, and each rank draws
    its own into its parameters when it loads (kiln.checkpoint.in_memory)."""
    inputs = tuple(Path(plan.provenance[k]) for k in ("model_dir", "config") if plan.provenance.get(k))
    check_output_dir(Path(output_dir), inputs)  # before the size estimate: a refused path is the clearer message
    if weights_in_memory:
        return _convert_in_memory(plan, Path(output_dir), inputs)
    check_fits(plan.family, plan.config, Path(output_dir), dummy=bool(plan.provenance.get("dummy")))
    plan = with_scale_sources(plan, progress)
    if plan.calibration is None:
        return _convert(plan, Path(output_dir), inputs, progress)
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as scratch:
        return _convert(calibrated(plan, Path(scratch), progress), Path(output_dir), inputs, progress)


def calibrated(plan: ConvertPlan, scratch: Path, progress: bool) -> ConvertPlan:
    """The plan with AWQ's or GPTQ's results in front of its weight source (their files under `scratch`)."""
    options = plan.calibration
    method = group_wise_method(plan.quant.quant_algo, plan.quant.group_size)
    if options is None or method is None:
        raise ValueError("calibration is for the group-wise formats W4A16_AWQ and W4A16_GPTQ")
    tokens = calibration_tokens(plan.provenance.get("model_dir"), plan.config.vocab_size, options.sequences,
                                options.length, options.seed, plan.calib_dataset)
    source = calibrate(plan.config, plan.source, method, tokens, options, scratch, progress,
                       lm_head=plan.quant.quantize_lm_head)
    text = plan.calib_dataset or "kiln/eval/data/calibration.txt"
    record = {**dataclasses.asdict(options), "sequences": int(tokens.shape[0]),
              "dataset": text if plan.provenance.get("model_dir") else "seeded random token ids (no tokenizer)"}
    return dataclasses.replace(plan, source=source, provenance={**plan.provenance, "calibration": record})


def _convert(plan: ConvertPlan, output_dir: Path, inputs: tuple[Path, ...], progress: bool) -> Path:
    plan, order = write_order(plan, progress)
    ranks = rank_parameters(plan)
    dtype = plan.config.torch_dtype
    with atomic_output_dir(output_dir, inputs) as tmp:
        writers: list[StreamingSafetensorsWriter] = []
        try:
            for r, params in enumerate(ranks):
                writers.append(StreamingSafetensorsWriter(tmp / f"rank{r}.safetensors",
                                                          [(n, stored_dtype(p, dtype), tuple(p.shape))
                                                           for n, p in params.items()],
                                                          {"format": "pt", "kiln_rank": str(r)}))
            write_tensors(plan, ranks, order, list(writers), progress)
        except BaseException:
            for writer in writers:  # an open file would keep the removed file's disk space until collected
                with contextlib.suppress(OSError):
                    writer.file.close()
            raise
        for writer in writers:
            writer.close()
            # Engines hard-link these files (kiln build): read-only, so an edit of one cannot silently change both.
            os.chmod(writer.path, 0o444)
        if plan.provenance.get("model_dir"):  # dummy weights have no tokenizer
            copy_tokenizer_files(Path(plan.provenance["model_dir"]), tmp)
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(plan), indent=2) + "\n")
    return Path(output_dir)


def _convert_in_memory(plan: ConvertPlan, output_dir: Path, inputs: tuple[Path, ...]) -> Path:
    """A checkpoint of config.json alone, recording the dummy source that each rank draws its weights from."""
    record = getattr(plan.source, "in_memory_record", None)
    if record is None or plan.calibration is not None:
        raise ConfigError("weights in memory are dummy weights drawn at load (kiln bench --preset/--config); a real "
                          "checkpoint's weights are converted into rank files")
    config = {**checkpoint_config(plan), IN_MEMORY_KEY: record()}
    with atomic_output_dir(output_dir, inputs) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return output_dir
