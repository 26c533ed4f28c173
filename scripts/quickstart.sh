#!/usr/bin/env bash
# Set up kiln in ./.venv and run its main job on the trained reference models that ship in models/:
# convert -> build -> run a prompt from a book kiln never trained on, a chat turn, and a short `kiln summarize`
# beside transformers. float32 on a CPU, bfloat16 where a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
work=${KILN_DEMO_DIR:-./kiln-demo}
mkdir -p "$work"
dtype=$(python -c "import torch; print('bfloat16' if torch.cuda.is_available() else 'float32')")

for model in mpt-books dbrx-books; do
  # Engines carry their tokenizer (convert and build copy it); one made before they did is made again.
  if [ ! -f "$work/$model-engine/tokenizer_config.json" ]; then
    kiln convert --model_dir "models/$model" --output_dir "$work/$model-ckpt" --dtype "$dtype"
    kiln build --checkpoint_dir "$work/$model-ckpt" --output_dir "$work/$model-engine" \
      --max_batch_size 8 --max_input_len 1024 --max_seq_len 2048
  fi
done

echo "== kiln run (MPT, greedy)"
kiln run --engine_dir "$work/mpt-books-engine" --max_output_len 48 \
  --input_text "It was a fine morning in June, and Elizabeth" "Call me Ishmael. Some years ago,"
echo "== kiln run --chat (DBRX, its ChatML format)"
kiln run --engine_dir "$work/dbrx-books-engine" --chat --max_output_len 32 \
  --input_text "Tell me about the sea."
echo "== kiln summarize (MPT, kiln beside transformers, 4 articles of the shipped ACLSum set)"
kiln summarize --engine_dir "$work/mpt-books-engine" --hf_model_dir models/mpt-books --test_kiln --test_hf \
  --batch_size 2 --max_ite 2 --output_len 48
