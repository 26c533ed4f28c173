"""The tiny checkpoints on a GPU: the same greedy tokens as on the CPU in fp32, with both kernel backends."""

from __future__ import annotations

import pytest
import torch

import kiln
from fixtures_dbrx import make_dbrx_checkpoint
from test_dbrx import PROMPTS, convert_build, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_dbrx")
    model_dir, hf, _ = make_dbrx_checkpoint(tmp)
    # Kernel tuning at build has its own GPU test (test_build_tuning.py); here it would only take minutes.
    return convert_build(tmp, model_dir, build_args=("--no_tune",)), hf


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dbrx_gpu_matches_cpu_and_transformers(dbrx, backend):
    engine, hf = dbrx
    params = kiln.SamplingParams(max_tokens=24, temperature=0.0)
    gpu = kiln.LLM(engine, device="cuda", kernel_backend=backend)
    cpu = kiln.LLM(engine, device="cpu")
    gpu_out = [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)]
    cpu_out = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
    assert gpu_out == cpu_out
    assert gpu_out == [hf_greedy(hf, p, 24) for p in PROMPTS]
    for prompt in PROMPTS:
        torch.testing.assert_close(gpu.score(prompt).cpu(), cpu.score(prompt), rtol=1e-3, atol=1e-3)
