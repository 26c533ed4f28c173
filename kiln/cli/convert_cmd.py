"""kiln convert: Hugging Face checkpoint or dummy weights -> kiln checkpoint (flags as TensorRT-LLM's
convert_checkpoint.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.checkpoint.convert import ConvertPlan, convert
from kiln.checkpoint.hf_reader import HFCheckpoint
from kiln.checkpoint.safety import config_from_hf
from kiln.checkpoint.sources import DummyWeightSource, HFWeightSource, dummy_hf_config, keep_first_layers
from kiln.config import DTYPES, ConfigError, Mapping, QuantConfig
from kiln.models import PRESETS, family_for_hf_config

HELP = "convert a Hugging Face checkpoint (or dummy weights) to a kiln checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (one of)")
    src.add_argument("--model_dir", help="Hugging Face model directory (config.json + weights)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="dummy random weights of a built-in config")
    src.add_argument("--config", help="dummy random weights of this Hugging Face style config.json")
    p.add_argument("--output_dir", default="kiln_checkpoint", help="where to write the checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    p.add_argument("--num_layers", type=int, help="keep only the first N layers (a slice of a big model)")
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1,
                   help="accepted for TensorRT-LLM compatibility; kiln reads each tensor once and writes every rank's "
                        "shard of it in the same pass, so more workers would buy nothing and the value is ignored")
    p.add_argument("--moe_tp_mode", type=int, choices=[1, 2], default=2,
                   help="experts: 1 = expert parallel (whole experts per rank), 2 = tensor parallel (default)")
    p.add_argument("--moe_tp_size", type=int, default=-1, help="tensor parallel size over each expert")
    p.add_argument("--moe_ep_size", type=int, default=-1, help="expert parallel size")
    p.add_argument("--model_version", choices=["v1_7b", "v1_13b", "v2_7b", "v2_13b"], default=None,
                   help="Baichuan only: which Baichuan (v1/v2) and size (7b RoPE, 13b ALiBi); needed only when the "
                        "config's sizes are not the published ones (default: recognised from config.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
    p.add_argument("--dummy_device", default="cpu", help="device that generates dummy weights (cuda is faster)")
    quant = p.add_argument_group("quantization (not in this version; refused with a message)")
    quant.add_argument("--use_weight_only", action="store_true")
    quant.add_argument("--weight_only_precision", default=None)
    quant.add_argument("--smoothquant", type=float, default=None)
    quant.add_argument("--int8_kv_cache", action="store_true")
    quant.add_argument("--fp8_kv_cache", action="store_true")


def moe_mapping(args: argparse.Namespace) -> tuple[int, int]:
    """(moe_tp_size, moe_ep_size) from the newer explicit flags or the older --moe_tp_mode."""
    tp, mtp, mep = args.tp_size, args.moe_tp_size, args.moe_ep_size
    if mtp == -1 and mep == -1:
        return (1, tp) if args.moe_tp_mode == 1 else (tp, 1)
    if mtp == -1:
        mtp = tp // mep if mep > 0 and tp % mep == 0 else -1
    if mep == -1:
        mep = tp // mtp if mtp > 0 and tp % mtp == 0 else -1
    if mtp < 1 or mep < 1 or mtp * mep != tp:
        raise ConfigError(f"--moe_tp_size × --moe_ep_size must equal --tp_size {tp} (got {args.moe_tp_size} and "
                          f"{args.moe_ep_size})")
    return mtp, mep


def resolve_source(args: argparse.Namespace) -> tuple[dict, object | None]:
    """The Hugging Face style config, and the checkpoint when converting real weights."""
    given = [name for name in ("model_dir", "preset", "config") if getattr(args, name)]
    if len(given) != 1:
        raise ConfigError("give exactly one of --model_dir, --preset or --config"
                          + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    if args.model_dir:
        checkpoint = HFCheckpoint(args.model_dir)
        return checkpoint.config, checkpoint
    return dummy_hf_config(args.preset, args.config), None


def make_plan(args: argparse.Namespace) -> ConvertPlan:
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.use_weight_only or args.smoothquant is not None or args.int8_kv_cache or args.fp8_kv_cache:
        raise ConfigError("quantization is not available in this kiln version yet; convert without "
                          "--use_weight_only/--smoothquant/--int8_kv_cache/--fp8_kv_cache")
    hf, checkpoint = resolve_source(args)
    family = family_for_hf_config(hf)
    if args.model_version is not None and family.name != "baichuan":
        raise ConfigError(f"--model_version applies to Baichuan checkpoints only, and this is a {family.name} model; "
                          "drop the flag")
    extra = {"model_version": args.model_version} if args.model_version is not None else {}
    config = config_from_hf(family, hf, args.dtype, **extra)
    source_layers = config.num_hidden_layers
    keep_first_layers(config, args.num_layers)
    moe_tp, moe_ep = moe_mapping(args) if config.is_moe else (args.tp_size, 1)
    mapping = Mapping(args.tp_size * args.pp_size, args.tp_size, args.pp_size, moe_tp, moe_ep)
    if checkpoint is not None:
        source = HFWeightSource(checkpoint, family, config, source_layers)
        provenance = {"model_dir": str(Path(args.model_dir).resolve()), "dummy": False}
    else:
        source = DummyWeightSource(args.seed, args.dummy_device, tied_head=config.tie_word_embeddings)
        provenance = {"preset": args.preset, "config": args.config, "dummy": True, "seed": args.seed}
    return ConvertPlan(family, config, mapping, source, QuantConfig(), provenance)


def main(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    out = convert(plan, args.output_dir)
    m = plan.mapping
    print(f"wrote {plan.config.architecture} checkpoint ({plan.config.dtype}, tp {m.tp_size} × pp {m.pp_size}"
          f"{f', experts ep {m.moe_ep_size} × tp {m.moe_tp_size}' if plan.config.is_moe else ''}) to {out}")
    return 0
