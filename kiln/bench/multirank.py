"""`kiln bench` on multi-rank engines: the dummy engine's sharding (--tp_size, --pp_size, --moe_tp_mode or
--moe_tp_size/--moe_ep_size) and the per-GPU decode floor.

Each rank streams its own shard, all ranks at once, so a tensor- or expert-parallel step cannot be faster than the
busiest rank's active bytes over one GPU's bandwidth. Pipeline stages run one after another within a step (a
micro-batched step still passes every token through every stage in turn), so a pipeline step's floor adds the
stages' floors. Collectives (tp all-reduces, pp transfers) are not in the floor: what the measured step takes
beyond it includes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

from kiln.bench.physics import WeightBytes
from kiln.checkpoint.convert import meta_model
from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ConfigError, Mapping, ModelConfig
from kiln.memory import kv_bytes_per_token
from kiln.quant.kv_cache import kv_element_size
from kiln.models.decoder import stage_layers

if TYPE_CHECKING:
    from kiln.bench.options import BenchOptions
    from kiln.bench.report import BenchReport


@dataclass(frozen=True)
class StagedWeightBytes(WeightBytes):
    """Per-GPU weight bytes of a multi-rank engine. `stages` holds each pipeline stage's busiest rank; `total`,
    `experts` and `embedding` are the largest per-GPU values (what one GPU holds), and `active(batch)` adds the
    stages' active bytes, since the stages of a step run one after another."""

    stages: tuple[WeightBytes, ...] = ()

    def active(self, batch: int) -> float:
        return sum(stage.active(batch) for stage in self.stages)


def rank_weight_bytes(info: ArtifactInfo, rank: int) -> WeightBytes:
    """One rank's parameter bytes, split as physics.weight_bytes splits them."""
    total = experts = embedding = 0
    for name, param in meta_model(info.family, info.model, info.mapping.for_rank(rank), info.quant).named_parameters():
        nbytes = param.numel() * param.element_size()
        total += nbytes
        if name.endswith((".w13", ".w2")):
            experts += nbytes
        elif name == "embed_tokens.weight":
            embedding += nbytes
    return WeightBytes(total, experts, embedding, info.model.moe_num_experts, info.model.moe_top_k)


def staged_weight_bytes(info: ArtifactInfo) -> StagedWeightBytes:
    """Per-GPU weights of every stage: the rank of each stage that streams the most at a large batch."""
    mapping = info.mapping
    stages = []
    for pp_rank in range(mapping.pp_size):
        ranks = [rank_weight_bytes(info, pp_rank * mapping.tp_size + t) for t in range(mapping.tp_size)]
        stages.append(max(ranks, key=lambda w: (w.active(10**6), w.total)))
    return StagedWeightBytes(max(s.total for s in stages), max(s.experts for s in stages),
                             max(s.embedding for s in stages), info.model.moe_num_experts, info.model.moe_top_k,
                             tuple(stages))


def staged_kv_bytes_per_token(info: ArtifactInfo) -> int:
    """KV bytes one token adds to one GPU of every stage together (a decode step reads every stage's cache, one
    stage after another)."""
    mapping, model = info.mapping, info.model
    element = kv_element_size(info.quant, model.torch_dtype)  # 1 for an INT8/FP8 cache
    return sum(kv_bytes_per_token(model, mapping, len(stage_layers(model.num_hidden_layers,
                                                                   mapping.for_rank(p * mapping.tp_size))), element)
               for p in range(mapping.pp_size))


def check_engine(info: ArtifactInfo, options: "BenchOptions") -> None:
    """Refuse what a multi-rank engine cannot bench."""
    if options.compare_hf and info.mapping.world_size > 1:
        raise ConfigError(f"--compare_hf runs transformers on one GPU, and this engine has "
                          f"{info.mapping.world_size} ranks; bench it without --compare_hf, and compare against a "
                          "one-rank engine of the same model (or --preset ... without --tp_size/--pp_size)")


def annotate(report: "BenchReport", info: ArtifactInfo, weights: StagedWeightBytes) -> None:
    """The engine's sharding and the per-GPU floor's rules in the report (engine section and notes)."""
    m = info.mapping
    report.engine["mapping"] = m.to_dict()
    report.engine["kv_bytes_per_token"] = staged_kv_bytes_per_token(info)
    report.engine["stage_weight_bytes"] = [s.total for s in weights.stages]
    report.notes.append(
        f"{m.world_size} ranks (tp {m.tp_size} x pp {m.pp_size}, experts ep {m.moe_ep_size} x tp {m.moe_tp_size}): "
        "the floor is per GPU, the busiest rank's active bytes (its experts at the expected share) over one GPU's "
        "bandwidth" + (", added over the pipeline stages, which run one after another" if m.pp_size > 1 else "")
        + "; all-reduces and stage transfers are not in it; KV bytes are one GPU's of every stage")


def dummy_mapping(options: "BenchOptions", config: ModelConfig) -> Mapping:
    """The dummy engine's mapping from --tp_size/--pp_size and, for MoE models, the expert split (as convert)."""
    from kiln.cli.convert_cmd import moe_mapping

    tp, pp = options.tp_size, options.pp_size
    if config.is_moe:
        moe_tp, moe_ep = moe_mapping(SimpleNamespace(tp_size=tp, moe_tp_mode=options.moe_tp_mode,
                                                     moe_tp_size=options.moe_tp_size, moe_ep_size=options.moe_ep_size))
    else:
        moe_tp, moe_ep = tp, 1
    if pp > config.num_hidden_layers:
        raise ConfigError(f"--pp_size {pp} exceeds the model's {config.num_hidden_layers} layers; use fewer stages "
                          "or more --num_layers")
    return Mapping(tp * pp, tp, pp, moe_tp, moe_ep)


def validate(options: "BenchOptions") -> None:
    """Check the sharding options (called by BenchOptions.validate)."""
    if options.tp_size < 1 or options.pp_size < 1:
        raise ConfigError(f"--tp_size and --pp_size must be >= 1, got {options.tp_size} and {options.pp_size}")
    if options.moe_tp_mode not in (1, 2):
        raise ConfigError(f"--moe_tp_mode must be 1 (expert parallel) or 2 (tensor parallel), got "
                          f"{options.moe_tp_mode}")
    sharded = options.tp_size * options.pp_size > 1 or options.moe_tp_size != -1 or options.moe_ep_size != -1
    if options.engine_dir is not None and sharded:
        raise ConfigError("--tp_size/--pp_size/--moe_* shard dummy weights (--preset/--config); an engine "
                          "(--engine_dir) is already sharded as it was converted")
    if options.compare_hf and options.tp_size * options.pp_size > 1:
        raise ConfigError("--compare_hf runs transformers on one GPU and is single-rank; drop it, or bench without "
                          "--tp_size/--pp_size for the comparison")
