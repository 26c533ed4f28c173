"""Published GPTQ/AWQ engines on a CUDA GPU (the Triton weight-only kernels where they bind: group_size -1 read as one
wide group, 8-bit; the torch path for act-order layers): the same greedy tokens as the CPU engine of the same
checkpoint, and logits within float16 rounding of the float64 dequantized-weights reference."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

import kiln
from fixtures_mpt import mpt_published_config, random_state, reference_logits, save_checkpoint
from test_published_group_wise import GPTQ, MPT_LINEARS, publish
from kiln.cli.main import main as kiln_main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]


@pytest.mark.parametrize("fmt", [
    {**GPTQ, "bits": 4, "group_size": -1, "sym": False},
    {**GPTQ, "bits": 8, "group_size": 32, "sym": True, "checkpoint_format": "gptq_v2"},
    {**GPTQ, "bits": 4, "group_size": 64, "sym": False, "desc_act": True},
    {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
])
def test_published_engine_on_gpu_matches_cpu_and_reference(fmt, tmp_path):
    cfg = mpt_published_config()
    prefixes = [f"transformer.blocks.{i}.{n}" for i in range(cfg["n_layers"]) for n in MPT_LINEARS]
    published, reference = publish(random_state(cfg), prefixes, fmt, seed=3)
    hf_dir = save_checkpoint(published, {**cfg, "quantization_config": fmt}, tmp_path / "hf")
    gpu_engine_matches_cpu_and_reference(tmp_path, hf_dir, lambda prompt: reference_logits(reference, cfg, prompt))


def gpu_engine_matches_cpu_and_reference(tmp: Path, hf_dir: Path, reference: Callable[[list[int]], torch.Tensor]
                                         ) -> None:
    """Convert `hf_dir` to a float16 engine under `tmp`: its greedy tokens on the GPU equal the CPU's, and its logits
    are within float16 rounding of `reference` (a prompt -> float64 logits [len, vocab])."""
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp / "ckpt"), "--dtype",
                      "float16"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with kiln.LLM(tmp / "engine", device="cpu") as cpu:
        cpu_tokens = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
    with kiln.LLM(tmp / "engine", device="cuda") as gpu:
        assert [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)] == cpu_tokens
        for prompt in PROMPTS:
            got, want = gpu.score(prompt).cpu().double(), reference(prompt)
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()
