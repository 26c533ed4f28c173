#!/usr/bin/env bash
# The trained reference models on the GPU: convert + build each (bf16), then `kiln summarize` of the whole shipped
# ACLSum set (112 articles) with kiln and, for DBRX and MPT, transformers in the same process run; the printed tables
# go to $OUT/summarize.log and every number to $OUT/summarize_<model>.json. Baichuan has no transformers class
# (its published modelling code is remote code, which kiln never runs), so it is kiln only.
#   BATCH=8  summarize batch size        MODELS="mpt-books dbrx-books baichuan2-books"
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-./out}; mkdir -p "$out"
work=$(mktemp -d /tmp/kiln-eval-XXXX)
batch=${BATCH:-8}
ite=$(( (112 + batch - 1) / batch ))
for model in ${MODELS:-mpt-books dbrx-books baichuan2-books}; do
  python3 -m kiln convert --model_dir "models/$model" --output_dir "$work/$model-ckpt" --dtype bfloat16 >/dev/null &&
  python3 -m kiln build --checkpoint_dir "$work/$model-ckpt" --output_dir "$work/$model-engine" \
      --max_batch_size "$batch" --max_input_len 1024 --max_seq_len 1124 --no_tune >/dev/null || { echo "build $model failed"; continue; }
  hf=(--test_hf); [ "$model" = baichuan2-books ] && hf=()
  echo "== kiln summarize $model (batch $batch, $ite batches)" | tee -a "$out/summarize.log"
  timeout 240 python3 -m kiln summarize --engine_dir "$work/$model-engine" --hf_model_dir "models/$model" --test_kiln \
      "${hf[@]}" --batch_size "$batch" --max_ite "$ite" --output_json "$out/summarize_$model.json" 2>&1 \
      | grep -v "summarize:.*it/s\|batch/s" | tee -a "$out/summarize.log"
done
rm -rf "$work"
