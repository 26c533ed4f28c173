#!/usr/bin/env bash
# Multi-rank engines on the 2-GPU machine (device kind nvidia-h200-x2), in one call of at most 9 minutes:
#   versions and GPU links; the gpu tests of tests/test_parallel_gpu.py (NCCL tp 2 / ep 2 equal one GPU, CUDA graphs
#   equal eager); kiln bench one GPU against two (bf16 dummy weights drawn on the GPU, prompt 128, 64 new tokens,
#   batch 1 and 32) for an MPT-7B-shaped engine at tp 2 and a DBRX slice at full width (4 layers) at ep 2
#   (--moe_tp_mode 1), tp 2 (--moe_tp_mode 2) and pp 2 (with and without pipeline micro-batches); and issue 7's
#   commands on that slice (convert --tp_size 2, build, run, bench --engine_dir).
# Results under $OUT (or ./out): parallel.log (everything printed), summary.md (one table of every bench case) and
# results.tar.gz (each step's log, every --output_json file, run's output ids), refreshed after each step.
#
# Time on paper (H200 x2, cold Triton cache; dummy conversion on the GPU, engines in the page cache): versions 5 s;
# tests ~150 s; DBRX slice (28.5 GB bf16) per bench of a preset ~70 s (convert 25, load + capture 25, cases 10);
# MPT-7B (13.3 GB) ~50 s each; issue 7's tp 2 chain ~90 s; pp 2 chain ~110 s. About 8 minutes. A budget guard
# (BUDGET seconds, default 530) cuts each step's limit to what is left and skips what no longer fits, saying
# "SKIPPED"; run those with STEPS="name ..." in a second call. Kernel tiles are not tuned (--no_tune, the same
# for one GPU and two; TUNE=1 tunes, about a minute more per DBRX build).
#   STEPS="env tests dbrx_1gpu dbrx_ep2 mpt7b_1gpu mpt7b_tp2 issue7_tp2 dbrx_pp2"   (the default: all, in order)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
# NVLink multicast stays off (it can take the host's shared GPUs out of service): set here too, for every rank.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-./out}; mkdir -p "$out"
res=$(mktemp -d /tmp/kiln-parallel-XXXX)   # step logs and JSON, packed into $out/results.tar.gz
work=$(mktemp -d /tmp/kiln-engines-XXXX)   # checkpoints and engines of the issue 7 / pp 2 chains
trap 'rm -rf "$work"' EXIT
exec > >(tee -a "$out/parallel.log") 2>&1
START=$SECONDS BUDGET=${BUDGET:-530}
STEPS=${STEPS:-"env tests dbrx_1gpu dbrx_ep2 mpt7b_1gpu mpt7b_tp2 issue7_tp2 dbrx_pp2"}
TUNE_FLAG=$([ -n "${TUNE:-}" ] && echo "" || echo "--no_tune")
# A CPU smoke test of this script: LAYERS=2 DBRX_PRESET=dbrx-tiny MPT_PRESET=mpt-tiny DUMMY_DEVICE=cpu DTYPE=float32
CASE="--dtype ${DTYPE:-bfloat16} --batch_size 1 32 --input_len 128 --output_len 64"
DBRX="--preset ${DBRX_PRESET:-dbrx} --num_layers ${LAYERS:-4}"
MPT="--preset ${MPT_PRESET:-mpt-7b}"

left() { echo $(( BUDGET - (SECONDS - START) )); }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

summary() {  # every bench JSON as one Markdown table
    python3 - "$res" > "$out/summary.md" <<'EOF'
import json, pathlib, sys
rows = ["| run | ranks (tp x pp, ep) | batch | prefill ms | decode ms/step | tok/s | floor ms/step | of floor |",
        "|---|---|---|---|---|---|---|---|"]
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    m = r["engine"].get("mapping", {"tp_size": 1, "pp_size": 1, "moe_ep_size": 1})
    for c in r["cases"]:
        rows.append(f"| {path.stem} | {m['tp_size']} x {m['pp_size']}, ep {m['moe_ep_size']} | {c['batch_size']} | "
                    f"{c['prefill_ms']:.1f} | {c['decode_ms_per_step']:.3f} | {c['tokens_per_s']:.1f} | "
                    f"{c['floor_ms_per_step']:.3f} | {100 * c['fraction_of_floor']:.0f}% |")
print("\n".join(rows))
EOF
}

pack() { summary; tar -czf "$out/results.tar.gz" -C "$res" . ; }

run() {  # name, limit seconds, command...: the step's output to its log and here; skipped when the budget is spent
    local name=$1 limit=$2 rem t0 rc; shift 2
    rem=$(left)
    if (( rem < 30 )); then echo "== SKIPPED $name ($rem s of the budget left): $*"; return 0; fi
    (( limit > rem )) && limit=$rem
    echo "== $name (limit $limit s): $*"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$res/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s ($(left) s of the budget left)"
    (( rc != 0 )) && sleep 2  # let a killed driver's ranks notice and free their GPUs
    pack
    return "$rc"
}

bench() {  # name, limit, kiln bench arguments...
    local name=$1 limit=$2; shift 2
    run "$name" "$limit" python3 -m kiln bench "$@" --output_json "$res/$name.json"
}

if wanted env; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$res/versions.txt"
    nvidia-smi topo -m | tee -a "$res/versions.txt"
    python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'nccl',
torch.cuda.nccl.version(),'triton',triton.__version__,'transformers',transformers.__version__,'gpus',
torch.cuda.device_count())" | tee -a "$res/versions.txt"
fi
wanted tests && run tests 210 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_parallel_gpu.py
wanted dbrx_1gpu && bench dbrx_1gpu 150 $DBRX $CASE $TUNE_FLAG
wanted dbrx_ep2 && bench dbrx_ep2 150 $DBRX $CASE $TUNE_FLAG --tp_size 2 --moe_tp_mode 1
wanted mpt7b_1gpu && bench mpt7b_1gpu 120 $MPT $CASE
wanted mpt7b_tp2 && bench mpt7b_tp2 120 $MPT $CASE --tp_size 2

# Issue 7's commands on the 4-layer slice, tp 2 with the experts split (--moe_tp_mode 2, TensorRT-LLM's default).
chain() {  # name, extra convert flags...: convert + build into $work/name
    local name=$1; shift
    run "${name}_convert" 90 python3 -m kiln convert $DBRX --dtype "${DTYPE:-bfloat16}" --dummy_device "${DUMMY_DEVICE:-cuda}" "$@" \
        --output_dir "$work/$name/ckpt" &&
    run "${name}_build" 60 python3 -m kiln build --checkpoint_dir "$work/$name/ckpt" --output_dir "$work/$name/engine" \
        --max_batch_size 32 --max_input_len 128 --max_seq_len 192 --max_num_tokens 4096 $TUNE_FLAG
}
if wanted issue7_tp2 && chain issue7_tp2 --tp_size 2 --moe_tp_mode 2; then
    python3 -c "import random; r = random.Random(7); print('\n'.join(','.join(str(r.randrange(1, 100000))
for _ in range(n)) for n in (5, 17, 128)))" > "$res/issue7_ids.csv"
    run issue7_tp2_run 60 python3 -m kiln run --engine_dir "$work/issue7_tp2/engine" --input_file "$res/issue7_ids.csv" \
        --max_output_len 16 --ignore_eos --output_csv "$res/issue7_tp2_run_ids.csv"
    bench issue7_tp2 100 --engine_dir "$work/issue7_tp2/engine" --batch_size 1 32 --input_len 128 --output_len 64
    rm -rf "$work/issue7_tp2"
fi

# Pipeline parallel: by default a step of >= KILN_PP_MICROBATCH_MIN_TOKENS tokens (256) is split into pp
# micro-batches; the same engine with micro-batches always (decode too) and never, at batch 32, measures them.
if wanted dbrx_pp2 && chain dbrx_pp2 --pp_size 2; then
    engine="$work/dbrx_pp2/engine"
    bench dbrx_pp2 100 --engine_dir "$engine" --batch_size 1 32 --input_len 128 --output_len 64
    for mode in always:0 never:1000000000; do  # the same engine, batch 32: micro-batches in every step / in none
        run "dbrx_pp2_micro_${mode%%:*}" 70 env KILN_PP_MICROBATCH_MIN_TOKENS="${mode#*:}" python3 -m kiln bench \
            --engine_dir "$engine" --batch_size 32 --input_len 128 --output_len 64 \
            --output_json "$res/dbrx_pp2_micro_${mode%%:*}.json"
    done
fi
pack
echo "== done in $((SECONDS - START)) s; summary:"
cat "$out/summary.md"
