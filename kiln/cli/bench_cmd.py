"""kiln bench: prefill and decode timing of an engine (or of dummy weights at a preset's shapes), the decode floor,
and transformers beside it."""

from __future__ import annotations

import argparse

from kiln.bench import BenchOptions, run_bench

HELP = "time prefill and decode against the memory-bandwidth floor and transformers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("engine (one of)")
    src.add_argument("--engine_dir", help="a built engine")
    src.add_argument("--preset", help="dummy random weights of a built-in config (converted and built in a temporary "
                                      "directory that is removed afterwards)")
    src.add_argument("--config", help="dummy random weights of this Hugging Face style config.json")
    p.add_argument("--num_layers", type=int, help="dummy weights: keep only the first N layers (a slice at full width)")
    p.add_argument("--dtype", help="dummy weights' dtype: float32, float16 or bfloat16 (default: the config's)")
    p.add_argument("--kv_cache_dtype", choices=["int8", "fp8"], default=None,
                   help="dummy weights: an INT8 or FP8 KV cache (unit scales; default: the weights' dtype)")
    p.add_argument("--batch_size", type=int, nargs="+", default=[1, 8, 32], help="batch sizes, one case each")
    p.add_argument("--input_len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--output_len", type=int, default=128, help="generated tokens (end tokens ignored)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each case first")
    p.add_argument("--compare_hf", action="store_true",
                   help="also time transformers' generate on the same weights and shapes, in this process")
    p.add_argument("--output_json", help="write every number to this JSON file")
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=None,
                   help="share of free GPU memory for kiln's KV cache (default 0.9, 0.3 with --compare_hf)")
    p.add_argument("--kernel_backend", default="auto", help="auto, triton or torch")
    p.add_argument("--no_async_scheduling", action="store_true",
                   help="time steps run one at a time (by default each is launched before the previous one's "
                   "tokens reach the host)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--no_tune", action="store_true", help="dummy engines: record default kernel tiles, skip tuning")
    p.add_argument("--seed", type=int, default=0, help="seed of dummy weights and random prompts")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--weights_in_memory", action="store_true", default=None,
                       help="dummy weights: never written to disk; each rank draws them into its parameters when it "
                            "loads (the default, except with --compare_hf): what lets DBRX-132B in INT4 run on one "
                            "GPU with a small disk")
    where.add_argument("--weights_on_disk", dest="weights_in_memory", action="store_false",
                       help="dummy weights: write the rank files and load them, as kiln convert + build do")
    quant = p.add_argument_group("dummy weights quantized (each precision converted, built and timed in turn)")
    quant.add_argument("--weight_only_precision", nargs="+", default=[], metavar="P",
                       help="none (the unquantized dtype), int8, int4, int4_awq, int4_gptq, fp8, fp8_pc_pt (FP8 W8A8), "
                            "int8_sq (SmoothQuant W8A8); several give a table of each beside none")
    quant.add_argument("--group_size", type=int, default=128, help="group size of int4_awq / int4_gptq")
    quant.add_argument("--quantize_lm_head", action="store_true",
                       help="the weight-only precisions (int8, int4, int4_awq, int4_gptq) quantize the LM head too")
    par = p.add_argument_group("dummy weights sharded over GPUs (as kiln convert; the floor is then per GPU)")
    par.add_argument("--tp_size", type=int, default=1, help="tensor parallel ranks of the dummy engine")
    par.add_argument("--pp_size", type=int, default=1, help="pipeline parallel stages of the dummy engine")
    par.add_argument("--moe_tp_mode", type=int, default=2, help="1: experts placed whole on ranks (expert parallel), "
                                                                 "2: every expert split (tensor parallel)")
    par.add_argument("--moe_tp_size", type=int, default=-1, help="tensor parallel size over each expert")
    par.add_argument("--moe_ep_size", type=int, default=-1, help="expert parallel size")


def main(args: argparse.Namespace) -> int:
    options = BenchOptions(
        engine_dir=args.engine_dir, preset=args.preset, config=args.config, num_layers=args.num_layers,
        dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, batch_sizes=list(args.batch_size), input_len=args.input_len, output_len=args.output_len,
        warmup=args.warmup, compare_hf=args.compare_hf, output_json=args.output_json,
        kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction, kernel_backend=args.kernel_backend,
        async_scheduling=not args.no_async_scheduling, device=args.device, tune=not args.no_tune, seed=args.seed, tp_size=args.tp_size, pp_size=args.pp_size,
        moe_tp_mode=args.moe_tp_mode, moe_tp_size=args.moe_tp_size, moe_ep_size=args.moe_ep_size,
        weight_only_precision=list(args.weight_only_precision), group_size=args.group_size,
        quantize_lm_head=args.quantize_lm_head, weights_in_memory=args.weights_in_memory,
    )
    run_bench(options, log=lambda line: print(line, flush=True))
    return 0
