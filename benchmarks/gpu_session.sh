#!/usr/bin/env bash
# One packed GPU session: versions, the gpu-marked tests, then the benchmarks. Results go to $OUT (or ./out).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-./out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/versions.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" | tee -a "$out/versions.txt"
[ -n "${TESTS-1}" ] && timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_gpu_models.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
tmp=$(mktemp -d)
python3 -m kiln convert --preset dbrx --num_layers 2 --dtype bfloat16 --dummy_device cuda --output_dir "$tmp/ckpt" 2>&1 | tail -1
python3 -m kiln build --checkpoint_dir "$tmp/ckpt" --output_dir "$tmp/engine" --max_batch_size 32 --max_input_len 256 --max_seq_len 512 | tee "$out/build.txt"
timeout 150 python3 benchmarks/bench_decode.py --engine_dir "$tmp/engine" --batch_size 1 32 --input_len 128 --output_len 64 --compare_hf 2>&1 | tee "$out/bench_decode.log"
rm -rf "$tmp"; mkdir -p "$tmp"
python3 -m kiln convert --preset mpt-7b --dtype bfloat16 --dummy_device cuda --output_dir "$tmp/ckpt" 2>&1 | tail -1
python3 -m kiln build --checkpoint_dir "$tmp/ckpt" --output_dir "$tmp/engine" --max_batch_size 32 --max_input_len 256 --max_seq_len 512 | tee -a "$out/build.txt"
timeout 200 python3 benchmarks/bench_decode.py --engine_dir "$tmp/engine" --batch_size 1 32 --input_len 128 --output_len 64 --compare_hf 2>&1 | tee -a "$out/bench_decode.log"
[ -n "${KERNELS:-}" ] && timeout 120 python3 benchmarks/bench_kernels.py 2>&1 | tee "$out/bench_kernels.log"
