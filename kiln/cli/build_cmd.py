"""kiln build: kiln checkpoint -> engine (flags as trtllm-build)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kiln.build import build
from kiln.checkpoint.convert import convert
from kiln.cli.convert_cmd import plan_from_hf
from kiln.cli.quant_flags import add_quant_flags, quant_ckpt_path, quant_config_from_flags
from kiln.cli.trtllm_flags import add_compat_flags, check_compat_flags
from kiln.checkpoint.kiln_format import load_artifact
from kiln.config import DTYPES, BuildConfig, ConfigError, QuantConfig
from kiln.memory import describe


def describe_kernels(section: dict) -> str:
    """One line on the kernel choices the build recorded: fused-MoE tiles and decode matmul winners."""
    parts = []
    moe = section.get("fused_moe")
    if moe is not None:
        tuned = sum(1 for c in moe["configs"] if c["tuned"])
        parts.append(f"fused-MoE tiles tuned for {tuned} of {len(moe['configs'])} token buckets" if tuned else
                     f"default fused-MoE tiles for {len(moe['configs'])} token buckets (not tuned)")
    linear = (section.get("linear") or {}).get("entries") or []
    tuned_linear = [e for e in linear if e.get("tuned")]
    if tuned_linear:
        triton = sum(1 for e in tuned_linear if e.get("kernel") == "triton")
        parts.append(f"decode matmuls: Triton wins {triton} of {len(tuned_linear)} (shape, rows) cases, cuBLAS the "
                     "rest")
    elif linear:
        parts.append("decode matmuls: cuBLAS (not tuned)")
    if not parts:
        return "kernels: no build-time choices for this model (attention tiles are chosen at run time)"
    where = f" on {section['device']} in {section.get('tune_seconds', 0):.0f} s" if section.get("tuned") else ""
    return "kernels" + where + ": " + "; ".join(parts)


HELP = ("build an engine from a kiln checkpoint (validate, set limits, tune kernels on a GPU, plan memory); with "
        "--model_dir, convert and build in one step as TensorRT-LLM's legacy build.py")
# trtllm-build's and the legacy build.py's flags that steer TensorRT (trtllm_flags.py says what kiln does instead).
IGNORED = ["--gemm_plugin", "--gpt_attention_plugin", "--moe_plugin", "--nccl_plugin", "--lookup_plugin",
           "--use_layernorm_plugin", "--use_rmsnorm_plugin", "--gemm_swiglu_plugin", "--low_latency_gemm_plugin",
           "--use_fused_mlp", "--reduce_fusion", "--norm_quant_fusion", "--bert_attention_plugin",
           "--remove_input_padding", "--enable_context_fmha", "--context_fmha", "--use_paged_context_fmha",
           "--enable_context_fmha_fp32_acc", "--paged_kv_cache", "--kv_cache_type", "--use_inflight_batching",
           "--use_custom_all_reduce", "--multi_block_mode", "--strongly_typed", "--workers", "--parallel_build",
           "--input_timing_cache", "--output_timing_cache", "--timing_cache", "--profiling_verbosity", "--builder_opt",
           "--opt_num_tokens", "--gpus_per_node", "--cluster_key", "--enable_debug_output", "--visualize_network",
           "--monitor_memory", "--dry_run", "--logits_dtype", "--gather_context_logits", "--gather_generation_logits",
           "--gather_all_token_logits", "--log_level"]
REFUSED = ["--lora_dir", "--lora_plugin", "--lora_target_modules", "--max_lora_rank", "--lora_ckpt_source",
           "--use_prompt_tuning", "--max_prompt_embedding_table_size", "--max_draft_len", "--speculative_decoding_mode",
           "--auto_parallel"]
QUANT = ["--use_weight_only", "--weight_only_precision", "--per_group", "--group_size", "--quant_ckpt_path",
         "--quantized_fp8_model_path", "--use_smooth_quant", "--per_token", "--per_channel", "--int8_kv_cache",
         "--fp8_kv_cache", "--enable_fp8", "--quantize_lm_head", "--use_fp8_context_fmha"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (one of)")
    src.add_argument("--checkpoint_dir", help="a kiln checkpoint (kiln convert's output)")
    src.add_argument("--bin_model_dir", help="the legacy build.py's spelling of --checkpoint_dir (the OUT/1-gpu/ "
                                             "directory kiln convert -o OUT writes)")
    src.add_argument("--model_dir", help="a Hugging Face model directory: convert and build in one step, as the legacy "
                                         "build.py (the checkpoint is not kept)")
    legacy = p.add_argument_group("one-step build from --model_dir (the legacy build.py's flags)")
    legacy.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    legacy.add_argument("--model_version", choices=["v1_7b", "v1_13b", "v2_7b", "v2_13b"], help="Baichuan only")
    legacy.add_argument("--world_size", type=int, default=None, help="ranks (tp × pp; default tp × pp)")
    legacy.add_argument("--tp_size", type=int, default=None, help="tensor parallel size (default --world_size or 1)")
    legacy.add_argument("--pp_size", type=int, default=1, help="pipeline parallel stages")
    p.add_argument("--output_dir", default="kiln_engine", help="where to write the engine (written atomically)")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences running at once")
    p.add_argument("--max_input_len", type=int, default=1024, help="longest prompt, in tokens")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--max_output_len", type=int, default=None,
                   help="the legacy build.py's limit: --max_seq_len becomes --max_input_len + this")
    p.add_argument("--max_beam_width", type=int, default=4,
                   help="most beams one request may use (default 4; the paged KV cache makes this free at build)")
    p.add_argument("--max_num_tokens", type=int, default=8192, help="tokens computed in one step")
    p.add_argument("--tokens_per_block", "--kv_block_size", dest="kv_block_size", type=int, default=16,
                   help="tokens per paged KV-cache block")
    p.add_argument("--memory_gib", type=float, default=None,
                   help="memory per rank to plan for (prints how many KV tokens fit; refuses if weights do not)")
    p.add_argument("--no_tune", action="store_true",
                   help="record the default kernel tiles instead of tuning them on this GPU (tuning takes a minute "
                        "or two for MoE models; nothing is tuned without a GPU)")
    add_quant_flags(p, QUANT)
    add_compat_flags(p, IGNORED, REFUSED)
    p.add_argument("--copy_weights", action="store_true",
                   help="copy the checkpoint's rank files instead of hard-linking them (linked files are read-only)")


def source_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint to build from (None for --model_dir); exactly one source, and the one-step flags only with
    --model_dir."""
    given = [f"--{name}" for name in ("checkpoint_dir", "bin_model_dir", "model_dir") if getattr(args, name)]
    if len(given) != 1:
        raise ConfigError("give exactly one of --checkpoint_dir, --bin_model_dir or --model_dir"
                          + (f" (got {', '.join(given)})" if given else ""))
    if not args.model_dir:
        one_step = [f"--{n}" for n in ("dtype", "model_version", "world_size", "tp_size") if getattr(args, n)]
        if one_step or args.pp_size != 1:
            raise ConfigError(f"{', '.join(one_step or ['--pp_size'])} applies only with --model_dir (a one-step "
                              "build); a checkpoint's dtype and mapping are fixed by kiln convert")
    return args.checkpoint_dir or args.bin_model_dir


def parallel_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(tp, pp) of a one-step build: --tp_size/--pp_size, or the legacy --world_size as tensor parallel ranks."""
    pp = args.pp_size
    tp = args.tp_size if args.tp_size is not None else (args.world_size // pp if args.world_size else 1)
    if args.world_size is not None and tp * pp != args.world_size:
        raise ConfigError(f"--world_size {args.world_size} must equal --tp_size {tp} × --pp_size {pp}")
    return tp, pp


def convert_for_build(args: argparse.Namespace, workdir: Path, quant: QuantConfig) -> Path:
    """The legacy build.py's first half: convert --model_dir (quantized as `quant` says) into a checkpoint under
    `workdir`."""
    tp, pp = parallel_sizes(args)
    return convert(plan_from_hf(args.model_dir, args.dtype, tp, pp, args.model_version, quant,
                                quant_ckpt_path(args)), workdir / "checkpoint", progress=False)


def build_config(args: argparse.Namespace, checkpoint_dir: str) -> BuildConfig:
    model = load_artifact(checkpoint_dir, "checkpoint").model
    max_seq_len = args.max_seq_len
    if args.max_output_len is not None:
        if max_seq_len is not None:
            raise ConfigError("give --max_seq_len or the legacy --max_output_len, not both")
        max_seq_len = args.max_input_len + args.max_output_len
    max_seq_len = max_seq_len or model.max_position_embeddings
    max_input_len = args.max_input_len if args.max_seq_len or args.max_input_len < max_seq_len else max_seq_len - 1
    return BuildConfig(args.max_batch_size, max_input_len, max_seq_len, args.max_beam_width,
                       args.max_num_tokens, args.kv_block_size)


def main(args: argparse.Namespace) -> int:
    quant = quant_config_from_flags(args)
    check_compat_flags(args, "build")
    if quant_ckpt_path(args) is not None and not args.model_dir:
        raise ConfigError("--quant_ckpt_path needs --model_dir of the unquantized Hugging Face checkpoint it was made "
                          "from (config, tokenizer, the layers GPTQ left in float): a one-step build")
    checkpoint_dir = source_checkpoint(args)
    if checkpoint_dir is not None:
        if quant.quant_algo is not None:
            raise ConfigError("--use_weight_only applies to a one-step build from --model_dir; a checkpoint is "
                              "quantized by kiln convert (pass the flags there)")
        check_kv_cache_flags(quant.kv_cache_quant_algo, checkpoint_dir)
        return build_engine(args, checkpoint_dir)
    parent = Path(args.output_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, so that the engine's hard links to the converted weights stay on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".kiln-build-", dir=parent) as work:
        checkpoint = convert_for_build(args, Path(work), quant)
        algo = f", weights {quant.quant_algo}" if quant.quant_algo else ""
        print(f"converted {args.model_dir} ({load_artifact(checkpoint, 'checkpoint').model.dtype}{algo})", flush=True)
        return build_engine(args, str(checkpoint))


def check_kv_cache_flags(asked: str | None, checkpoint_dir: str) -> None:
    """The legacy build.py's --int8_kv_cache / --fp8_kv_cache over a checkpoint: the checkpoint must already hold
    that KV cache's calibrated scales (kiln convert --int8_kv_cache / -kv writes them)."""
    if asked is None:
        return
    has = load_artifact(checkpoint_dir, "checkpoint").quant.kv_cache_quant_algo
    if has != asked:
        flag = "--int8_kv_cache" if asked == "INT8" else "--fp8_kv_cache"
        raise ConfigError(f"{flag} asks for an {asked} KV cache, but {checkpoint_dir} was converted with "
                          f"{has or 'no KV-cache quantization'}; convert with {flag} (hf_baichuan_convert.py's -kv) "
                          "to calibrate its scales, or drop the flag")


def build_engine(args: argparse.Namespace, checkpoint_dir: str) -> int:
    config = build_config(args, checkpoint_dir)
    out, plan = build(checkpoint_dir, args.output_dir, config, args.memory_gib, tune=not args.no_tune,
                      log=lambda line: print(line, flush=True), copy_weights=args.copy_weights)
    print(f"built engine {out}: max_batch_size {config.max_batch_size}, max_input_len {config.max_input_len}, "
          f"max_seq_len {config.max_seq_len}")
    print(describe_kernels(load_artifact(out, "engine").raw.get("kernels") or {}))
    kv_cache = load_artifact(out, "engine").quant.kv_cache_quant_algo
    print(describe(plan, config, args.memory_gib, kv_cache))
    return 0
