"""A published DBRX "converted" GPTQ engine on a CUDA GPU: the experts run in the Triton group-wise fused MoE (4 and
8 bit; group_size -1 widened to one power-of-two group), q/k/v fused into the Triton weight-only GEMM. Same greedy
tokens as the CPU engine of the same checkpoint, and logits within float16 rounding of transformers' DBRX in float64
holding the dequantized weights."""

from __future__ import annotations

import pytest
import torch

import kiln
from fixtures_dbrx import hf_scorers
from test_published_dbrx_converted import converted_checkpoint
from test_published_group_wise import GPTQ
from kiln.cli.main import main as kiln_main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]


@pytest.mark.parametrize("fmt", [
    {**GPTQ, "bits": 4, "group_size": 32, "sym": False},
    {**GPTQ, "bits": 8, "group_size": -1, "sym": True, "checkpoint_format": "gptq_v2"},
])
def test_converted_gptq_engine_on_gpu_matches_cpu_and_reference(fmt, tmp_path):
    hf_dir, model = converted_checkpoint(tmp_path, fmt)
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "ckpt"), "--dtype",
                      "float16"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    reference, _ = hf_scorers(model.double())
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with kiln.LLM(tmp_path / "engine", device="cpu") as cpu:
        cpu_tokens = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
    with kiln.LLM(tmp_path / "engine", device="cuda") as gpu:
        assert [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)] == cpu_tokens
        for prompt in PROMPTS:
            got, want = gpu.score(prompt).cpu().double(), reference(prompt)
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()
