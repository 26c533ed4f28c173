"""--quantize_lm_head on a real GPU: the Triton weight-only kernels bound to LM heads at the real vocabularies (DBRX's
100352 rows, MPT's 50432, Baichuan2-13B's 125696 over tp 2) in bfloat16 against `x @ dequant(W).T`, and a tiny MPT
engine with its head quantized giving the same greedy tokens with CUDA graphs, eagerly and on the CPU."""

from __future__ import annotations

import gc

import pytest
import torch

import kiln
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.checkpoint.convert import convert
from kiln.cli.main import main as kiln_main
from test_quant_lm_head import group_wise_plan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("algo", ["W8A16", "W4A16", "W4A16_AWQ"])
@pytest.mark.parametrize("vocab, hidden, tp", [(100352, 6144, 1), (50432, 4096, 1), (125696, 5120, 2)])
def test_kernels_on_real_heads_in_bfloat16(vocab, hidden, tp, algo):  # DBRX, MPT-7B, Baichuan2-13B
    from test_quant_lm_head_triton import check_bound_head, quantized_head

    gen = torch.Generator().manual_seed(vocab)
    head, dense = quantized_head(vocab, hidden, tp, algo, "bfloat16", gen)
    for rows in (1, 4, 16, 100):  # fused decode kernel, and the dequantize + cuBLAS path above 64 rows
        check_bound_head(head, dense, rows, torch.bfloat16, gen, 2e-2)
        head.matmul = head.matmul.fallback  # rebind from the torch matmul for the next row count


@pytest.mark.parametrize("precision", ["int4", "int4_awq"])
def test_engine_with_a_quantized_head_graphs_match_eager_and_cpu(precision, tmp_path):
    from kiln.kernels.triton_weight_only import WeightOnlyKernelMatmul

    cfg = mpt_published_config()
    hf_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp_path / "hf")
    if precision == "int4":
        assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "ckpt"), "--dtype",
                          "float32", "--use_weight_only", "--weight_only_precision", "int4", "--quantize_lm_head"]) == 0
    else:  # AWQ (groups of 32) on seeded random windows: the fixture has no tokenizer
        convert(group_wise_plan(tmp_path, hf_dir, "awq"), tmp_path / "ckpt", progress=False)
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--max_batch_size", "6", "--max_input_len", "48", "--max_seq_len", "96"]) == 0
    prompts = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61)), [3]]
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    gpu = kiln.LLM(tmp_path / "engine", device="cuda", kernel_backend="triton")
    assert isinstance(gpu.runner.model.lm_head.matmul, WeightOnlyKernelMatmul)
    with_graphs = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    gpu.runner.graphs = None
    eager = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    cpu = [o.outputs[0].token_ids for o in kiln.LLM(tmp_path / "engine", device="cpu").generate(prompts, params)]
    assert with_graphs == eager == cpu
