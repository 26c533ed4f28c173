"""Time drawing DBRX-132B's dummy weights in memory (kiln.checkpoint.in_memory) for its first N layers plus the
embedding and head, on a device, as a rank does when it loads: build on meta, place (kiln.layers.materialize), draw.

    OMP_NUM_THREADS=1 python benchmarks/draw_dummy_slice.py int4_awq 1 cpu    # precision, layers, device
    python benchmarks/draw_dummy_slice.py int4_awq 40 cuda                     # the whole model on one GPU

Two runs (1 and 2 layers) give the cost of one layer. On the GPU the peak allocated memory is printed beside the
parameters' bytes (the difference is the transient of the largest tensor being drawn); on the CPU run it under
/usr/bin/time -v for the peak resident memory."""

from __future__ import annotations

import sys
import time

import torch

from kiln.bench import BenchOptions
from kiln.bench.dummy import dummy_engine
from kiln.bench.precisions import precision_quant
from kiln.checkpoint.convert import meta_model
from kiln.checkpoint.in_memory import draw_rank_weights
from kiln.checkpoint.kiln_format import load_artifact
from kiln.layers.materialize import materialize

GiB = 2**30


def main(precision: str, layers: int, device: torch.device) -> None:
    opts = BenchOptions(preset="dbrx", dtype="bfloat16", num_layers=layers, batch_sizes=[1], input_len=16,
                        output_len=4, device=device.type, tune=False, weights_in_memory=True)
    with dummy_engine(opts, log=lambda line: None, quant=precision_quant(precision, 128)) as engine:
        info = load_artifact(engine, "engine")
        model = meta_model(info.family, info.model, info.mapping, info.quant)
        start = time.perf_counter()
        materialize(model, device)
        placed = time.perf_counter()
        draw_rank_weights(model, info, 0, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = f", peak allocated {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB" if device.type == "cuda" else ""
    print(f"{precision}, {layers} layer(s) on {device}: {params / GiB:.2f} GiB of parameters placed in "
          f"{placed - start:.2f} s, drawn in {end - placed:.1f} s{peak}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3]))
