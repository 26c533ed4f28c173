"""The decode floor: the bytes a decode step must read (active weights + KV cache) over the memory bandwidth
measured in the same process with a large copy."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from kiln.checkpoint.convert import meta_model
from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.memory import MemoryPlan


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None, reps: int | None = None) -> float:
    """Memory bandwidth from a large copy on `device` (1 GiB on a GPU, 128 MiB on the CPU): bytes read + bytes
    written per second, in GB/s. Decode reads each weight once, so its floor is bytes read over this rate."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**27
    reps = reps or (10 if device.type == "cuda" else 5)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del src, dst
    return 2 * nbytes * reps / elapsed / 1e9


def expected_active_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected number of distinct experts a layer runs for `batch` tokens that each pick top_k of num_experts
    uniformly: E * (1 - (1 - k/E)^B). (Real routers are not uniform; this is the floor's assumption.)"""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


@dataclass(frozen=True)
class WeightBytes:
    """One rank's weight bytes, split into what a decode step does and does not stream."""

    total: int  # the memory plan's weight bytes
    experts: int  # fused-MoE expert weights (w13 + w2) of every layer
    embedding: int  # the input embedding table: decode gathers only B rows of it, so it is not counted
    num_experts: int  # the model's experts per layer (global)
    top_k: int
    # Keyword-only, so that subclasses' positional fields (multirank.StagedWeightBytes.stages) keep their place.
    head: int = field(default=0, kw_only=True)  # the LM head: prefill runs it for one row per sequence, not per token
    element_size: int = field(default=2, kw_only=True)  # bytes per weight element: the model dtype's
    # Weight-only quantized engines: logical weights (not bytes) of the dense layers and the experts, for the
    # prefill FLOPs; None: bytes / element_size (an unquantized engine).
    dense_params: int | None = field(default=None, kw_only=True)
    expert_params: int | None = field(default=None, kw_only=True)
    # The LM head's logical weights, for its FLOPs (None: head / element_size); a head quantized by
    # --quantize_lm_head stores fewer bytes than it has weights.
    head_params: int | None = field(default=None, kw_only=True)

    def prefill_flops(self, batch: int, input_len: int) -> float:
        """Matmul FLOPs of a prefill of `batch` prompts of `input_len` tokens: 2 x active params per token (every
        weight but the embedding and the head, experts at top_k / E) plus the head for one row per sequence.
        Attention's own score and value products are not counted (they are not weights)."""
        share = self.top_k / self.num_experts if self.num_experts else 0.0
        if self.dense_params is not None and self.expert_params is not None:
            per_token = self.dense_params + self.expert_params * share
        else:
            dense = self.total - self.experts - self.embedding - self.head
            per_token = (dense + self.experts * share) / self.element_size
        head = self.head_params if self.head_params is not None else self.head / self.element_size
        return 2.0 * (per_token * batch * input_len + head * batch)

    def active(self, batch: int) -> float:
        """Bytes a decode step of `batch` tokens reads: everything but the input embedding, with the experts
        scaled to the expected share that the batch's routing touches."""
        dense = self.total - self.experts - self.embedding
        if self.num_experts == 0:
            return float(dense)
        share = expected_active_experts(self.num_experts, self.top_k, batch) / self.num_experts
        return dense + self.experts * share


def weight_bytes(info: ArtifactInfo, plan: MemoryPlan) -> WeightBytes:
    """Split rank 0's weights (the engine's memory plan counts the largest rank) by what decode reads."""
    params = meta_model(info.family, info.model, info.mapping.for_rank(0), info.quant).named_parameters()
    experts = embedding = head = head_params = 0
    dense_params = expert_params = 0  # logical weights (quantized ones at their unpacked shape), scales excluded
    element = torch.empty(0, dtype=info.model.torch_dtype).element_size()
    for name, param in params:
        # Quantized weights count their stored bytes (INT4: half a byte each); their scales and zeros are separate
        # parameters and count as dense bytes, read every step like the weights.
        nbytes = param.numel() * param.element_size()
        logical = math.prod(getattr(param, "logical_shape", param.shape))
        if name.endswith((".w13", ".w2")):
            experts += nbytes
            expert_params += logical
        elif name == "embed_tokens.weight":
            embedding += nbytes
        elif name == "lm_head.weight":
            head += nbytes
            head_params += logical
        elif not getattr(param, "is_weight_scale", False) and not name.endswith(("_scale", "_zero", "_g_idx")):
            dense_params += logical
    quantized = info.quant.quant_algo is not None
    return WeightBytes(plan.weight_bytes, experts, embedding, info.model.moe_num_experts, info.model.moe_top_k,
                       head=head, element_size=element, dense_params=dense_params if quantized else None,
                       expert_params=expert_params if quantized else None, head_params=head_params)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int | None = None) -> float:
    """The dense matmul rate in TFLOP/s from an n x n x n GEMM in `dtype` timed in this process (n = 8192 on a
    GPU: large enough to run at the tensor cores' sustained rate; 512 in float32 on the CPU, a token figure)."""
    if device.type != "cuda":
        dtype = torch.float32
    n = n or (8192 if device.type == "cuda" else 512)
    reps = reps or (20 if device.type == "cuda" else 3)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del a, b, out
    return 2.0 * n**3 * reps / elapsed / 1e12


def mean_decode_context(input_len: int, output_len: int) -> float:
    """Average tokens attended to per sequence over the output_len - 1 decode steps: step j (1-based) computes
    output token j + 1 against input_len + j cached tokens, so the mean is input_len + output_len / 2."""
    steps = output_len - 1
    return input_len + sum(range(1, steps + 1)) / steps


@dataclass(frozen=True)
class Floor:
    """A decode step's floor at one batch size: the bytes it must read and the time that takes at `bandwidth_gbs`."""

    active_weight_bytes: float
    kv_bytes: float
    expected_experts: float | None
    bandwidth_gbs: float

    @property
    def ms(self) -> float:
        return (self.active_weight_bytes + self.kv_bytes) / (self.bandwidth_gbs * 1e9) * 1e3


def decode_floor(weights: WeightBytes, kv_bytes_per_token: int, batch: int, input_len: int, output_len: int,
                 bandwidth_gbs: float) -> Floor:
    """The floor of the mean decode step of a case (KV read at the mean context of its decode steps)."""
    kv = batch * mean_decode_context(input_len, output_len) * kv_bytes_per_token
    experts = (expected_active_experts(weights.num_experts, weights.top_k, batch)
               if weights.num_experts else None)
    return Floor(weights.active(batch), kv, experts, bandwidth_gbs)
