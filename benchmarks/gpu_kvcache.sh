#!/usr/bin/env bash
# INT8 / FP8 KV cache on a GPU: the gpu-marked and kernel tests of the quantized cache (compiled), then `kiln bench`
# of dummy engines with a bf16, an INT8 and an FP8 KV cache at the same shapes, one after another in this run:
# batch 8, 4096 prompt tokens + 64 generated (the long-context decode the 8-bit cache is for). Results go to $OUT (or
# ./out): gpu_tests.log, bench.log (the printed tables), bench_<case>_<kv>.json, and kv_summary.txt (decode tokens/s
# of each 8-bit cache over bf16's, per shape, beside the ratio of the weight + KV bytes each step must read: the most
# the smaller cache can buy).
#   TESTS=      skip the tests          LAYERS=8   layers of each slice (full width; KV and weights scale together)
#   SHAPES="baichuan2-13b mpt-7b"               the presets to bench (unset: both)
#   BATCH=8  INPUT=4096  OUTPUT=64              the case
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-./out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/versions.txt"
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)" | tee -a "$out/versions.txt"
if [ -n "${TESTS-1}" ]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kv_cache_quant_gpu.py \
        tests/test_kv_cache_quant_kernels.py tests/test_kv_cache_quant_triton.py -rs 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
for shape in ${SHAPES-baichuan2-13b mpt-7b}; do
    for kv in bf16 int8 fp8; do
        flag=(); [ "$kv" != bf16 ] && flag=(--kv_cache_dtype "$kv")
        echo "== kiln bench $shape, $kv KV cache" | tee -a "$out/bench.log"
        timeout 240 python3 -m kiln bench --preset "$shape" --num_layers "${LAYERS:-8}" --dtype bfloat16 \
            --batch_size "${BATCH:-8}" --input_len "${INPUT:-4096}" --output_len "${OUTPUT:-64}" --no_tune \
            "${flag[@]}" --output_json "$out/bench_${shape}_${kv}.json" 2>&1 | tee -a "$out/bench.log" | tail -4
    done
done
python3 - "$out" <<'EOF' | tee "$out/kv_summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for base in sorted(out.glob("bench_*_bf16.json")):
    shape = base.name[len("bench_"):-len("_bf16.json")]
    ref = json.loads(base.read_text())["cases"][0]
    line = f"{shape}: bf16 KV {ref['tokens_per_s']:.1f} tok/s ({ref['decode_ms_per_step']:.2f} ms/step)"
    for kv in ("int8", "fp8"):
        path = out / f"bench_{shape}_{kv}.json"
        if path.exists():
            case = json.loads(path.read_text())["cases"][0]
            line += (f"; {kv} {case['tokens_per_s']:.1f} tok/s = {case['tokens_per_s'] / ref['tokens_per_s']:.2f}x "
                     f"(the bandwidth floors' ratio: {ref['floor_ms_per_step'] / case['floor_ms_per_step']:.2f}x)")
    print(line)
EOF
true
