"""kiln quantize: TensorRT-LLM's examples/quantization/quantize.py (ModelOpt) with the command name changed.

`--qformat full_prec` (quantize.py's default: no quantization) writes an unquantized kiln checkpoint, as kiln convert;
`int8_wo`/`int4_wo` (ModelOpt's weight-only formats, no calibration) write the W8A16/W4A16 checkpoint that kiln
convert --use_weight_only writes; `int4_awq` (and kiln's `int4_gptq`) calibrate group-wise INT4 (W4A16_AWQ,
W4A16_GPTQ; `--awq_block_size`/`--group_size`, `--calib_size`, `--calib_max_seq_length`, `--calib_dataset`, `--seed`,
GPTQ's `--desc_act`); `fp8` (static activation scales, calibrated) and `fp8_pc_pt` FP8 W8A8 (FP8,
FP8_PER_CHANNEL_PER_TOKEN); `int8_sq` SmoothQuant W8A8_SQ_PER_CHANNEL (alpha 0.5, calibrated on the same flags);
`--kv_cache_dtype int8|fp8` adds a calibrated INT8/FP8 KV cache to any of them (on the same
calibration flags). Every other --qformat is refused by quant_flags.py's one line until kiln has it (issue 15).
"""

from __future__ import annotations

import argparse
import dataclasses

from kiln.checkpoint.convert import convert
from kiln.cli.convert_cmd import plan_from_hf
from kiln.cli.quant_flags import add_quant_flags, calibrates_activations, calibration_from_flags, \
    kv_calibration_from_flags, qformat_takes_flags, quant_config_from_flags, refuse_quantization
from kiln.config import DTYPES, ConfigError

HELP = ("quantize a Hugging Face checkpoint into a kiln checkpoint (quantize.py's flags; full_prec, int8_wo, int4_wo, "
        "int4_awq, int4_gptq, fp8, fp8_pc_pt and int8_sq for now, each with an optional INT8/FP8 KV cache)")
QFORMATS = ["full_prec", "fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq", "int8_wo", "int4_wo", "nvfp4"]
# quantize.py's weight-only formats (ModelOpt's int8_wo/int4_wo: per-channel, no calibration; int4_awq and kiln's
# int4_gptq: group-wise, calibrated), FP8 W8A8 and SmoothQuant W8A8 -> quant_algo.
QFORMAT_ALGOS = {"int8_wo": "W8A16", "int4_wo": "W4A16", "int4_awq": "W4A16_AWQ", "int4_gptq": "W4A16_GPTQ",
                 "fp8": "FP8", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN",  # FP8 W8A8: kiln.quant.fp8
                 "int8_sq": "W8A8_SQ_PER_CHANNEL"}  # SmoothQuant, alpha 0.5 (quant_flags.QFORMAT_SQ_ALPHA), calibrated
QUANT = ["--kv_cache_dtype", "--awq_block_size", "--calib_size", "--calib_max_seq_length", "--calib_dataset",
         "--group_size", "--quantize_lm_head", "--auto_quantize_bits", "--desc_act"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True, help="Hugging Face model directory")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="weight dtype of the unquantized parts (auto: the checkpoint's)")
    p.add_argument("--qformat", default="full_prec", choices=QFORMATS,
                   help="full_prec (the default) writes an unquantized checkpoint; int8_wo/int4_wo weight-only "
                        "per-channel INT8/INT4 (W8A16/W4A16); int4_awq/int4_gptq group-wise INT4 calibrated by AWQ or "
                        "GPTQ; fp8 (per-tensor, calibrated static activations) and fp8_pc_pt (per-channel, per-token) FP8 "
                        "W8A8; int8_sq SmoothQuant W8A8 (alpha 0.5); the others are not implemented yet")
    p.add_argument("--output_dir", default=None, help="where to write the kiln checkpoint (default exported_model)")
    p.add_argument("--export_path", default=None, help="the older quantize.py's spelling of --output_dir")
    p.add_argument("--export_format", default="tensorrt_llm", choices=["tensorrt_llm", "hf"],
                   help="tensorrt_llm (a kiln checkpoint); hf is refused: kiln writes only its own checkpoints")
    p.add_argument("--tp_size", type=int, default=1, help="tensor parallel ranks of the checkpoint")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline parallel stages of the checkpoint")
    p.add_argument("--batch_size", type=int, default=1, help="calibration batch size (unused by full_prec)")
    p.add_argument("--seed", type=int, default=1234, help="calibration seed: which windows of the text AWQ/GPTQ use")
    p.add_argument("--device", default=None, help="calibration device of --kv_cache_dtype (default: cuda when present)")
    add_quant_flags(p, QUANT)


def output_dir(args: argparse.Namespace) -> str:
    if args.output_dir is not None and args.export_path is not None:
        raise ConfigError("give --output_dir or the older --export_path, not both")
    return args.output_dir or args.export_path or "exported_model"


def main(args: argparse.Namespace) -> int:
    algo = QFORMAT_ALGOS.get(args.qformat)
    if args.qformat != "full_prec" and (algo is None or not qformat_takes_flags(args, algo)):
        refuse_quantization(args, [f"--qformat {args.qformat}"])
    quant = quant_config_from_flags(args, algo)  # --kv_cache_dtype int8|fp8 with any of them; the rest is refused
    calib = kv_calibration_from_flags(args) if calibrates_activations(quant) else None
    if calib is not None and args.device is not None:
        calib.device = args.device
    if args.export_format != "tensorrt_llm":
        raise ConfigError(f"--export_format {args.export_format} is refused: kiln writes kiln checkpoints only "
                          "(the Hugging Face directory given is already the unquantized hf format)")
    plan = plan_from_hf(args.model_dir, None if args.dtype == "auto" else args.dtype, args.tp_size, args.pp_size,
                        quant=quant)
    calibration, dataset = calibration_from_flags(args, quant, args.seed)
    plan = dataclasses.replace(plan, calibration=calibration, calib_dataset=dataset, kv_calibration=calib)
    out = convert(plan, output_dir(args))
    what = f"{args.qformat} ({algo})" if algo else "unquantized (full_prec)"
    what += f" with an {quant.kv_cache_quant_algo} KV cache" if quant.kv_cache_quant_algo else ""
    print(f"wrote {what} {plan.config.architecture} checkpoint ({plan.config.dtype}, "
          f"tp {plan.mapping.tp_size} × pp {plan.mapping.pp_size}) to {out}")
    return 0
