"""SmoothQuant W8A8 on CUDA: torch._int_mm (padded for decode row counts) is exact against float64, and a bf16 layer
on the GPU matches the CPU path."""

from __future__ import annotations

import pytest
import torch

from kiln.quant.smoothquant import int8_matmul, quantize_weight, sq_linear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 512])
def test_int_mm_is_exact(rows):
    gen = torch.Generator().manual_seed(rows)
    qx = torch.randint(-127, 128, (rows, 4096), generator=gen, dtype=torch.int8)
    qw = torch.randint(-127, 128, (1024, 4096), generator=gen, dtype=torch.int8)
    want = qx.double() @ qw.double().t()
    got = int8_matmul(qx.cuda(), qw.cuda()).cpu().double()
    assert torch.equal(got, want.float().double())


@pytest.mark.parametrize("per_token", [True, False])
def test_bf16_layer_matches_cpu(per_token):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 256, generator=gen).to(torch.bfloat16)
    q, scale = quantize_weight(torch.randn(128, 256, generator=gen), True, torch.bfloat16)
    act = None if per_token else torch.tensor([4.0 / 127], dtype=torch.bfloat16)
    smoother = torch.rand(256, generator=gen).to(torch.bfloat16) + 0.5
    want = sq_linear(x, q, scale, act, smoother, None).float()
    cuda = [t if t is None else t.cuda() for t in (x, q, scale, act, smoother)]
    got = sq_linear(*cuda, None).cpu().float()
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("family, mode", [("mpt", "tok-ch"), ("dbrx", "tens-ch"), ("baichuan", "tens-tens")])
def test_triton_engine_matches_torch_engine(family, mode, tmp_path):
    """A tiny bf16 W8A8 engine on the Triton kernel set (INT8 GEMM, quantizing norms) against the same engine on
    the torch kernels (torch._int_mm): log-probs close and the same greedy tokens up to a tie (tests/greedy_compare.py:
    DBRX's experts run the Triton W8A8 fused MoE on one side, the torch path on the other, summing in other orders)."""
    import kiln
    from fixtures_kv_cache import calib_text
    from greedy_compare import assert_same_greedy
    from kiln.cli.main import main as kiln_main
    from test_quant_smoothquant import MODES, PROMPTS, calibrated_dir, version_flags

    hf, text = calibrated_dir(tmp_path, family), calib_text(tmp_path)
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(tmp_path / "ckpt"), "--dtype",
                      "bfloat16", "--smoothquant", "0.5", *MODES[mode], "--calib_size", "4",
                      "--calib_max_seq_length", "32", "--calib_dataset", str(text), *version_flags(family)]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64", "--no_tune"]) == 0
    greedy = kiln.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    runs = {}
    for backend in ("torch", "triton"):
        with kiln.LLM(tmp_path / "engine", device="cuda", kernel_backend=backend) as llm:
            runs[backend] = llm.generate(PROMPTS, greedy)
    assert_same_greedy(runs["torch"], runs["triton"])
