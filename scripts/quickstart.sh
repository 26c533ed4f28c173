#!/usr/bin/env bash
# Set up kiln in ./.venv and run its main job on the built-in default: a tiny DBRX with dummy weights,
# converted, built and run on a batch of two prompts (token ids, since dummy weights come without a tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
work=${KILN_DEMO_DIR:-./kiln-demo}
mkdir -p "$work"
kiln convert --preset dbrx-tiny --output_dir "$work/ckpt"
kiln build --checkpoint_dir "$work/ckpt" --output_dir "$work/engine" --max_batch_size 8 --max_input_len 256 --max_seq_len 512
printf '1,2,3,4,5,6,7\n42,43\n' > "$work/prompts.csv"
kiln run --engine_dir "$work/engine" --input_file "$work/prompts.csv" --max_output_len 16 --output_json "$work/out.json"
echo "outputs written to $work/out.json"
