#!/usr/bin/env bash
# The gpu-marked tests file by file, each under its own time limit, so that one slow or hanging file cannot take a
# device call's whole budget and every file that ran says so: $OUT/gpu_tests_summary.txt (one line per file: its
# pytest summary, or "timed out"), $OUT/gpu_tests.log (everything, short tracebacks).
#   FILES="tests/a.py tests/b.py"   the files, in order (default: those no GPU has run yet first, then the rest)
#   PER_FILE_S=150                   each file's limit
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-./out}; mkdir -p "$out"
# Not yet run to the end on a GPU as of session 10 first (docs/performance.md), then the files that passed before.
default="test_quant_fp8_gpu test_moe_group_wise_gpu test_quant_smoothquant_gpu test_moe_w8a8_gpu test_quant_lm_head_gpu
test_gpu_timing test_pinned_gpu test_weights_in_memory_gpu test_published_dbrx_converted_gpu test_quant_group_wise_gpu
test_published_group_wise_gpu
test_kv_cache_quant_gpu test_vllm_api test_build_tuning test_weight_only_gpu test_async_scheduling_gpu
test_serve_gpu test_cuda_graphs_gpu test_gemv_gpu test_gpu_models test_kernels_gpu
test_act_order_triton test_parallel_gpu"
files=${FILES:-$(for f in $default; do echo "tests/$f.py"; done)}
for f in $files; do
    start=$SECONDS
    # -v: one line per test as it ends, so that a file stopped by its limit still says what passed and failed
    KILN_REPORT_FAILURES_AT_ONCE=1 timeout -k 5 "${PER_FILE_S:-150}" python3 -m pytest -v -m gpu -p no:cacheprovider --tb=short "$f" > "$out/.one.log" 2>&1
    rc=$?
    cat "$out/.one.log" >> "$out/gpu_tests.log"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        line="timed out after ${PER_FILE_S:-150} s: $(grep -c " PASSED" "$out/.one.log") passed, $(grep -c " FAILED" "$out/.one.log") failed so far"
        grep " FAILED" "$out/.one.log" | sed 's/ FAILED.*//; s/^/FAILED (so far) /' >> "$out/gpu_tests_summary.txt"
    else line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|deselected|skipped)" "$out/.one.log" | tail -1); fi
    printf '%-45s %4d s  %s\n' "$f" $((SECONDS - start)) "$line" | tee -a "$out/gpu_tests_summary.txt"
    grep -E "^(FAILED|ERROR) " "$out/.one.log" | tee -a "$out/gpu_tests_summary.txt"
done
rm -f "$out/.one.log"
