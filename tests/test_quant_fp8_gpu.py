"""FP8 on a GPU with FP8 tensor cores (sm_89+): the torch._scaled_mm path of every scheme against the torch reference
(fake-quantized x @ dequantized W.T) at real layer shapes, decode rows and a 2048-token prefill; the layer binding
choosing _scaled_mm; tiny FP8 engines (MPT, DBRX) on CUDA giving the CPU engine's logprobs and greedy tokens, and
the unfused engine's with the quantization fused into the norms and activations."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import kiln
from kiln.cli.main import main as kiln_main
from kiln.quant.fp8 import FP8_SCHEMES
from kiln.quant.fp8_layers import FP8Matmul, fp8_gemm_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or not fp8_gemm_available(torch.device("cuda")),
                               reason="needs FP8 tensor cores (sm_89+)")


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


@needs_fp8
@pytest.mark.parametrize("algo", sorted(FP8_SCHEMES))
@pytest.mark.parametrize("rows", [1, 7, 16, 2048])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 10752)])
def test_scaled_mm_matches_the_reference(algo, rows, n, k):
    scheme = FP8_SCHEMES[algo]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, scale = scheme.quantize(w, torch.bfloat16)
    static = None if scheme.dynamic else torch.tensor([x.abs().max().item() / 448], device="cuda")
    fast = FP8Matmul(scheme, scale, static, use_scaled_mm=True)
    ref = FP8Matmul(scheme, scale, static, use_scaled_mm=False)
    got, want = fast(x, q, None), ref(x.float(), q, None)  # the reference in float32
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    err = (got.float() - want).abs().max().item()
    assert err <= 1e-2 * want.abs().max().item(), err


@needs_fp8
def test_engine_layers_bind_scaled_mm_on_a_bf16_engine(tmp_path):
    ckpt, engine = tmp_path / "c", tmp_path / "e"
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(ckpt), "--dtype", "bfloat16",
                      "--enable_fp8", "--per_channel", "--per_token"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--max_batch_size", "2",
                      "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    with kiln.LLM(engine) as llm:
        out = llm.generate([[5, 6, 7, 8]], kiln.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        runs = [m.matmul.run for m in llm.runner.model.modules() if isinstance(getattr(m, "matmul", None), FP8Matmul)]
    assert len(out[0].outputs[0].token_ids) == 4
    # chosen at the first call, on the placed weight (the model is built on the meta device, where no FP8 GEMM runs)
    assert runs and all(getattr(run, "__func__", None) is FP8Matmul.scaled_mm for run in runs)


PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]
GREEDY = kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=2)


def _generate(engine: Path, device: str) -> list:
    with kiln.LLM(engine, device=device) as llm:
        return llm.generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("family", ["mpt", "dbrx"])
def test_tiny_fp8_engine_on_cuda_gives_the_cpu_logprobs(family, tmp_path):
    """The CUDA engine (_scaled_mm for the 21-token prefill, the Triton GEMV for 7 rows and decode, the Triton
    quantization) against the CPU engine (the torch reference): not token for token (tests/greedy_compare.py says
    why), but every logprob within a few hundredths of a nat and the same greedy tokens up to a tie."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures_kv_cache import calib_text, tiny_hf_dir
    from greedy_compare import assert_same_greedy

    model_dir = tiny_hf_dir(tmp_path, family)
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "c"), "--dtype",
                      "float32", "--enable_fp8", "--calib_dataset", str(calib_text(tmp_path)), "--calib_size", "4",
                      "--calib_max_seq_length", "32"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "e"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64", "--no_tune"]) == 0
    assert_same_greedy(_generate(tmp_path / "e", "cpu"), _generate(tmp_path / "e", "cuda"))


@pytest.mark.parametrize("algo", sorted(FP8_SCHEMES))
def test_triton_fp8_gemv_matches_the_reference_and_is_timed(algo):
    """The Triton quantization + GEMV at decode rows against the reference; prints its time in a CUDA graph beside
    _scaled_mm's (with the same quantization) and bf16 cuBLAS's (the QKV shape of MPT-7B)."""
    from kiln.kernels.gpu_timing import graph_us
    from kiln.kernels.triton_fp8_gemv import fp8_gemv
    from kiln.kernels.triton_fp8_quant import quantize_fp8_rows

    scheme = FP8_SCHEMES[algo]
    n, k = 12288, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, scale = scheme.quantize(w, torch.bfloat16)
    for rows in (1, 16):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        static = None if scheme.dynamic else torch.tensor([x.abs().max().item() / 448], device="cuda")
        xq, xs = quantize_fp8_rows(x, static)
        got = fp8_gemv(xq, xs, q, scale, None, torch.bfloat16)
        want = FP8Matmul(scheme, scale, static, use_scaled_mm=False)(x.float(), q, None)
        assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item()
        t_gemv = graph_us([lambda: fp8_gemv(*quantize_fp8_rows(x, static), q, scale, None, torch.bfloat16)])
        t_bf16 = graph_us([lambda: x @ w.T])
        line = f"{algo} rows {rows}: triton quantize + fp8 gemv {t_gemv:.1f} us, bf16 cuBLAS {t_bf16:.1f} us"
        if fp8_gemm_available(torch.device("cuda")):
            mm = FP8Matmul(scheme, scale, static, use_scaled_mm=True)
            mm.bind(q, x.dtype)
            mm.gemv_rows = 0
            line += f", quantize + _scaled_mm {graph_us([lambda: mm(x, q, None)]):.1f} us"
        print(line)


@needs_fp8
@pytest.mark.parametrize("preset, flags", [("mpt-tiny", ()), ("baichuan-tiny", ("--per_channel", "--per_token"))])
def test_fused_quantization_gives_the_unfused_engines_tokens(preset, flags, tmp_path, monkeypatch):
    """The norms and MLP activations quantizing for their FP8 layers (kiln.kernels.triton_fp8_fused) against the
    same engine with KILN_FP8_FUSED=0 (each layer quantizing its own input). The fused norm is bit for bit the
    unfused one (the same add_norm_row, rounding and quantize_fp8_row, tests/test_quant_fp8_fused_triton.py), but the
    fused activation's exp/erf are Triton's, not torch's CUDA ones: a last-bit difference can move an e4m3 value one
    step, so the engines agree as greedy_compare says, not to the bit."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from greedy_compare import assert_same_greedy

    from kiln.layers.quantized_input import QuantizingActivation, QuantizingNorm

    ckpt, engine = tmp_path / "c", tmp_path / "e"
    assert kiln_main(["convert", "--preset", preset, "--output_dir", str(ckpt), "--dtype", "bfloat16",
                      "--enable_fp8", *flags]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--max_batch_size", "4",
                      "--max_input_len", "32", "--max_seq_len", "64", "--no_tune"]) == 0
    monkeypatch.setenv("KILN_FP8_FUSED", "0")
    unfused = _generate(engine, "cuda")
    monkeypatch.delenv("KILN_FP8_FUSED")
    with kiln.LLM(engine, device="cuda") as llm:
        fused = llm.generate(PROMPTS, GREEDY)
        block = next(iter(llm.runner.model.layers.values()))
        assert isinstance(block.input_norm, QuantizingNorm) and isinstance(block.post_attn_norm, QuantizingNorm)
        assert isinstance(block.ffn.activation, QuantizingActivation)
    assert_same_greedy(unfused, fused)
