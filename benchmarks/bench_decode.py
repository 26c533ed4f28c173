"""Superseded by `kiln bench` (kiln/bench/), which has this script's logic and more; kept so that older commands
still run. `--backend` is `kiln bench --kernel_backend`.

    python benchmarks/bench_decode.py --engine_dir E --batch_size 1 32 --input_len 128 --output_len 64 [--compare_hf]
    # = python -m kiln bench --engine_dir E --batch_size 1 32 --input_len 128 --output_len 64 [--compare_hf]
"""

from __future__ import annotations

import sys

from kiln.cli.main import main

if __name__ == "__main__":
    argv = ["--kernel_backend" if a == "--backend" else a for a in sys.argv[1:]]
    sys.exit(main(["bench", *argv]))
