"""The model runner: owns one rank's model, KV cache and sampler, and turns a scheduled step into sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from kiln.checkpoint.hf_reader import CheckpointError
from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ConfigError, Mapping
from kiln.engine.scheduler import SchedulerOutput
from kiln.kernels import KernelSet, select_kernels
from kiln.layers.context import AttentionMetadata, ForwardContext
from kiln.memory import GiB, MemoryPlan
from kiln.sampling import Sampler, SamplerOutput, SamplingRow


@dataclass
class CacheConfig:
    """How much memory the paged KV cache takes: a fraction of the GPU's free memory (TensorRT-LLM's
    --kv_cache_free_gpu_memory_fraction) or, on the CPU, a byte budget (default: enough for max_batch_size
    sequences of max_seq_len)."""

    free_gpu_memory_fraction: float = 0.9
    cpu_bytes: int | None = None


@dataclass
class StepBatch:
    """One step's tensors, packed over the scheduled sequences."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [rows]: the last new token of each sequence that samples


def load_weights(model: torch.nn.Module, path: str, device: torch.device) -> None:
    """Copy a rank file into the model's parameters; any missing, extra or misshapen tensor is an error."""
    params = dict(model.named_parameters())
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing, extra = sorted(set(params) - names), sorted(names - set(params))
            if missing or extra:
                raise CheckpointError(f"{path} does not match the model: missing {missing[:6]}, unexpected {extra[:6]}")
            for name in names:
                tensor = f.get_tensor(name)
                if tensor.shape != params[name].shape:
                    raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                          f"{tuple(params[name].shape)}")
                params[name].data.copy_(tensor.to(device))
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


class ModelRunner:
    """One rank's model and KV cache. `execute` runs a scheduled step and samples where needed."""

    def __init__(self, info: ArtifactInfo, mapping: Mapping, device: torch.device,
                 cache: CacheConfig | None = None, kernels: KernelSet | None = None) -> None:
        self.info, self.device = info, device
        self.build = info.build
        self.block_size = self.build.kv_block_size
        self.kernels = kernels or select_kernels(device)
        self.plan = MemoryPlan(**info.raw["memory_plan"])
        with torch.device(device):
            self.model = info.family.model_class(info.model, mapping)
        load_weights(self.model, str(info.rank_file(mapping.rank)), device)
        self.model.eval()
        self.num_blocks = self._num_blocks(cache or CacheConfig())
        self._allocate_cache()
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}

    def _num_blocks(self, cache: CacheConfig) -> int:
        block_bytes = self.plan.kv_bytes_per_token * self.block_size
        per_seq = -(-self.build.max_seq_len // self.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cache.free_gpu_memory_fraction - self.plan.activation_bytes
        else:
            budget = cache.cpu_bytes if cache.cpu_bytes is not None else \
                self.build.max_batch_size * (per_seq + 1) * block_bytes
        blocks = int(budget // block_bytes)
        if blocks < per_seq:
            raise ConfigError(
                f"too little memory for the KV cache: {max(budget, 0) / GiB:.3f} GiB left for it, but one sequence "
                f"of max_seq_len {self.build.max_seq_len} needs {per_seq * block_bytes / GiB:.3f} GiB "
                f"(weights {self.plan.weight_bytes / GiB:.2f} GiB); raise the memory fraction, use more ranks "
                "or build with a smaller --max_seq_len"
            )
        return blocks

    def _allocate_cache(self) -> None:
        for attn in self.model.attention_layers():
            shape = (self.num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.info.model.torch_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.info.model.torch_dtype, device=self.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: give a sequence its own copy of a shared block before it writes into it."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for attn in self.model.attention_layers():
            attn.k_cache[dst] = attn.k_cache[src]
            attn.v_cache[dst] = attn.v_cache[src]

    def prepare(self, output: SchedulerOutput, all_logits: bool = False) -> StepBatch:
        """Pack the scheduled sequences' new tokens with their positions, cache slots and block tables.
        Logits are taken at each sampling sequence's last token, or at every token with `all_logits`."""
        ids, positions, slots, starts, lens, sample_at = [], [], [], [0], [], []
        bs = self.block_size
        for item in output.scheduled:
            seq, begin = item.seq, item.seq.num_computed_tokens
            end = begin + item.num_new_tokens
            ids.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            starts.append(len(ids))
            lens.append(end)
            if all_logits:
                sample_at.extend(range(starts[-2], len(ids)))
            elif item.needs_sample:
                sample_at.append(len(ids) - 1)
        width = max(len(item.seq.block_table) for item in output.scheduled)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in output.scheduled]
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
            max_seq_len=max(lens),
        )
        return StepBatch(torch.tensor(ids, dtype=torch.int64, device=dev),
                         torch.tensor(positions, dtype=torch.int64, device=dev), attn,
                         torch.tensor(sample_at, dtype=torch.int64, device=dev))

    @torch.inference_mode()
    def compute_logits(self, output: SchedulerOutput, all_logits: bool = False) -> torch.Tensor:
        # -> [rows, vocab] float32: one row per sampling sequence, or per new token with all_logits
        self.copy_blocks(output.block_copies)
        batch = self.prepare(output, all_logits)
        ctx = ForwardContext(self.kernels, batch.attn)
        hidden = self.model(batch.input_ids, batch.positions, ctx)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def execute(self, output: SchedulerOutput) -> tuple[dict[int, int], SamplerOutput]:
        """Run one step; return {seq_id: sampled token} for the sequences that sample, and the sampler's details."""
        logits = self.compute_logits(output)
        items = [item for item in output.scheduled if item.needs_sample]
        rows = [self._row(item.seq) for item in items]
        result = self.sampler.sample(logits, rows)
        return {item.seq.seq_id: tok for item, tok in zip(items, result.token_ids)}, result

    def _row(self, seq) -> SamplingRow:
        params = seq.params
        generator = None
        if params.seed is not None:
            generator = self.generators.get(seq.seq_id)
            if generator is None:
                generator = self.generators[seq.seq_id] = torch.Generator()  # CPU: same draws on every device
                generator.manual_seed(params.seed)
        stops = frozenset() if seq.ignore_eos else seq.stop_token_ids
        return SamplingRow(params, seq.prompt_token_ids, seq.output_token_ids, generator, stops)

    def release(self, seq_id: int) -> None:
        """Forget per-request state (the seeded generator) of a finished request."""
        self.generators.pop(seq_id, None)

    def shutdown(self) -> None:
        """Nothing to stop for one rank in this process (the multi-rank driver stops its workers here)."""
