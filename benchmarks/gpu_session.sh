#!/usr/bin/env bash
# One packed GPU session: versions, the gpu-marked tests, then `kiln bench` at the issue's shapes (dummy weights,
# converted and built with kernel tuning into a temporary directory that kiln removes). Results go to $OUT (or ./out):
# the printed tables in bench.log and every number in bench_*.json.
#   TESTS=      skip the gpu tests          KERNELS=1   add benchmarks/bench_kernels.py   GEMV=1  its GEMV part
#   LAYERS=4    DBRX slice depth            LONG=1      add the 4096-token-context decode case (Baichuan2-13B shape)
#   CASES="dbrx mpt7b baichuan2_13b prefill_2048"      the bench cases to run (unset: all of them; CASES= none;
#                                                      long_context runs with LONG=1, mpt7b_sync with SYNC=1: the
#                                                      MPT-7B case without async scheduling), to split a session
#   ATTN_SWEEP=1  add the decode attention tile sweep (bench_kernels.py --only attn --attn_sweep, ~2 min)
#   PROFILE=1   add benchmarks/profile_decode.py (kernel table of decode steps, MPT-7B shape)
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-./out}; mkdir -p "$out"
cases=" ${CASES-dbrx mpt7b baichuan2_13b prefill_2048} "
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/versions.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" | tee -a "$out/versions.txt"
[ -n "${TESTS-1}" ] && timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_gemv_gpu.py tests/test_async_scheduling_gpu.py tests/test_gpu_models.py tests/test_build_tuning.py tests/test_cuda_graphs_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
bench() {  # name, timeout seconds, kiln bench arguments...
    local name=$1 limit=$2; shift 2
    [[ "$cases" == *" $name "* ]] || return 0
    echo "== kiln bench $*" | tee -a "$out/bench.log"
    timeout "$limit" python3 -m kiln bench "$@" --output_json "$out/bench_$name.json" 2>&1 | tee -a "$out/bench.log"
}
[ -n "${LONG:-}" ] && cases="$cases long_context "
[ -n "${SYNC:-}" ] && cases="$cases mpt7b_sync "
bench dbrx 420 --preset dbrx --num_layers "${LAYERS:-4}" --dtype bfloat16 --batch_size 1 32 --input_len 128 --output_len 64 --compare_hf
bench mpt7b 300 --preset mpt-7b --dtype bfloat16 --batch_size 1 32 --input_len 128 --output_len 64 --compare_hf
bench mpt7b_sync 300 --preset mpt-7b --dtype bfloat16 --batch_size 1 32 --input_len 128 --output_len 64 --no_async_scheduling
bench baichuan2_13b 240 --preset baichuan2-13b --dtype bfloat16 --batch_size 1 8 --input_len 128 --output_len 64
# The prefill target: 2048 prompt tokens of the MPT-7B shape against the bf16 matmul rate measured in the same run.
bench prefill_2048 200 --preset mpt-7b --dtype bfloat16 --batch_size 1 --input_len 2048 --output_len 16
bench long_context 300 --preset baichuan2-13b --dtype bfloat16 --batch_size 1 8 --input_len 4096 --output_len 64
[ -n "${PROFILE:-}" ] && timeout 150 python3 benchmarks/profile_decode.py --preset mpt-7b --batch_size 1 32 2>&1 | grep -v "^USDT" | tee "$out/profile_mpt7b.log"
[ -n "${KERNELS:-}" ] && timeout 120 python3 benchmarks/bench_kernels.py 2>&1 | tee "$out/bench_kernels.log"
# The decode GEMV against cuBLAS per shape and row count (what the build would choose): GEMV=1.
[ -n "${GEMV:-}" ] && timeout 150 python3 benchmarks/bench_kernels.py --only gemv 2>&1 | tee "$out/bench_gemv.log"
[ -n "${ATTN_SWEEP:-}" ] && timeout 200 python3 benchmarks/bench_kernels.py --only attn --attn_sweep 2>&1 | tee "$out/attn_sweep.log"
true
