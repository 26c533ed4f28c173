"""Group-wise INT4 engines on a CUDA GPU (the torch dequantize-then-matmul path and whatever kernel the engine binds):
the same tokens and logits as the CPU engine of the same checkpoint, for a dense model and for DBRX's experts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kiln
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.checkpoint.convert import convert
from kiln.cli.convert_cmd import plan_from_hf
from kiln.cli.main import main as kiln_main
from kiln.config import QuantConfig
from kiln.quant.calibrate import CalibrationOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]


@pytest.mark.parametrize("family, algo", [("mpt", "gptq"), ("dbrx", "awq")])
def test_group_wise_engine_on_gpu_matches_cpu(family, algo, tmp_path):
    if family == "mpt":
        cfg = mpt_published_config()
        hf_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp_path / "hf")
    else:
        hf_dir = make_dbrx_checkpoint(tmp_path)[0]
    quant = QuantConfig(quant_algo=f"W4A16_{algo.upper()}", group_size=32, has_zero_point=True)
    plan = plan_from_hf(str(hf_dir), "bfloat16", 1, 1, quant=quant)
    plan = dataclasses.replace(plan, calibration=CalibrationOptions(algo, sequences=4, length=24),
                               provenance={**plan.provenance, "model_dir": None})
    convert(plan, tmp_path / "ckpt", progress=False)
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with kiln.LLM(tmp_path / "engine", device="cpu") as cpu:
        cpu_tokens = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
        cpu_scores = [cpu.score(p) for p in PROMPTS]
    with kiln.LLM(tmp_path / "engine", device="cuda") as gpu:
        assert [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)] == cpu_tokens
        for prompt, want in zip(PROMPTS, cpu_scores):
            torch.testing.assert_close(gpu.score(prompt).cpu(), want, rtol=2e-2, atol=2e-2)
