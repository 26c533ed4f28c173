"""kiln convert: Hugging Face checkpoint or dummy weights -> kiln checkpoint (flags as TensorRT-LLM's
convert_checkpoint.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kiln.checkpoint.convert import ConvertPlan, convert, meta_model
from kiln.checkpoint.hf_reader import HFCheckpoint
from kiln.checkpoint.safety import config_from_hf
from kiln.checkpoint.sources import DummyWeightSource, HFWeightSource, dummy_hf_config, keep_first_layers
from kiln.cli.quant_flags import add_quant_flags, calibrates_activations, calibration_asked, \
    calibration_from_flags, kv_calibration_from_flags, quant_ckpt_path, quant_config_from_flags
from kiln.quant.published import refuse_published
from kiln.quant.published_moe import moe_format
from kiln.quant.published_group_wise import PublishedFormat, PublishedWeightSource, QuantizedFileOverlay, \
    published_format
from kiln.cli.trtllm_flags import DEST_PREFIX, add_compat_flags, check_compat_flags
from kiln.config import DTYPES, ConfigError, Mapping, QuantConfig
from kiln.models import PRESETS, family_for_hf_config
from kiln.quant.fp8_published import published_checkpoint, published_fp8_algo

HELP = "convert a Hugging Face checkpoint (or dummy weights) to a kiln checkpoint"


STORAGE_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# convert_checkpoint.py's flags that TensorRT-LLM uses and kiln ignores (trtllm_flags.py says what kiln does instead).
IGNORED = ["--use_parallel_embedding", "--use_embedding_sharing", "--embedding_sharding_dim",
           "--disable_weight_only_quant_plugin", "--dense_context_fmha", "--moe_renorm_mode",
           "--moe_normalization_mode", "--moe_num_experts", "--moe_top_k", "--rotary_base", "--vocab_size", "--n_layer",
           "--n_head", "--n_kv_head", "--n_embd", "--inter_size", "--clip_qkv", "--hidden_act", "--max_seq_len",
           "--logits_dtype", "--processes", "--log_level",
           "--load_model_on_cpu", "--load_by_shard"]
REFUSED = ["--max_prompt_embedding_table_size", "--lora_target_modules", "--hf_lora_dir", "--max_lora_rank"]
QUANT = ["--use_weight_only", "--weight_only_precision", "--per_group", "--group_size", "--quant_ckpt_path",
         "--smoothquant", "--per_token", "--per_channel", "--int8_kv_cache", "--fp8_kv_cache", "--calibrate_kv_cache",
         "--calib_dataset", "--dataset_cache_dir", "--quantize_lm_head", "--kv_cache_dtype", "--calib_size",
         "--calib_max_seq_length", "--desc_act", "--enable_fp8"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (one of)")
    src.add_argument("--model_dir", "-i", "--in-file", "--in_file", dest="model_dir",
                     help="Hugging Face model directory (config.json + weights); -i/--in-file as in "
                          "hf_baichuan_convert.py")
    src.add_argument("--preset", choices=sorted(PRESETS), help="dummy random weights of a built-in config")
    src.add_argument("--config", help="dummy random weights of this Hugging Face style config.json")
    p.add_argument("--output_dir", default=None, help="where to write the checkpoint (default kiln_checkpoint)")
    p.add_argument("-o", "--out-dir", "--out_dir", dest="out_dir",
                   help="hf_baichuan_convert.py's spelling: the checkpoint goes to OUT/<world size>-gpu/")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    p.add_argument("-t", "--storage-type", "--storage_type", dest="storage_type",
                   choices=sorted(STORAGE_TYPES) + sorted(DTYPES), help="hf_baichuan_convert.py's --dtype")
    p.add_argument("--num_layers", type=int, help="keep only the first N layers (a slice of a big model)")
    p.add_argument("--tp_size", "-tp", "--tensor-parallelism", "--tensor_parallelism", dest="tp_size", type=int,
                   default=1, help="tensor parallel ranks (attention heads and MLP columns split over them)")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline parallel stages (contiguous layer ranges)")
    p.add_argument("--workers", type=int, default=None,
                   help="accepted for TensorRT-LLM compatibility; kiln reads each tensor once and writes every rank's "
                        "shard of it in the same pass, so more workers would buy nothing and the value is ignored")
    p.add_argument("--moe_tp_mode", type=int, choices=[1, 2], default=2,
                   help="experts: 1 = expert parallel (whole experts per rank), 2 = tensor parallel (default)")
    p.add_argument("--moe_tp_size", type=int, default=-1, help="tensor parallel size over each expert")
    p.add_argument("--moe_ep_size", type=int, default=-1, help="expert parallel size")
    p.add_argument("--model_version", choices=["v1_7b", "v1_13b", "v2_7b", "v2_13b"], default=None,
                   help="Baichuan only: which Baichuan (v1/v2) and size (7b RoPE, 13b ALiBi); needed only when the "
                        "config's sizes are not the published ones (default: recognised from config.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of dummy weights and of AWQ/GPTQ calibration's windows")
    p.add_argument("--dummy_device", default="cpu", help="device that generates dummy weights (cuda is faster)")
    p.add_argument("--weights_in_memory", action="store_true",
                   help="dummy weights: write config.json alone; each rank of the built engine draws its weights into "
                        "its parameters when it loads (on --dummy_device's kind of device), so nothing the size of "
                        "the model is written (docs/bench.md)")
    add_quant_flags(p, QUANT)
    p.add_argument("--per_head_kv_scales", action="store_true",
                   help="INT8/FP8 KV cache: calibrate one scale per kv head instead of one per layer")
    add_compat_flags(p, IGNORED, REFUSED)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse quantization kiln does not run and unsupported TensorRT-LLM flags; say once which accepted flags do
    nothing."""
    quant_config_from_flags(args)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    check_compat_flags(args, "convert", ["--workers"] if args.workers is not None else [])


def resolve_dtype(args: argparse.Namespace) -> str | None:
    """--dtype, or hf_baichuan_convert.py's -t/--storage-type (fp16 means float16); both must agree."""
    storage = STORAGE_TYPES.get(args.storage_type, args.storage_type)
    if storage is not None and args.dtype is not None and storage != args.dtype:
        raise ConfigError(f"--dtype {args.dtype} and -t/--storage-type {args.storage_type} disagree; give one")
    return args.dtype or storage


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """--output_dir, or hf_baichuan_convert.py's -o OUT, which writes OUT/<world size>-gpu/ (the directory its README
    then hands to build.py's --bin_model_dir)."""
    if args.out_dir is not None:
        if args.output_dir is not None:
            raise ConfigError("give --output_dir or -o/--out-dir, not both")
        return Path(args.out_dir) / f"{args.tp_size * args.pp_size}-gpu"
    return Path(args.output_dir or "kiln_checkpoint")


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
        checkpoint = published_checkpoint(HFCheckpoint(args.model_dir))  # FP8 weights read dequantized
        return checkpoint.config, checkpoint
    return dummy_hf_config(args.preset, args.config), None


def make_plan(args: argparse.Namespace, quant: QuantConfig | None = None) -> ConvertPlan:
    """What to convert, from the parsed flags (also used by `kiln build --model_dir`, the legacy build.py); `quant`
    overrides the quantization flags (the one-step commands resolve their own)."""
    quant = quant if quant is not None else quant_config_from_flags(args)
    hf, checkpoint = resolve_source(args)
    published = published_format(Path(args.model_dir), hf) if checkpoint is not None else None
    if quant_ckpt_path(args) is not None:  # GPTQ-for-LLaMa's file beside the float checkpoint
        checkpoint, published = gptq_for_llama(args, checkpoint, published, quant)
        quant = dataclasses.replace(quant, quant_algo=None)
    fp8 = published_fp8_algo(hf)  # a published FP8 checkpoint is read (kiln.quant.fp8_published)
    if checkpoint is not None and published is None and fp8 is None:
        refuse_published(Path(args.model_dir), hf)  # other published formats: named, before any tensor is read
    if published is not None and quant.quant_algo is not None:
        raise ConfigError(f"{args.model_dir} is already quantized ({published.quant_algo}); drop "
                          "--use_weight_only/--weight_only_precision (kiln keeps the published weights as they are)")
    if quant.quant_algo is None and fp8 is not None:  # no weight format asked: keep the checkpoint's FP8
        quant = dataclasses.replace(quant, quant_algo=fp8)
    family = family_for_hf_config(hf)
    if args.model_version is not None and family.name != "baichuan":
        raise ConfigError(f"--model_version applies to Baichuan checkpoints only, and this is a {family.name} model; "
                          "drop the flag")
    extra = {"model_version": args.model_version} if args.model_version is not None else {}
    config = config_from_hf(family, hf, resolve_dtype(args), **extra)
    source_layers = config.num_hidden_layers
    keep_first_layers(config, args.num_layers)
    moe_tp, moe_ep = moe_mapping(args) if config.is_moe else (args.tp_size, 1)
    mapping = Mapping(args.tp_size * args.pp_size, args.tp_size, args.pp_size, moe_tp, moe_ep)
    if published is not None:  # AutoGPTQ / AutoAWQ weights, kept exactly (kiln.quant.published_group_wise)
        published = moe_format(published, checkpoint, config, Path(args.model_dir))  # what the fused MoE runs
        quant = published.quant_config(quant, config)
        source = PublishedWeightSource(checkpoint, family, config, source_layers, published, quant.group_size)
        quantized = meta_model(family, config, Mapping(), quant).named_parameters()
        source.check_quantized([n for n, p in quantized if hasattr(p, "weight_only")])
        provenance = {"model_dir": str(Path(args.model_dir).resolve()), "dummy": False,
                      "published_quantization": published.quant_algo}
    elif checkpoint is not None:
        source = HFWeightSource(checkpoint, family, config, source_layers)
        provenance = {"model_dir": str(Path(args.model_dir).resolve()), "dummy": False}
    else:
        source = DummyWeightSource(args.seed, args.dummy_device, tied_head=config.tie_word_embeddings)
        provenance = {"preset": args.preset, "config": args.config, "dummy": True, "seed": args.seed}
    calib = None
    if calibrates_activations(quant):  # calibrated KV / FP8 input scales / SmoothQuant input absmax
        calib = kv_calibration_from_flags(args, getattr(args, "per_head_kv_scales", False))
    calibration, dataset = calibration_from_flags(args, quant, args.seed) if published is None else (None, None)
    if checkpoint is None and not calibration_asked(args):
        # Dummy weights are drawn straight in the format (kiln.quant.dummy_weights), unless a calibration flag asks
        # for AWQ/GPTQ on them (at real shapes that takes long and measures nothing).
        calibration, dataset = None, None
    return ConvertPlan(family, config, mapping, source, quant, provenance, calib, calibration, dataset)


def gptq_for_llama(args: argparse.Namespace, checkpoint: object | None, published: object | None,
                   quant: QuantConfig) -> tuple[QuantizedFileOverlay, PublishedFormat]:
    """`--model_dir FLOAT --quant_ckpt_path FILE.safetensors --use_weight_only --weight_only_precision int4_gptq
    [--group_size G]`: 4-bit GPTQ with v1 zero points (GPTQ-for-LLaMa's packing, AutoGPTQ's v1), groups of G."""
    if checkpoint is None or published is not None:
        raise ConfigError("--quant_ckpt_path needs --model_dir of the unquantized Hugging Face checkpoint it was made "
                          "from (config, tokenizer, the layers GPTQ left in float)")
    overlay = QuantizedFileOverlay(checkpoint, Path(quant_ckpt_path(args)))  # type: ignore[arg-type]
    return overlay, PublishedFormat("gptq", 4, quant.group_size, True, overlay.act_order(quant.group_size))


def plan_from_hf(model_dir: str, dtype: str | None, tp_size: int, pp_size: int,
                 model_version: str | None = None, quant: QuantConfig | None = None,
                 quant_ckpt: str | None = None) -> ConvertPlan:
    """The plan of `kiln convert --model_dir ...` with every other flag at its default (for the one-step commands:
    `kiln build --model_dir`, `kiln quantize`), quantized as `quant` says."""
    return make_plan(argparse.Namespace(
        model_dir=model_dir, preset=None, config=None, dtype=dtype, storage_type=None, num_layers=None,
        tp_size=tp_size, pp_size=pp_size, workers=None, moe_tp_mode=2, moe_tp_size=-1, moe_ep_size=-1,
        model_version=model_version, seed=0, dummy_device="cpu", **{DEST_PREFIX + "quant_ckpt_path": quant_ckpt}),
        quant or QuantConfig())


def main(args: argparse.Namespace) -> int:
    check_flags(args)
    plan = make_plan(args)
    out = convert(plan, str(resolve_output_dir(args)), weights_in_memory=args.weights_in_memory)
    m = plan.mapping
    algo = f", weights {plan.quant.quant_algo}" if plan.quant.quant_algo else ""
    algo += f", {plan.quant.kv_cache_quant_algo} KV cache" if plan.quant.kv_cache_quant_algo else ""
    print(f"wrote {plan.config.architecture} checkpoint ({plan.config.dtype}{algo}, tp {m.tp_size} × pp {m.pp_size}"
          f"{f', experts ep {m.moe_ep_size} × tp {m.moe_tp_size}' if plan.config.is_moe else ''}) to {out}"
          + (" (dummy weights drawn at load, no rank files)" if args.weights_in_memory else ""))
    return 0
