#!/usr/bin/env bash
# DBRX's experts in W8A8 (issue 15) on one GPU: the gpu tests of the Triton W8A8 fused MoE (SmoothQuant INT8, FP8),
# the kernels beside the bf16 fused MoE at DBRX's full expert width (benchmarks/bench_kernels.py --only moe_w8a8),
# then `kiln bench` of a 4-layer DBRX slice of dummy weights in bf16, int8_sq (SmoothQuant per token x per channel),
# fp8 (static) and fp8_pc_pt, timed in one process. Results in $OUT (or ./out): tests.log, kernels.log, bench.log,
# moe_w8a8_dbrx.json. Each step is bounded by a timeout (about 9 minutes in all on one H100).
#   TESTS=  skip the gpu tests     KERNELS=  skip the kernel timings     BENCH=  skip kiln bench
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-./out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/versions.txt"
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)" | tee -a "$out/versions.txt"
[ -n "${TESTS-1}" ] && timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_moe_w8a8_gpu.py \
    tests/test_moe_w8a8_triton.py 2>&1 | tee "$out/tests.log" | tail -25
[ -n "${KERNELS-1}" ] && timeout 150 python3 benchmarks/bench_kernels.py --only moe_w8a8 2>&1 | tee "$out/kernels.log"
[ -n "${BENCH-1}" ] && timeout 240 python3 -m kiln bench --preset dbrx --num_layers "${LAYERS:-4}" --dtype bfloat16 \
    --batch_size 1 32 --input_len 128 --output_len 64 --no_tune --weight_only_precision none int8_sq fp8 fp8_pc_pt \
    --output_json "$out/moe_w8a8_dbrx.json" 2>&1 | tee "$out/bench.log"
exit 0
