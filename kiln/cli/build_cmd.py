"""kiln build: kiln checkpoint -> engine (flags as trtllm-build)."""

from __future__ import annotations

import argparse

from kiln.build import build
from kiln.checkpoint.kiln_format import load_artifact
from kiln.config import BuildConfig
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


HELP = "build an engine from a kiln checkpoint (validate, set limits, tune kernels on a GPU, plan memory)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_dir", required=True)
    p.add_argument("--output_dir", default="kiln_engine")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences running at once")
    p.add_argument("--max_input_len", type=int, default=1024, help="longest prompt, in tokens")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
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
    p.add_argument("--copy_weights", action="store_true",
                   help="copy the checkpoint's rank files instead of hard-linking them (linked files are read-only)")


def main(args: argparse.Namespace) -> int:
    model = load_artifact(args.checkpoint_dir, "checkpoint").model
    max_seq_len = args.max_seq_len or model.max_position_embeddings
    max_input_len = args.max_input_len if args.max_seq_len or args.max_input_len < max_seq_len else max_seq_len - 1
    config = BuildConfig(args.max_batch_size, max_input_len, max_seq_len, args.max_beam_width,
                         args.max_num_tokens, args.kv_block_size)
    out, plan = build(args.checkpoint_dir, args.output_dir, config, args.memory_gib, tune=not args.no_tune,
                      log=lambda line: print(line, flush=True), copy_weights=args.copy_weights)
    print(f"built engine {out}: max_batch_size {config.max_batch_size}, max_input_len {config.max_input_len}, "
          f"max_seq_len {config.max_seq_len}")
    print(describe_kernels(load_artifact(out, "engine").raw.get("kernels") or {}))
    print(describe(plan, config, args.memory_gib))
    return 0
