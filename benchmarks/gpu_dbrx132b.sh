#!/usr/bin/env bash
# Full-size DBRX-132B (40 layers, dummy weights drawn in memory on the GPU: nothing is written to disk) on ONE GPU,
# weight-only quantized, decode at batch 1, 8 and 32 (issue 14). One precision per device call (10 minutes each):
#   PRECISION=int4_awq bash benchmarks/device_call.sh bash benchmarks/gpu_dbrx132b.sh   # 66.8 GiB: H200 or H100
#   PRECISION=int4 ...                                                                   # 63.0 GiB
#   PRECISION=int8 ...                                                                   # 123.8 GiB: H200 only
# DRAW=1 first times the draw alone (benchmarks/draw_dummy_slice.py, all 40 layers, peak memory).
set -uo pipefail
OUT=${OUT:-./out}; mkdir -p "$OUT"
P=${PRECISION:-int4_awq}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu_$P.txt"
if [ "${DRAW:-0}" = 1 ]; then
    python3 benchmarks/draw_dummy_slice.py "$P" 40 cuda 2>&1 | tee "$OUT/draw_$P.log"
fi
python3 -m kiln bench --preset dbrx --dtype bfloat16 --weight_only_precision "$P" --group_size 128 \
    --batch_size 1 8 32 --input_len 128 --output_len 64 --no_tune --output_json "$OUT/dbrx132b_$P.json" \
    2>&1 | tee "$OUT/dbrx132b_$P.log"
