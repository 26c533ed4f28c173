"""A published DBRX "converted" GPTQ engine on a CUDA GPU: the experts run in the Triton group-wise fused MoE (4 and
8 bit; group_size -1 widened to one power-of-two group), q/k/v fused into the Triton weight-only GEMM. Same greedy
tokens as the CPU engine of the same checkpoint, and logits within float16 rounding of transformers' DBRX in float64
holding the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from fixtures_dbrx import hf_scorers
from test_published_dbrx_converted import converted_checkpoint
from test_published_group_wise import GPTQ
from test_published_group_wise_gpu import gpu_engine_matches_cpu_and_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fmt", [
    {**GPTQ, "bits": 4, "group_size": 32, "sym": False},
    {**GPTQ, "bits": 8, "group_size": -1, "sym": True, "checkpoint_format": "gptq_v2"},
])
def test_converted_gptq_engine_on_gpu_matches_cpu_and_reference(fmt, tmp_path):
    hf_dir, model = converted_checkpoint(tmp_path, fmt)
    reference, _ = hf_scorers(model.double())
    gpu_engine_matches_cpu_and_reference(tmp_path, hf_dir, reference)
