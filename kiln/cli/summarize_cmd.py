"""kiln summarize: ROUGE of an engine's summaries, beside transformers' (flags as TensorRT-LLM's
examples/summarize.py)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from kiln.cli.run_cmd import early_stopping
from kiln.cli.eval_args import data_type, free_memory, tokenizer_dir
from kiln.config import ConfigError
from kiln.eval.datasets import SummaryExample, load_examples, shuffled
from kiln.eval.hf_reference import HFUnavailable, load_hf_reference
from kiln.eval.summarize import SummaryRun, batches, run_summaries
from kiln.runtime_checks import runtime_device
from kiln.sampling_params import SamplingParams

HELP = "summarize articles with an engine (and transformers) and report ROUGE, as TensorRT-LLM's summarize.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine_dir", default="kiln_engine", help="the kiln engine to evaluate (with --test_kiln)")
    p.add_argument("--hf_model_dir", help="the Hugging Face checkpoint: transformers' model for --test_hf, and the "
                                          "tokenizer when --tokenizer_dir is not given")
    p.add_argument("--tokenizer_dir", help="tokenizer directory (default: --hf_model_dir, else the tokenizer "
                                            "the engine carries)")
    p.add_argument("--test_kiln", "--test_trt_llm", dest="test_kiln", action="store_true",
                   help="summarize with the kiln engine")
    p.add_argument("--test_hf", action="store_true", help="summarize with transformers on --hf_model_dir")
    p.add_argument("--data_type", "--hf_data_type", dest="data_type", default=None,
                   help="transformers' dtype: fp32, fp16, bf16 (default: the engine's, else the checkpoint's)")
    p.add_argument("--dataset_dir", help="a local copy of ccdv/cnn_dailymail 3.0.0 (its parquet or arrow test "
                                         "split); default: the ACLSum subset shipped with kiln")
    p.add_argument("--dataset_path", help="a JSONL file, one object per line (fields: --input_field, "
                                          "--reference_field)")
    p.add_argument("--input_field", default="article", help="the document's field (default: article)")
    p.add_argument("--reference_field", default="highlights", help="the reference summary's field "
                                                                   "(default: highlights)")
    p.add_argument("--max_ite", type=int, default=20, help="batches to run (default 20)")
    p.add_argument("--batch_size", type=int, default=1, help="articles summarized together")
    p.add_argument("--max_input_length", type=int, default=923, help="keep the last N prompt tokens (default 923)")
    p.add_argument("--output_len", type=int, default=100, help="tokens to generate per summary (default 100)")
    p.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams (1: none)")
    p.add_argument("--length_penalty", type=float, default=1.0, help="beam search length penalty (transformers')")
    p.add_argument("--early_stopping", type=early_stopping, default=True, help="beam search: 1, 0 or never (as kiln run)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature when sampling (--top_k other than 1)")
    p.add_argument("--top_k", type=int, default=1, help="1 (the default) is greedy")
    p.add_argument("--top_p", type=float, default=0.0, help="0 (the default) disables top-p")
    p.add_argument("--random_seed", type=int, default=0, help="dataset shuffle and sampling seed (default 0)")
    p.add_argument("--check_accuracy", action="store_true",
                   help="fail (exit 1) unless kiln's rouge1 beats the threshold (and its perplexity, with --eval_ppl)")
    p.add_argument("--tensorrt_llm_rouge1_threshold", "--kiln_rouge1_threshold", dest="rouge1_threshold",
                   type=float, default=15.0, help="--check_accuracy's lowest passing rouge1")
    p.add_argument("--eval_ppl", action="store_true", help="also the per-token perplexity of prompt + summary")
    p.add_argument("--tensorrt_llm_ppl_threshold", "--kiln_ppl_threshold", dest="ppl_threshold", type=float,
                   default=15.0, help="--check_accuracy's highest passing perplexity (with --eval_ppl)")
    p.add_argument("--output_json", help='write {"kiln": {...}, "hf": {...}}: ROUGE, tokens/s, time, summaries')
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def validate(args: argparse.Namespace) -> None:
    if not (args.test_kiln or args.test_hf):
        raise ConfigError("nothing to run: pass --test_kiln (alias --test_trt_llm) and/or --test_hf")
    for flag in ("max_ite", "batch_size", "max_input_length", "output_len", "num_beams"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} is {getattr(args, flag)}; it must be at least 1")
    if not 0 <= args.rouge1_threshold <= 100:  # also false for NaN
        raise ConfigError(f"--tensorrt_llm_rouge1_threshold is {args.rouge1_threshold}; ROUGE is between 0 and 100")
    if not (args.ppl_threshold >= 1 and math.isfinite(args.ppl_threshold)):
        raise ConfigError(f"--tensorrt_llm_ppl_threshold is {args.ppl_threshold}; a perplexity threshold is a "
                          "finite number >= 1")
    if args.check_accuracy and not args.test_kiln:
        raise ConfigError("--check_accuracy checks kiln's scores: add --test_kiln")
    if args.test_hf and not args.hf_model_dir:
        raise ConfigError("--test_hf needs --hf_model_dir (the Hugging Face checkpoint the engine was made from)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """summarize.py's settings: top_k 1 is greedy; --num_beams > 1 is beam search."""
    greedy = args.top_k == 1
    return SamplingParams(
        max_tokens=args.output_len, num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping=args.early_stopping, temperature=0.0 if greedy else args.temperature,
        top_k=0 if greedy else args.top_k, top_p=1.0 if args.top_p == 0 else args.top_p,
        seed=None if greedy or args.num_beams > 1 else args.random_seed)


def hf_generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """transformers' generate settings for the same decoding (greedy rather than summarize.py's do_sample with
    top_k 1, which picks the same token without drawing)."""
    if args.num_beams > 1:
        return {"num_beams": args.num_beams, "length_penalty": args.length_penalty,
                "early_stopping": args.early_stopping, "do_sample": False}
    if args.top_k == 1:
        return {"do_sample": False}
    return {"do_sample": True, "top_k": args.top_k, "top_p": args.top_p or 1.0, "temperature": args.temperature}


def progress(groups: list[list[SummaryExample]], name: str):
    from tqdm import tqdm

    return tqdm(groups, desc=f"{name} summarize", unit="batch", file=sys.stderr, dynamic_ncols=True)


def run_kiln(args: argparse.Namespace, groups: list[list[SummaryExample]], tok_dir: str) -> SummaryRun:
    from kiln.llm import LLM

    llm = LLM(args.engine_dir, tokenizer_dir=tok_dir, device=args.device)
    try:
        build = llm.build
        if args.max_input_length > build.max_input_len:
            raise ConfigError(f"--max_input_length {args.max_input_length} exceeds the engine's max_input_len "
                              f"{build.max_input_len}; pass --max_input_length {build.max_input_len} or rebuild "
                              f"with --max_input_len {args.max_input_length}")
        if args.max_input_length + args.output_len > build.max_seq_len:
            raise ConfigError(f"--max_input_length {args.max_input_length} + --output_len {args.output_len} exceeds "
                              f"the engine's max_seq_len {build.max_seq_len}; lower them or rebuild with "
                              f"--max_seq_len {args.max_input_length + args.output_len}")
        params = sampling_params(args)

        def generate(prompts: list[list[int]]) -> list[list[int]]:
            return [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]

        return run_summaries("kiln", progress(groups, "kiln"), llm.tokenizer, args.max_input_length, generate,
                             llm.score if args.eval_ppl else None)
    finally:
        llm.close()
        del llm
        free_memory()


def run_hf(args: argparse.Namespace, groups: list[list[SummaryExample]], tokenizer, dtype: torch.dtype | None
           ) -> SummaryRun:
    ref = load_hf_reference(args.hf_model_dir, dtype, runtime_device(args.device))
    for note in ref.notes:
        print(f"kiln summarize: note: {note}", file=sys.stderr)
    kwargs, stops = hf_generate_kwargs(args), sorted(tokenizer.stop_token_ids)
    if kwargs.get("do_sample"):
        torch.manual_seed(args.random_seed)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        return ref.generate(prompts, tokenizer.pad_token_id, stops, args.output_len, kwargs)

    try:
        return run_summaries("hf", progress(groups, "hf"), tokenizer, args.max_input_length, generate,
                             ref.logits if args.eval_ppl else None)
    finally:
        del ref
        free_memory()


def hf_dtype(args: argparse.Namespace) -> torch.dtype | None:
    if args.data_type is None:
        if args.test_kiln:
            from kiln.checkpoint.kiln_format import load_artifact

            return load_artifact(args.engine_dir, "engine").model.torch_dtype
        return None
    return data_type(args.data_type)


def print_table(runs: list[SummaryRun]) -> None:
    rows: list[tuple[str, list[str]]] = [(key, [f"{r.rouge.get(key, float('nan')):.4f}" for r in runs])
                                         for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")]
    if any(r.perplexity is not None for r in runs):
        rows.append(("perplexity", [f"{r.perplexity:.4f}" if r.perplexity is not None else "-" for r in runs]))
    rows += [("examples", [str(len(r.summaries)) for r in runs]),
             ("output tokens", [str(r.output_tokens) for r in runs]),
             ("wall time (s)", [f"{r.seconds:.3f}" for r in runs]),
             ("tokens/s", [f"{r.tokens_per_s:.1f}" for r in runs])]
    print(f"{'':<15}" + "".join(f"{r.name:>14}" for r in runs))
    for label, cells in rows:
        print(f"{label:<15}" + "".join(f"{c:>14}" for c in cells))


def check_accuracy(args: argparse.Namespace, kiln_run: SummaryRun) -> str | None:
    """summarize.py's --check_accuracy: rouge1 above its threshold, perplexity below its own; the failure line."""
    rouge1 = kiln_run.rouge["rouge1"]
    if not rouge1 > args.rouge1_threshold:
        return f"rouge1 {rouge1:.4f} is not above --tensorrt_llm_rouge1_threshold {args.rouge1_threshold:g}"
    ppl = kiln_run.perplexity
    if args.eval_ppl and ppl is not None and not ppl < args.ppl_threshold:
        return f"perplexity {ppl:.4f} is not below --tensorrt_llm_ppl_threshold {args.ppl_threshold:g}"
    return None


def main(args: argparse.Namespace) -> int:
    from kiln.tokenizer import load_tokenizer

    validate(args)
    tok_dir = tokenizer_dir(args)
    tokenizer = load_tokenizer(tok_dir)
    examples = shuffled(load_examples(args.dataset_dir, args.dataset_path, args.input_field, args.reference_field),
                        args.random_seed)
    groups = batches(examples, args.batch_size, args.max_ite)
    dtype = hf_dtype(args) if args.test_hf else None
    runs = [run_kiln(args, groups, tok_dir)] if args.test_kiln else []
    if args.test_hf:
        try:
            runs.append(run_hf(args, groups, tokenizer, dtype))
        except HFUnavailable as err:
            print(f"kiln summarize: {err}", file=sys.stderr)
    if not runs:
        return 2
    print_table(runs)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({r.name: r.to_json() for r in runs}, indent=1,
                                                     ensure_ascii=False) + "\n")
    failure = check_accuracy(args, runs[0]) if args.check_accuracy else None
    if failure:
        print(f"kiln summarize: accuracy check FAILED: {failure}", file=sys.stderr)
        return 1
    return 0
