"""`kiln bench --weight_only_precision none int8 int4 ...`: the same dummy model converted into each weight-only
format (integer weight-only formats drawn straight in the format, kiln.quant.dummy_weights; FP8 and SmoothQuant
rounded from dummy float weights), built and timed in turn in one process, then
one table that sets every precision's decode and prefill beside the unquantized engine's ("none"). Each engine's floor counts its own bytes:
quantized weights as stored, plus their scales and zeros (kiln.bench.physics)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kiln.bench.options import BenchOptions
from kiln.bench.report import BenchReport
from kiln.config import ConfigError, QuantConfig

# --weight_only_precision -> quant_algo (TensorRT-LLM's names; the group-wise ones per the group-wise format).
PRECISION_ALGOS = {"none": None, "int8": "W8A16", "int4": "W4A16", "int4_awq": "W4A16_AWQ", "int4_gptq": "W4A16_GPTQ",
                   # FP8 W8A8 (kiln.quant.fp8): per tensor with static input scales (dummy: amax 8), per channel/token
                   "fp8": "FP8", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN",
                   "int8_sq": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"}  # SmoothQuant W8A8 (unit absmax on dummies)
GROUP_WISE = ("int4_awq", "int4_gptq")
WEIGHT_ONLY = ("int8", "int4") + GROUP_WISE  # the precisions whose LM head --quantize_lm_head quantizes too


def precision_quant(precision: str, group_size: int, quantize_lm_head: bool = False) -> QuantConfig:
    """The QuantConfig of one precision (ConfigError where this kiln does not run it); with quantize_lm_head, the
    weight-only precisions quantize the LM head too (the others, and none, leave it in the model dtype)."""
    algo = PRECISION_ALGOS[precision]
    if algo is None:
        return QuantConfig()
    head = quantize_lm_head and precision in WEIGHT_ONLY
    if precision in GROUP_WISE:
        return QuantConfig(quant_algo=algo, group_size=group_size, quantize_lm_head=head)
    if precision in WEIGHT_ONLY:
        return QuantConfig(quant_algo=algo, quantize_lm_head=head)
    if precision == "int8_sq":  # alpha matters only for calibrated weights; dummies smooth on unit absmax
        return QuantConfig(quant_algo=algo, smoothquant_val=0.5)
    return QuantConfig(quant_algo=algo)


def check_precisions(options: BenchOptions) -> None:
    """Refuse precisions kiln does not know or run, and precisions on a given engine, before anything is built."""
    if not options.dummy:
        raise ConfigError("--weight_only_precision converts dummy weights (--preset/--config); an engine "
                          "(--engine_dir) is already quantized or not")
    for precision in options.weight_only_precision:
        if precision not in PRECISION_ALGOS:
            raise ConfigError(f"unknown --weight_only_precision {precision!r}; choose from "
                              f"{', '.join(PRECISION_ALGOS)} (none: the unquantized dtype)")
    if len(set(options.weight_only_precision)) != len(options.weight_only_precision):
        raise ConfigError(f"--weight_only_precision lists a precision twice: {options.weight_only_precision}")
    if options.compare_hf and any(p != "none" for p in options.weight_only_precision):
        raise ConfigError("--compare_hf times transformers on the unquantized weights; drop it, or bench only "
                          "--weight_only_precision none")
    if options.group_size not in (32, 64, 128):
        raise ConfigError(f"--group_size must be 32, 64 or 128, got {options.group_size}")
    if options.quantize_lm_head and not any(p in WEIGHT_ONLY for p in options.weight_only_precision):
        raise ConfigError(f"--quantize_lm_head quantizes the LM head of the weight-only precisions "
                          f"({', '.join(WEIGHT_ONLY)}); none of them is in --weight_only_precision")
    for precision in options.weight_only_precision:
        precision_quant(precision, options.group_size, options.quantize_lm_head)  # fails here, in one line


@dataclass
class PrecisionRow:
    """One precision at one batch size, beside the unquantized engine's same case (None without "none")."""

    precision: str
    batch_size: int
    decode_ms_per_step: float
    tokens_per_s: float
    fraction_of_floor: float
    prefill_ms: float
    decode_speedup: float | None
    prefill_ratio: float | None  # prefill time over the unquantized engine's (lower is faster)


def compare(reports: dict[str, BenchReport]) -> list[PrecisionRow]:
    base = {c.batch_size: c for c in reports["none"].cases} if "none" in reports else {}
    rows = []
    for precision, report in reports.items():
        for c in report.cases:
            b = base.get(c.batch_size)
            rows.append(PrecisionRow(precision, c.batch_size, c.decode_ms_per_step, c.tokens_per_s,
                                     c.fraction_of_floor, c.prefill_ms,
                                     None if b is None else b.decode_ms_per_step / c.decode_ms_per_step,
                                     None if b is None else c.prefill_ms / b.prefill_ms))
    return rows


def comparison_table(rows: list[PrecisionRow]) -> str:
    """The precisions side by side as a Markdown table."""
    lines = ["| precision | batch | decode ms/step | tok/s | x unquantized tok/s | of floor | prefill ms "
             "| prefill / unquantized |", "|" + "---|" * 8]
    for r in rows:
        speed = "-" if r.decode_speedup is None else f"{r.decode_speedup:.2f}x"
        prefill = "-" if r.prefill_ratio is None else f"{r.prefill_ratio:.2f}x"
        lines.append(f"| {r.precision} | {r.batch_size} | {r.decode_ms_per_step:.3f} | {r.tokens_per_s:.1f} | {speed} "
                     f"| {100 * r.fraction_of_floor:.0f}% | {r.prefill_ms:.2f} | {prefill} |")
    return "\n".join(lines)


def run_precisions(options: BenchOptions, device: torch.device, log: Callable[[str], None]) -> list[BenchReport]:
    """Every precision's dummy engine in turn (each removed before the next is built), then the comparison."""
    from dataclasses import replace

    from kiln.bench.dummy import dummy_engine
    from kiln.bench.runner import bench_engine

    reports: dict[str, BenchReport] = {}
    single = replace(options, output_json=None)
    for precision in options.weight_only_precision:
        log(f"== weight-only precision {precision}")
        quant = precision_quant(precision, options.group_size, options.quantize_lm_head)
        with dummy_engine(options, log, quant) as engine_dir:
            reports[precision] = bench_engine(engine_dir, single, device, log)
        reports[precision].engine["weight_only_precision"] = precision
    rows = compare(reports)
    log(comparison_table(rows))
    if options.output_json:
        write_json(options.output_json, reports, rows)
        log(f"wrote {options.output_json}")
    return list(reports.values())


def write_json(path: str, reports: dict[str, BenchReport], rows: list[PrecisionRow]) -> None:
    from dataclasses import asdict

    data: dict[str, Any] = {"kiln_bench_format": 1, "precisions": {p: r.to_dict() for p, r in reports.items()},
                            "comparison": [asdict(r) for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
