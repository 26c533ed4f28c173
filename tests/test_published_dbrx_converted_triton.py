"""A published DBRX "converted" GPTQ engine with the Triton kernel set (on the CPU through Triton's interpreter,
compiled on a GPU) against the same engine on the torch kernels: the stacked published experts run in the Triton
group-wise fused MoE (and, on a GPU, the fused q/k/v in the Triton weight-only GEMM) as kiln's own group-wise DBRX
does, so greedy tokens are equal and log-probs agree to float32 rounding. (The torch engine itself is held to
transformers with the dequantized weights in test_published_dbrx_converted.py.)"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

import pytest  # noqa: E402

from interpreted_triton import interpret_triton  # noqa: E402

if INTERPRET:
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_attention_kernels",
                      "kiln.kernels.triton_kv_cache", "kiln.kernels.triton_attention",
                      "kiln.kernels.triton_moe_kernels", "kiln.kernels.triton_moe", "kiln.kernels.triton_norm",
                      "kiln.kernels.triton_gemv_kernels",
                      "kiln.kernels.triton_gemv", "kiln.kernels.triton_weight_only_kernels",
                      "kiln.kernels.triton_weight_only", "kiln.kernels.triton_moe_weight_only_kernels",
                      "kiln.kernels.triton_moe_weight_only", "kiln.kernels.triton_moe_group_wise_kernels",
                      "kiln.kernels.triton_moe_group_wise", "kiln.kernels.triton_ops"))

import kiln  # noqa: E402
from kiln.kernels import reference  # noqa: E402
from test_published_dbrx_converted import converted_checkpoint  # noqa: E402
from test_published_group_wise import GPTQ, convert_and_build  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]
GREEDY = kiln.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)


def test_triton_engine_matches_torch_engine(tmp_path):
    hf_dir, _ = converted_checkpoint(tmp_path, {**GPTQ, "bits": 4, "group_size": 32, "sym": False})
    engine = convert_and_build(tmp_path, hf_dir, 1)
    runs = {}
    for backend in ("torch", "triton"):
        llm = kiln.LLM(engine, device=DEVICE, kernel_backend=backend, use_cuda_graphs=False)
        triton_moe = llm.runner.kernels.fused_moe_group_wise is not reference.fused_moe_group_wise
        assert triton_moe == (backend == "triton")
        runs[backend] = [(o.token_ids, o.token_logprobs) for r in llm.generate(PROMPTS, GREEDY) for o in r.outputs]
    assert [t for t, _ in runs["triton"]] == [t for t, _ in runs["torch"]]
    for (_, got), (_, want) in zip(runs["triton"], runs["torch"]):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-3)
