"""`kiln bench`: time an engine's prefill and decode step by step, set them against the decode floor measured in the
same process, and (with compare_hf) against transformers' generate on the same weights and shapes."""

from __future__ import annotations

import gc
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kiln.bench import multirank
from kiln.bench.hf import HFUnavailable, load_hf_model, time_hf_case
from kiln.bench.options import BenchOptions
from kiln.bench.physics import WeightBytes, copy_bandwidth_gbs, decode_floor, matmul_tflops, weight_bytes
from kiln.bench.report import GB, BenchReport, CaseResult, case_line, table
from kiln.bench.timing import KilnTiming, check_case_fits, time_kiln_case
from kiln.checkpoint.kiln_format import ArtifactInfo, load_artifact
from kiln.kernels import apply_engine_kernel_choices
from kiln.memory import MemoryPlan

Log = Callable[[str], None]


def run_bench(options: BenchOptions, log: Log = print) -> BenchReport | list[BenchReport]:
    """Run every case of `options` (on a dummy engine built for them, or on the given engine) and return the report;
    also printed through `log` and written to options.output_json. With several --weight_only_precision values, one
    report per precision (kiln.bench.precisions)."""
    options.validate()
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(options.weight_only_precision) > 1:
        from kiln.bench.precisions import run_precisions

        return run_precisions(options, device, log)
    if options.dummy:
        from kiln.bench.dummy import dummy_engine
        from kiln.bench.precisions import precision_quant

        precision = options.weight_only_precision[0] if options.weight_only_precision else "none"
        quant = precision_quant(precision, options.group_size, options.quantize_lm_head)
        with dummy_engine(options, log, quant) as engine_dir:
            return bench_engine(engine_dir, options, device, log)
    return bench_engine(Path(str(options.engine_dir)), options, device, log)


def _versions() -> dict[str, str]:
    import transformers

    import kiln

    versions = {"kiln": getattr(kiln, "__version__", "?"), "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    return versions


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({torch.get_num_threads()} threads)"


def _notes(info: ArtifactInfo, weights: WeightBytes, options: BenchOptions, device: torch.device) -> list[str]:
    size = "1 GiB" if device.type == "cuda" else "128 MiB"
    notes = [f"bandwidth: a {size} copy on {device.type} timed in this process, (bytes read + written) / s",
             f"floor per decode step = (active weight bytes + KV bytes read) / copy bandwidth; the input embedding "
             f"({weights.embedding / GB:.2f} GB) is not counted: decode gathers only B rows of it",
             f"KV bytes at the mean context of the decode steps (input_len + output_len / 2 = "
             f"{options.input_len + options.output_len / 2:g} tokens per sequence)"]
    notes.append("prefill of matmul = 2 x active params x prompt tokens (the head once per sequence, experts at "
                 "top_k / E) / prefill time, over the rate of an 8192^3 GEMM in the model dtype timed in this process "
                 "(512^3 in float32 on the CPU); attention's score and value products are not counted")
    if weights.num_experts:
        notes.append(f"MoE: expected distinct experts per layer at batch B = E * (1 - (1 - k/E)^B), E = "
                     f"{weights.num_experts}, k = {weights.top_k} (uniform routing); the floor counts that share of "
                     f"the {weights.experts / GB:.2f} GB of experts")
    return notes


def _engine_text(info: ArtifactInfo, options: BenchOptions, kernels: str, weights: WeightBytes) -> dict[str, Any]:
    m = info.model
    source = str(info.path) if not options.dummy else f"dummy weights of {options.preset or options.config}"
    return {"source": source, "architecture": m.architecture, "dtype": m.dtype, "num_layers": m.num_hidden_layers,
            "world_size": info.mapping.world_size, "weight_bytes": weights.total, "expert_bytes": weights.experts,
            "embedding_bytes": weights.embedding, "kv_bytes_per_token": info.raw["memory_plan"]["kv_bytes_per_token"],
            "kv_cache_quant_algo": info.quant.kv_cache_quant_algo,
            "weights_in_memory": info.weights_in_memory is not None,
            "build": info.raw.get("build"), "kernels": kernels, "kernel_backend": options.kernel_backend}


def _case(batch: int, options: BenchOptions, timing: KilnTiming, weights: WeightBytes, kv_per_token: int,
          report: BenchReport) -> CaseResult:
    floor = decode_floor(weights, kv_per_token, batch, options.input_len, options.output_len, report.bandwidth_gbs)
    case = CaseResult(
        batch, options.input_len, options.output_len, timing.prefill_ms, timing.prefill_steps, timing.decode_ms,
        timing.decode_steps, batch * 1000.0 / timing.decode_ms, weights.total, floor.active_weight_bytes,
        floor.expected_experts, floor.kv_bytes, floor.ms, floor.ms / timing.decode_ms)
    if report.engine["world_size"] > 1:
        return case  # the prefill rate is a one-GPU measure: per-GPU FLOPs of a sharded step are not tracked
    case.prefill_tflops = weights.prefill_flops(batch, options.input_len) / (timing.prefill_ms * 1e-3) / 1e12
    if report.matmul_tflops:
        case.prefill_fraction_of_matmul = case.prefill_tflops / report.matmul_tflops
    return case


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_kiln(engine_dir: Path, options: BenchOptions, device: torch.device, report: BenchReport,
               weights: WeightBytes, log: Log) -> None:
    """Every case through kiln; kiln's model and cache are freed before returning (room for transformers)."""
    import kiln

    start = time.perf_counter()
    llm = kiln.LLM(engine_dir, device=str(device), kv_cache_free_gpu_memory_fraction=options.kv_fraction,
                   enable_prefix_caching=False, kernel_backend=options.kernel_backend,
                   async_scheduling=options.async_scheduling)
    # Loading: reading the rank files, or drawing the dummy weights in memory; KV cache; graph capture.
    report.engine["load_s"] = round(time.perf_counter() - start, 3)
    drawn = " (weights drawn in memory)" if report.engine.get("weights_in_memory") else ""
    log(f"engine loaded in {report.engine['load_s']:.1f} s{drawn}")
    try:
        kernels = getattr(llm.runner, "kernels", None)
        report.engine["kernel_set"] = getattr(kernels, "name", None)
        # Layers bound to a Triton matmul: the build-chosen GEMV rather than cuBLAS (0 where nothing was tuned), and
        # every weight-only quantized layer on CUDA (the weight-only kernels).
        report.engine["gemv_layers"] = getattr(llm.runner, "gemv_layers", 0)
        report.engine["cuda_graphs"] = getattr(llm.runner, "graphs", None) is not None
        report.engine["async_scheduling"] = llm.engine.async_scheduling
        kv_per_token = report.engine["kv_bytes_per_token"]
        for batch in options.batch_sizes:  # every case before the first runs: no minutes lost to a later refusal
            check_case_fits(llm, batch, options.input_len, options.output_len)
        for batch in options.batch_sizes:
            timing = time_kiln_case(llm, batch, options.input_len, options.output_len, options.warmup, device,
                                    options.seed * 1000 + batch)
            case = _case(batch, options, timing, weights, kv_per_token, report)
            report.cases.append(case)
            log(case_line(case))
    finally:
        llm.close()
        del llm
        _free(device)
    if device.type == "cuda":  # what kiln still holds after letting go (should be ~0: room for transformers)
        report.engine["gpu_gib_after_kiln"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)


def _compare_hf(info: ArtifactInfo, options: BenchOptions, device: torch.device, report: BenchReport,
                log: Log) -> None:
    """transformers' generate for every case, after kiln has let go of its memory."""
    try:
        hf = load_hf_model(info, device)
    except HFUnavailable as err:
        report.hf = {"available": False, "note": str(err)}
        log(f"transformers: {err}")
        return
    report.hf = {"available": True, "class": type(hf.model).__name__, "same_weights": hf.same_weights,
                 "note": hf.note}
    log(f"transformers {type(hf.model).__name__} with {hf.note}")
    try:
        for case in report.cases:
            timing = time_hf_case(hf.model, case.batch_size, options.input_len, options.output_len, device,
                                  options.seed * 1000 + case.batch_size, options.warmup)
            case.add_hf(timing.prefill_ms, timing.decode_ms)
            log(f"batch {case.batch_size:4d}: transformers {case.hf_ms_per_step:.3f} ms/step, "
                f"{case.hf_tokens_per_s:.1f} tok/s; kiln {case.kiln_over_hf:.2f}x")
    finally:
        del hf
        _free(device)


def bench_engine(engine_dir: Path, options: BenchOptions, device: torch.device, log: Log = print) -> BenchReport:
    """The benchmark of one engine directory (see run_bench)."""
    info = load_artifact(engine_dir, "engine")
    kernels = apply_engine_kernel_choices(info.raw, device) if options.kernel_backend != "torch" else \
        "kernels: torch reference (no tiles)"
    weights = weight_bytes(info, MemoryPlan(**info.raw["memory_plan"]))
    if info.mapping.world_size > 1:  # per-GPU floor: kiln.bench.multirank
        multirank.check_engine(info, options)
        weights = multirank.staged_weight_bytes(info)
    bandwidth = copy_bandwidth_gbs(device)  # before the engine takes its memory
    rate = matmul_tflops(device, info.model.torch_dtype)
    report = BenchReport(_device_text(device), _versions(), bandwidth, _engine_text(info, options, kernels, weights),
                         rate, {k: v for k, v in vars(options).items()}, _notes(info, weights, options, device))
    if isinstance(weights, multirank.StagedWeightBytes):
        multirank.annotate(report, info, weights)
    v = report.versions
    log(f"kiln bench on {report.device}: torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}; "
        f"copy bandwidth {bandwidth:.1f} GB/s; {info.model.dtype if device.type == 'cuda' else 'float32'} matmul "
        f"{rate:.1f} TFLOP/s")
    log(f"{info.model.architecture} {info.model.dtype}, {info.model.num_hidden_layers} layers, weights "
        f"{weights.total / GB:.3f} GB; {kernels}")
    for note in report.notes:
        log(f"note: {note}")
    try:
        _time_kiln(engine_dir, options, device, report, weights, log)
        if options.compare_hf:
            _compare_hf(info, options, device, report, log)
    except BaseException as err:  # what was measured before a case failed is still written, then the error goes on
        if report.cases:
            report.error = f"{type(err).__name__}: {err}"
            _write(report, options, log)
        raise
    _write(report, options, log)
    return report


def _write(report: BenchReport, options: BenchOptions, log: Log) -> None:
    """The table and, with output_json, the JSON file of every case measured (all of them, or those before an
    error, which the report then names)."""
    log(table(report))
    if report.error:
        log(f"measured {len(report.cases)} of {len(options.batch_sizes)} cases before: {report.error}")
    if options.output_json:
        report.write_json(options.output_json)
        log(f"wrote {options.output_json}")
