"""The memory plan: what a rank needs for weights, KV cache and activations, said before anything is allocated."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kiln.config import BuildConfig, ConfigError, Mapping, ModelConfig

GiB = 1024**3


@dataclass
class MemoryPlan:
    """Bytes per rank. `kv_bytes_per_token` covers every layer of the rank's stage (keys and values)."""

    weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int
    quantized_bytes: int = 0  # of weight_bytes: quantized weights with their scales and zero points

    def kv_tokens_that_fit(self, memory_bytes: float) -> int:
        free = memory_bytes - self.weight_bytes - self.activation_bytes
        return max(0, int(free // self.kv_bytes_per_token))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a rank can still take on `device`: the GPU's free memory plus what torch's allocator holds cached but
    unused (bench's bandwidth buffers, say), or on the CPU the kernel's MemAvailable (None where it cannot be read)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_weights_fit(plan: MemoryPlan, free_bytes: int, min_kv_bytes: int) -> None:
    """Refuse, before anything is allocated, a rank whose weights, activations and the KV cache of one sequence do
    not fit in the device's free memory (ConfigError, one line with the numbers and what to change)."""
    need = plan.weight_bytes + plan.activation_bytes + min_kv_bytes
    if need > free_bytes:
        raise ConfigError(
            f"the engine needs {need / GiB:.2f} GiB per rank (weights {plan.weight_bytes / GiB:.2f}, activations "
            f"{plan.activation_bytes / GiB:.2f}, KV of one max_seq_len sequence {min_kv_bytes / GiB:.2f}) and the "
            f"device has {free_bytes / GiB:.2f} GiB free; quantize the weights, use more GPUs (--tp_size/--pp_size) or "
            "build with smaller limits")


def kv_bytes_per_token(model: ModelConfig, mapping: Mapping, num_layers: int, element_size: int) -> int:
    kv_heads = max(1, model.num_key_value_heads // mapping.tp_size)
    return 2 * num_layers * kv_heads * model.head_size * element_size


def activation_bytes(model: ModelConfig, build: BuildConfig, element_size: int) -> int:
    """A generous bound on one step's transient tensors: a few hidden-sized and ffn-sized buffers per token in the
    step, and float32 logits for every sequence."""
    tokens = build.max_num_tokens
    per_token = (6 * model.hidden_size + 3 * model.intermediate_size * max(1, model.moe_top_k)) * element_size
    logits = build.max_batch_size * build.max_beam_width * model.vocab_size * 4 * 2
    return tokens * per_token + logits


def describe(plan: MemoryPlan, build: BuildConfig, memory_gib: float | None, kv_cache: str | None = None) -> str:
    """The plan as the lines `kiln build` prints (`kv_cache`: the quantized KV cache's name, e.g. INT8)."""
    need_kv = build.max_batch_size * build.max_beam_width * build.max_seq_len * plan.kv_bytes_per_token
    kind = f" ({kv_cache}, 1 byte per element)" if kv_cache else ""
    lines = [
        f"weights per rank:        {plan.weight_bytes / GiB:10.3f} GiB",
        *([f"  of which quantized:    {plan.quantized_bytes / GiB:10.3f} GiB (scales and zero points included)"]
          if plan.quantized_bytes else []),
        f"KV cache per token:      {plan.kv_bytes_per_token / 1024:10.1f} KiB{kind}",
        f"activations (max step):  {plan.activation_bytes / GiB:10.3f} GiB",
        f"KV for max_batch_size x max_seq_len: {need_kv / GiB:.3f} GiB",
    ]
    if memory_gib:
        fit = plan.kv_tokens_that_fit(memory_gib * GiB)
        lines.append(f"in {memory_gib:g} GiB per rank: {fit} KV tokens fit "
                     f"({fit // max(1, build.max_seq_len)} sequences of max_seq_len)")
    return "\n".join(lines)
