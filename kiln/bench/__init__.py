"""`kiln bench`: prefill and decode timing of an engine beside its physical floor and transformers.

    options = BenchOptions(preset="mpt-7b", batch_sizes=[1, 32], input_len=128, output_len=64, compare_hf=True)
    report = run_bench(options)          # prints the cases; report.to_dict() is what --output_json writes

Modules: options (what to run), dummy (an engine of dummy weights in a temporary directory), timing (kiln through
LLMEngine.step), physics (copy bandwidth, active weight and KV bytes, the floor), hf (transformers on the same
weights), report (results, table, JSON), runner (the whole run)."""

from __future__ import annotations

from kiln.bench.options import BenchOptions
from kiln.bench.report import BenchReport, CaseResult
from kiln.bench.runner import run_bench

__all__ = ["BenchOptions", "BenchReport", "CaseResult", "run_bench"]
