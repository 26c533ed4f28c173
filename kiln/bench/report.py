"""What `kiln bench` reports: one `CaseResult` per batch size, printed as a table and written as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9


@dataclass
class CaseResult:
    """One case, kiln beside its floor and transformers. Rates follow from times: tokens_per_s = batch * 1000 /
    decode_ms_per_step, fraction_of_floor = floor_ms_per_step / decode_ms_per_step, kiln_over_hf = hf / kiln."""

    batch_size: int
    input_len: int
    output_len: int
    prefill_ms: float
    prefill_steps: int
    decode_ms_per_step: float
    decode_steps: int
    tokens_per_s: float
    weight_bytes: int  # the engine's memory plan
    active_weight_bytes: float  # read per decode step (experts at the expected distinct count)
    expected_active_experts: float | None  # per layer, E * (1 - (1 - k/E)^B); None for dense models
    kv_bytes_per_step: float  # at the mean context of the decode steps
    floor_ms_per_step: float
    fraction_of_floor: float
    hf_prefill_ms: float | None = None
    hf_ms_per_step: float | None = None
    hf_tokens_per_s: float | None = None
    kiln_over_hf: float | None = None
    prefill_tflops: float | None = None  # matmul FLOPs of the prefill (WeightBytes.prefill_flops) / prefill time
    prefill_fraction_of_matmul: float | None = None  # prefill_tflops / the bf16 matmul rate measured in-process

    def add_hf(self, prefill_ms: float, ms_per_step: float) -> None:
        self.hf_prefill_ms, self.hf_ms_per_step = prefill_ms, ms_per_step
        self.hf_tokens_per_s = self.batch_size * 1000.0 / ms_per_step
        self.kiln_over_hf = ms_per_step / self.decode_ms_per_step


@dataclass
class BenchReport:
    """A whole run: where it ran, the engine, the measured bandwidth, notes on the floor, and the cases."""

    device: str
    versions: dict[str, str]
    bandwidth_gbs: float
    engine: dict[str, Any]
    matmul_tflops: float | None
    options: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    hf: dict[str, Any] = field(default_factory=dict)
    cases: list[CaseResult] = field(default_factory=list)
    error: str | None = None  # the error that ended the run early (the cases before it are kept)

    def to_dict(self) -> dict[str, Any]:
        return {"kiln_bench_format": 1, **dataclasses.asdict(self)}

    def write_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def case_line(c: CaseResult) -> str:
    """One case in one line (printed as soon as kiln's part is measured)."""
    experts = "" if c.expected_active_experts is None else f", {c.expected_active_experts:.1f} experts/layer"
    return (f"batch {c.batch_size:4d}: prefill {c.prefill_ms:9.2f} ms | decode {c.decode_ms_per_step:8.3f} ms/step, "
            f"{c.tokens_per_s:9.1f} tok/s | floor {c.floor_ms_per_step:7.3f} ms (weights "
            f"{c.active_weight_bytes / GB:.2f} GB + KV {c.kv_bytes_per_step / GB:.3f} GB{experts}), "
            f"{100 * c.fraction_of_floor:5.1f}% of floor{_prefill_text(c)}")


def _prefill_text(c: CaseResult) -> str:
    if c.prefill_tflops is None or c.prefill_fraction_of_matmul is None:
        return ""
    return f" | prefill {c.prefill_tflops:.1f} TFLOP/s = {100 * c.prefill_fraction_of_matmul:.1f}% of matmul"


def table(report: BenchReport) -> str:
    """The cases as a Markdown table (the form docs/performance.md records)."""
    head = ("| batch | prefill ms | prefill of matmul | decode ms/step | tok/s | floor ms/step | of floor "
            "| transformers ms/step | transformers tok/s | kiln / transformers |")
    rows = [head, "|" + "---|" * 10]
    for c in report.cases:
        matmul = "-" if c.prefill_fraction_of_matmul is None else f"{100 * c.prefill_fraction_of_matmul:.0f}%"
        rows.append(f"| {c.batch_size} | {c.prefill_ms:.2f} | {matmul} | {c.decode_ms_per_step:.3f} | "
                    f"{c.tokens_per_s:.1f} | "
                    f"{c.floor_ms_per_step:.3f} | {100 * c.fraction_of_floor:.0f}% | {_fmt(c.hf_ms_per_step, '.2f')} | "
                    f"{_fmt(c.hf_tokens_per_s, '.1f')} | {_fmt(c.kiln_over_hf, '.2f')}"
                    f"{'' if c.kiln_over_hf is None else 'x'} |")
    return "\n".join(rows)
