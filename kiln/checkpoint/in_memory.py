"""Dummy weights that never touch the disk: each rank draws its own into its model's parameters when it loads.

`kiln bench` measures real shapes with dummy weights. Written out, DBRX-132B in INT4 group-128 is a ~70 GB rank file
that a 64 GB disk cannot hold, and a 7B/13B case writes and reads 14-26 GB for nothing. An engine converted with
`weights_in_memory` (kiln.checkpoint.convert) has a config.json that records the dummy source (seed, std, device)
and no rank file. Its ranks run convert's own tensor loop (kiln.checkpoint.convert.write_tensors: the same global
order, transforms, weight-only formats drawn straight in the format, tp/pp/ep sharding and packing), with this
rank's parameters as the only sink: every tensor is drawn, cut and packed as convert would write it, then copied
into the parameter. So an in-memory engine holds bit-identical weights to the same dummy engine written to disk and
loaded, and memory holds the model's parameters plus the one full tensor being drawn (an expert weight is drawn in
its quantized format: one byte per weight, never a float copy of the experts)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.checkpoint.convert import ConvertPlan, with_scale_sources, write_order, write_tensors
from kiln.checkpoint.hf_reader import CheckpointError
from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.checkpoint.sources import DummyWeightSource
from kiln.config import ConfigError


class ParameterSink:
    """A rank's parameters as convert's sink: `write(name, tensor)` copies the rank's shard, as convert would store it,
    into the parameter of that name (dtype and shape must match exactly, as a rank file's would)."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        param = self.params.get(name)
        if param is None:
            raise CheckpointError(f"dummy weights drew {name}, which the model does not have")
        if tensor.dtype != param.dtype or tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"dummy weights drew {name} as {tensor.dtype} {tuple(tensor.shape)}, the model "
                                  f"holds {param.dtype} {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        self.written.add(name)

    def check_complete(self) -> None:
        missing = sorted(set(self.params) - self.written)
        if missing:
            raise CheckpointError(f"dummy weights left {len(missing)} parameter(s) undrawn: {missing[:6]}")


def draw_device(recorded: str, device: torch.device) -> torch.device:
    """Where the weights are drawn: the recorded device type (a CPU generator and a CUDA one draw different numbers, so
    the type decides which engine on disk this one equals), on the rank's own GPU when that is a GPU too."""
    if recorded == device.type:
        return device
    if recorded == "cuda" and not torch.cuda.is_available():
        raise ConfigError("this engine's dummy weights are drawn on a GPU (recorded device cuda) and no GPU is "
                          "visible; rebuild it with --device cpu (kiln bench) to run it on the CPU")
    return torch.device(recorded)


def dummy_plan(info: ArtifactInfo, device: torch.device) -> ConvertPlan:
    """The convert plan that the engine's dummy weights came from: its model, mapping, quantization and source."""
    record = info.weights_in_memory
    if record is None:
        raise ValueError(f"{info.path} keeps its weights in rank files")
    source = DummyWeightSource.from_record(record, f"{info.path}/config.json")
    source.device = draw_device(source.device.type, device)
    # Dummy provenance only: no model_dir, so the scale sources take their dummy values (unit KV scales, FP8's dummy
    # amax, SmoothQuant's absmax 1) whatever an edited config.json names, as convert did for dummy weights.
    return ConvertPlan(info.family, info.model, info.mapping, source, info.quant, {"dummy": True})


def draw_rank_weights(model: nn.Module, info: ArtifactInfo, rank: int, device: torch.device) -> None:
    """Fill rank `rank`'s parameters (already on `device`, kiln.layers.materialize) with the engine's dummy weights,
    drawn through convert's tensor loop exactly as convert would write that rank's file."""
    plan = with_scale_sources(dummy_plan(info, device), progress=False)
    plan, order = write_order(plan, progress=False)
    params = dict(model.named_parameters())
    ranks: list[dict[str, nn.Parameter]] = [{} for _ in range(info.mapping.world_size)]
    ranks[rank] = params  # the other ranks hold nothing here: each draws its own in its own process
    sink = ParameterSink(params)
    sinks: list[ParameterSink | None] = [None] * info.mapping.world_size
    sinks[rank] = sink
    write_tensors(plan, ranks, order, sinks, progress=False)  # type: ignore[arg-type]
    sink.check_complete()
