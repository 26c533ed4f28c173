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


def test_drawing_peaks_at_the_parameters_plus_one_tensor(tmp_path):
    """While a rank draws its weights the GPU holds its parameters plus the one full tensor being drawn: a layer's w13
    in bytes (unpacked q) with its packed halves, or the embedding's float32 draw with its bf16 copy; never a float
    copy of the experts."""
    from kiln.checkpoint.convert import meta_model
    from kiln.checkpoint.in_memory import draw_rank_weights
    from kiln.checkpoint.kiln_format import load_artifact
    from kiln.layers.materialize import materialize

    experts, ffn, hidden, vocab = 4, 256, 1024, 512
    opts = BenchOptions(config=dbrx_config(tmp_path, layers=4, hidden=hidden), dtype="bfloat16", batch_sizes=[1],
                        input_len=8, output_len=4, device="cuda", tune=False, weights_in_memory=True)
    device = torch.device("cuda")
    with dummy_engine(opts, lambda line: None, precision_quant("int4_awq", 128)) as engine:
        info = load_artifact(engine, "engine")
        model = meta_model(info.family, info.model, info.mapping, info.quant)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        materialize(model, device)
        params = torch.cuda.memory_allocated(device) - base
        draw_rank_weights(model, info, 0, device)
        transient = torch.cuda.max_memory_allocated(device) - base - params
    w13 = experts * 2 * ffn * hidden  # unpacked bytes of the largest quantized tensor
    one_tensor = max(2.2 * w13, 6.2 * vocab * hidden) + (8 << 20)
    assert 0 < transient <= one_tensor, (transient, one_tensor)
