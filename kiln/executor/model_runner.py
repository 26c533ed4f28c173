"""The model runner: owns one rank's model, KV cache and sampler, and turns a scheduled step into sampled tokens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from safetensors import safe_open

from kiln.checkpoint.convert import meta_model
from kiln.checkpoint.hf_reader import CheckpointError
from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ConfigError, Mapping
from kiln.engine.scheduler import ScheduledSeq, SchedulerOutput, StepFeed
from kiln.executor.cuda_graphs import DecodeGraphs, GraphLimits
from kiln.executor.input_batch import DeviceFeed, DeviceStaging, HostBatch, build_host_batch
from kiln.executor.pinned import reserve_pinned_blocks
from kiln.kernels import KernelSet, bind_linear_matmuls, reference, select_kernels
from kiln.layers.context import AttentionMetadata, ForwardContext
from kiln.layers.materialize import materialize
from kiln.memory import GiB, MemoryPlan, check_weights_fit, free_memory_bytes
from kiln.quant.fp8 import FP8_SCHEMES
from kiln.quant.group_wise import GROUP_WISE_ALGOS
from kiln.quant.kv_cache import bind_kv_scales, kv_cache_dtype
from kiln.quant.smoothquant import SQ_ALGOS
from kiln.runtime_checks import check_rank_header
from kiln.sampling import DeviceSample, Sampler, SamplerOutput, SamplingRow, to_device


@dataclass
class CacheConfig:
    """How much memory the paged KV cache takes: a fraction of the GPU's free memory (TensorRT-LLM's
    --kv_cache_free_gpu_memory_fraction) or, on the CPU, a byte budget (default: enough for max_batch_size
    sequences of max_seq_len); and whether decode steps use CUDA graphs, whose memory is reserved before the KV
    cache is sized."""

    free_gpu_memory_fraction: float = 0.9
    cpu_bytes: int | None = None
    # Decode-only steps replay CUDA graphs (CUDA with the triton kernels only; prefill and mixed steps run eagerly).
    use_cuda_graphs: bool = True
    # At most this many tokens in the cache, whatever the memory allows (run.py's --max_tokens_in_paged_kv_cache).
    max_tokens: int | None = None


@dataclass
class StepBatch:
    """One step's tensors, packed over the scheduled sequences."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [rows]: the last new token of each sequence that samples


class StepInFlight:
    """A step launched by `ModelRunner.launch`: its model and sampling work is queued on the device. `sampled_ids`
    (``[rows]`` int64, on the device) is what the next step's placeholders read; `result()` waits for the tokens
    and returns what `ModelRunner.execute` returns."""

    def __init__(self, items: list[ScheduledSeq], sample: DeviceSample) -> None:
        self.items, self.sample = items, sample
        self._result: tuple[dict[int, int], SamplerOutput] | None = None

    @property
    def sampled_ids(self) -> torch.Tensor:  # [rows] int64, one per sampling sequence in batch order
        return self.sample.token_ids

    def result(self) -> tuple[dict[int, int], SamplerOutput]:
        """{seq_id: sampled token} for the sequences that sample, and the sampler's details (waits once)."""
        if self._result is None:
            out = self.sample.to_host()
            self._result = ({item.seq.seq_id: tok for item, tok in zip(self.items, out.token_ids)}, out)
        return self._result


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


def _fill_weights(model: torch.nn.Module, info: ArtifactInfo, mapping: Mapping, device: torch.device) -> None:
    """The rank's weights: read from its rank file, or, for an engine of dummy weights in memory, drawn in place."""
    if info.weights_in_memory is not None:
        from kiln.checkpoint.in_memory import draw_rank_weights

        draw_rank_weights(model, info, mapping.rank, device)
        return
    # The file must be this rank's and of the config's dtype: a copied rank file or a changed dtype would load.
    check_rank_header(str(info.rank_file(mapping.rank)), mapping.rank, info.model.torch_dtype,
                      info.quant.quant_algo is not None, info.quant.act_order)
    load_weights(model, str(info.rank_file(mapping.rank)), device)


# Quantized formats whose experts the triton set runs in a fused MoE kernel (per channel: fused_moe_weight_only;
# group-wise: fused_moe_group_wise; SmoothQuant W8A8: fused_moe_sq; FP8: fused_moe_fp8, on GPUs with FP8 tensor
# cores) -> the KernelSet field holding it. The torch reference of each syncs with the host (it reads the chosen
# expert ids).
_KERNEL_MOE_FIELDS = {"W8A16": "fused_moe_weight_only", "W4A16": "fused_moe_weight_only",
                      **{algo: "fused_moe_group_wise" for algo in GROUP_WISE_ALGOS},
                      **{algo: "fused_moe_sq" for algo in SQ_ALGOS}, **{algo: "fused_moe_fp8" for algo in FP8_SCHEMES}}


def graphs_allowed(info: ArtifactInfo, kernels: KernelSet | None = None) -> bool:
    """Whether the engine's layers can be captured in a CUDA graph: not a quantized MoE whose experts run a torch
    reference (`kernels` None or the torch set, or a format with no fused MoE kernel), which reads the chosen expert
    ids on the host. The triton set's quantized fused MoEs (per-channel INT8/INT4, group-wise INT4, SmoothQuant W8A8,
    FP8) never sync with the host."""
    if info.quant.quant_algo is None or not info.model.is_moe:
        return True
    field = _KERNEL_MOE_FIELDS.get(info.quant.quant_algo)
    return (kernels is not None and kernels.name == "triton" and field is not None
            and getattr(kernels, field) is not getattr(reference, field))


class ModelRunner:
    """One rank's model and KV cache. `execute` runs a scheduled step and samples where needed; `launch` queues one
    without waiting for its tokens (`execute` is launch + result), so the engine can prepare the next step while
    the device runs this one."""

    can_launch_ahead = True  # the engine may launch a step whose inputs take the previous step's tokens on the device

    def __init__(self, info: ArtifactInfo, mapping: Mapping, device: torch.device,
                 cache: CacheConfig | None = None, kernels: KernelSet | None = None) -> None:
        # With cache.use_cuda_graphs (the default) on CUDA with the triton kernels, decode-only steps of up to
        # build.max_batch_size sequences replay CUDA graphs captured here, after the KV cache is allocated.
        self.info, self.device = info, device
        self.build = info.build
        self.block_size = self.build.kv_block_size
        self.kernels = kernels or select_kernels(device)
        self.plan = MemoryPlan(**info.raw["memory_plan"])
        # Built on meta with its quantized parameters and matmuls (chosen once here), then placed: the device only
        # ever holds the stored formats, never the float weights they replace (kiln.layers.materialize).
        self.model = meta_model(info.family, info.model, mapping, info.quant)
        free = free_memory_bytes(device)
        if free is not None:  # refused in one line before anything is allocated, not by an OOM halfway
            check_weights_fit(self.plan, free, self._min_kv_bytes())
        materialize(self.model, device)
        _fill_weights(self.model, info, mapping, device)
        if device.type == "cuda":  # the loading's transients back to the GPU: the KV cache is sized from free memory
            torch.cuda.empty_cache()
        bind_kv_scales(self.model)  # an INT8/FP8 KV cache's scales and their reciprocals, once
        self.model.eval()
        # The build's Triton GEMV choices (CUDA, triton kernels only), before any graph captures the layers.
        self.gemv_layers = bind_linear_matmuls(self.model, self.kernels, device)
        cache = cache or CacheConfig()
        # Several ranks would capture collectives too: not yet, they decode eagerly.
        self.use_cuda_graphs = (cache.use_cuda_graphs and device.type == "cuda" and self.kernels.name == "triton"
                                and mapping.world_size == 1 and graphs_allowed(info, self.kernels))
        self.num_blocks = self._num_blocks(cache)
        self._allocate_cache()
        self.staging = DeviceStaging(device)
        reserve_pinned_blocks(device)  # a launch must never allocate pinned memory: that synchronizes the device
        self.graphs: DecodeGraphs | None = None
        if self.use_cuda_graphs:
            self.graphs = self._capture_graphs()
        self.num_graph_steps = 0  # steps that replayed a decode graph (the engine's step_stats tell them from eager)
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}

    def _num_blocks(self, cache: CacheConfig) -> int:
        block_bytes = self.plan.kv_bytes_per_token * self.block_size
        per_seq = -(-self.build.max_seq_len // self.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cache.free_gpu_memory_fraction - self.plan.activation_bytes
            if self.use_cuda_graphs:
                budget -= self._graph_reserve_bytes()
        else:
            budget = cache.cpu_bytes if cache.cpu_bytes is not None else \
                self.build.max_batch_size * (per_seq + 1) * block_bytes
        blocks = int(budget // block_bytes)
        if cache.max_tokens is not None:
            blocks = min(blocks, cache.max_tokens // self.block_size)
        if blocks < per_seq:
            raise ConfigError(
                f"too little memory for the KV cache: {max(budget, 0) / GiB:.3f} GiB left for it, but one sequence "
                f"of max_seq_len {self.build.max_seq_len} needs {per_seq * block_bytes / GiB:.3f} GiB "
                f"(weights {self.plan.weight_bytes / GiB:.2f} GiB); raise the memory fraction, use more ranks "
                "or build with a smaller --max_seq_len"
            )
        return blocks

    def _min_kv_bytes(self) -> int:
        """The KV cache of one sequence of max_seq_len: the least a runnable engine needs beside its weights."""
        per_seq = -(-self.build.max_seq_len // self.block_size)
        return per_seq * self.block_size * self.plan.kv_bytes_per_token

    def _graph_limits(self) -> GraphLimits:
        return GraphLimits(max_batch_size=self.build.max_batch_size,
                           max_blocks_per_seq=-(-self.build.max_seq_len // self.block_size),
                           max_seq_len=self.build.max_seq_len, vocab_size=self.info.model.vocab_size)

    def _graph_reserve_bytes(self) -> int:
        """Memory the decode graphs take besides the eager pool: their own pool of decode-step activations (a few
        hidden- and ffn-sized rows per padded sequence, attention partials) and the static logits, with slack."""
        model, limits = self.info.model, self._graph_limits()
        element = torch.empty(0, dtype=model.torch_dtype).element_size()
        per_token = (8 * model.hidden_size + 4 * model.intermediate_size * max(1, model.moe_top_k)) * element
        attention = 32 * model.num_attention_heads * model.head_size * 4 * 2  # split-K partials, 32 splits max
        logits = 3 * limits.vocab_size * 4  # static buffer, the head's output and its float copy
        return 256 * 2**20 + limits.max_batch_size * (per_token + attention + logits)

    def _capture_graphs(self) -> DecodeGraphs | None:
        graphs = DecodeGraphs(self.model, self.kernels, self._graph_limits(), self.device)
        try:
            graphs.capture()
        except torch.OutOfMemoryError:
            warnings.warn("not enough GPU memory to capture the decode CUDA graphs; decoding eagerly (lower "
                          "kv_cache_free_gpu_memory_fraction to leave room for them)", RuntimeWarning, stacklevel=3)
            return None
        return graphs

    def _allocate_cache(self) -> None:
        dtype = kv_cache_dtype(self.info.quant, self.info.model.torch_dtype)  # int8 / float8 for a quantized cache
        for attn in self.model.attention_layers():
            shape = (self.num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: give a sequence its own copy of a shared block before it writes into it."""
        if not pairs:
            return
        index = to_device(torch.tensor([[s for s, _ in pairs], [d for _, d in pairs]]), self.device)  # [2, pairs]
        src, dst = index[0], index[1]
        for attn in self.model.attention_layers():
            attn.k_cache[dst] = attn.k_cache[src]
            attn.v_cache[dst] = attn.v_cache[src]

    def prepare(self, output: SchedulerOutput, all_logits: bool = False, feed: StepFeed | None = None) -> StepBatch:
        """Pack the scheduled sequences' new tokens with their positions, cache slots and block tables. Logits are
        taken at each sampling sequence's last token, or at every token with `all_logits`; `feed`'s placeholder
        tokens take the previous step's sampled ids on the device. On CUDA the tensors are views of a persistent
        device buffer, valid until the next `prepare`."""
        host = build_host_batch(output, self.block_size, all_logits)
        return self._to_device(host, self._device_feed(feed, host))

    def _to_device(self, host: HostBatch, device_feed: DeviceFeed | None = None) -> StepBatch:
        ids, positions, slots, starts, lens, tables, sample_at = self.staging.upload(host.arrays())
        if device_feed is not None:
            device_feed.apply(ids)  # queued after the upload
        attn = AttentionMetadata(slot_mapping=slots, query_start_loc=starts, seq_lens=lens, block_tables=tables,
                                 max_query_len=host.max_query_len, max_seq_len=host.max_seq_len)
        return StepBatch(ids, positions, attn, sample_at)

    @torch.inference_mode()
    def compute_logits(self, output: SchedulerOutput, all_logits: bool = False,
                       feed: StepFeed | None = None) -> torch.Tensor:
        # -> [rows, vocab] float32: one row per sampling sequence, or per new token with all_logits
        self.copy_blocks(output.block_copies)
        host = build_host_batch(output, self.block_size, all_logits)
        device_feed = self._device_feed(feed, host)
        if self.graphs is not None and not all_logits and self.graphs.can_run(host):
            # [seqs, vocab]: every row of a decode batch
            logits = self.graphs.run(host) if device_feed is None else self.graphs.run(host, device_feed)
            self.num_graph_steps += 1
            if host.logits_indices.shape[0] == host.num_seqs:
                return logits
            return logits[to_device(torch.from_numpy(host.logits_indices), self.device)]
        batch = self._to_device(host, device_feed)
        ctx = ForwardContext(self.kernels, batch.attn)
        hidden = self.model(batch.input_ids, batch.positions, ctx)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def _device_feed(self, feed: StepFeed | None, host: HostBatch) -> DeviceFeed | None:
        """The feed's (token index, previous row) pairs checked against this batch and sent to the device."""
        if feed is None or not feed.tokens:
            return None
        source = getattr(feed.previous, "sampled_ids", None)
        if not isinstance(source, torch.Tensor):
            raise ValueError("StepFeed.previous must be the handle ModelRunner.launch returned for the previous step")
        for index, row in feed.tokens:
            if not (0 <= index < host.num_tokens and 0 <= row < source.shape[0]):
                raise ValueError(f"StepFeed entry ({index}, {row}) is outside this step's {host.num_tokens} tokens "
                                 f"or the previous step's {source.shape[0]} sampled rows")
        pairs = to_device(torch.tensor(feed.tokens, dtype=torch.int64).T.contiguous(), self.device)  # [2, fed]
        return DeviceFeed(pairs[0], pairs[1], source)

    def launch(self, output: SchedulerOutput, feed: StepFeed | None = None) -> StepInFlight:
        """Queue one step (model, sampling, the copy of its tokens to the host) without waiting for it. Input tokens
        named by `feed` are placeholders: each takes the previous step's sampled id on the device."""
        logits = self.compute_logits(output, feed=feed)
        items = [item for item in output.scheduled if item.needs_sample]
        rows = [self._row(item.seq) for item in items]
        return StepInFlight(items, self.sampler.launch(logits, rows))

    def execute(self, output: SchedulerOutput) -> tuple[dict[int, int], SamplerOutput]:
        """Run one step; return {seq_id: sampled token} for the sequences that sample, and the sampler's details."""
        return self.launch(output).result()

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
