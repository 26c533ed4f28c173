"""Dummy weights in memory on the GPU: drawn on the rank's device (bit-identical to the same engine drawn there and
written to disk), and DBRX-132B in bf16 refused in one line before any weight is allocated."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.bench import BenchOptions
from kiln.bench.dummy import dummy_engine
from kiln.bench.precisions import precision_quant
from kiln.cli.main import main as kiln_main
from test_weights_in_memory import PROMPT, dbrx_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_full_dbrx_in_bf16_is_refused_on_one_gpu_before_allocating(capsys):
    """DBRX-132B in bf16 (264 GB) cannot fit one GPU: refused in one line before any weight is allocated."""
    argv = ["bench", "--preset", "dbrx", "--dtype", "bfloat16", "--batch_size", "1", "--input_len", "16",
            "--output_len", "4", "--no_tune"]
    assert kiln_main(argv) == 2
    err = capsys.readouterr().err
    assert "the engine needs" in err and len(err.strip().splitlines()) == 1
    assert torch.cuda.memory_allocated() < 1 << 30


@pytest.mark.parametrize("precision", ["int4_awq", "int8"])
def test_in_memory_on_gpu_equals_the_engine_on_disk(precision, tmp_path):
    """On the GPU the weights are drawn by the CUDA generator on the rank's device, as a disk engine drawn there."""
    def logits(in_memory: bool) -> torch.Tensor:
        opts = BenchOptions(config=dbrx_config(tmp_path), dtype="bfloat16", batch_sizes=[1], input_len=8,
                            output_len=4, device="cuda", tune=False, seed=7, weights_in_memory=in_memory)
        with dummy_engine(opts, lambda line: None, precision_quant(precision, 128)) as engine:
            llm = kiln.LLM(engine, device="cuda", kv_cache_free_gpu_memory_fraction=0.1)
            try:
                return llm.score(PROMPT)
            finally:
                llm.close()

    assert torch.equal(logits(True), logits(False))
