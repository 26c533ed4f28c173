"""Placing a model built on the meta device onto its real device.

A rank's model is built on `meta` and given its quantized parameters there (kiln.quant.apply) before any memory is
taken: built on the GPU directly, DBRX-132B would first allocate its 264 GB of bf16 experts only to swap them for
int8 storage layer by layer afterwards. Here each parameter gets uninitialised storage of its final dtype and shape
on the device (the caller fills it: a rank file, or dummy weights drawn in memory), and the derived buffers (RoPE
tables, ALiBi slopes) are computed again by their layers' `reset_buffers`.

Parameters keep their identity (torch.utils.swap_tensors): the matmul and expert bindings made by quantize_model
hold references to them, and the shard specs and format attributes set on them (shard_specs, weight_only,
logical_shape, ...) stay where convert's code reads them."""

from __future__ import annotations

import torch
from torch import nn


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter of `model` empty storage on `device` and recompute every layer's derived buffers
    there. Raises RuntimeError if a meta tensor is left (a layer with a buffer but no `reset_buffers`)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            placed = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                  requires_grad=param.requires_grad)
            placed.__dict__.update(param.__dict__)  # shard specs, the format's attributes
            torch.utils.swap_tensors(param, placed)
    with torch.device(device):
        for module in model.modules():
            reset = getattr(module, "reset_buffers", None)
            if reset is not None:
                reset()
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after placing the model on {device}: {left[:4]}; "
                           "their layer needs a reset_buffers()")
