"""The training modules of scripts/reference compute what the published architectures compute: transformers' DBRX
and MPT, and the tests' independent Baichuan2-13B reference, on random weights under the published tensor names.
If they did not, the shipped models would have been trained as one network and run as another."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "reference"))
from export import baichuan_config, dbrx_config, mpt_config  # noqa: E402
from models import SPECS, build, mpt_alibi_slopes, baichuan_alibi_slopes  # noqa: E402

from fixtures_baichuan import BaichuanReference, interleave_slopes  # noqa: E402
from fixtures_dbrx import hf_dbrx_model  # noqa: E402
from fixtures_mpt import hf_mpt_model  # noqa: E402

SMALL = {
    "dbrx": replace(SPECS["dbrx"], vocab_size=300, d_model=64, n_layers=2, ffn=32, experts=8, top_k=3,
                    max_seq_len=128, extra={**SPECS["dbrx"].extra, "clip_qkv": 0.3}),
    "mpt": replace(SPECS["mpt"], vocab_size=300, d_model=48, n_layers=2, ffn=192, max_seq_len=128),
    "baichuan": replace(SPECS["baichuan"], vocab_size=300, d_model=48, n_layers=2, ffn=80, max_seq_len=128),
}


def _spread(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger random weights than training's init, so that attention, routing and the clamp all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if p.dim() == 1
                    else torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(seed))


def test_dbrx_training_module_matches_transformers():
    spec = SMALL["dbrx"]
    ours = _spread(build("dbrx", spec=spec), 0)
    ref = hf_dbrx_model(dbrx_config(spec))
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = _ids(40)
    with torch.no_grad():
        got, aux = ours(ids)
        want = ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert aux.item() > 0  # the load-balance loss is live
    # The clamp matters at this spread: without it the logits differ.
    unclamped = replace(spec, extra={**spec.extra, "clip_qkv": 1e9})
    other = build("dbrx", spec=unclamped)
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other.eval()(ids)[0], want, atol=1e-3)


def test_mpt_training_module_matches_transformers():
    spec = SMALL["mpt"]
    ours = _spread(build("mpt", spec=spec), 0)
    ref = hf_mpt_model(mpt_config(spec))
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # the head is tied to wte
    ref.tie_weights()
    ids = _ids(40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_baichuan_training_module_matches_the_reference():
    spec = SMALL["baichuan"]
    ours = _spread(build("baichuan", spec=spec), 0)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    ref = BaichuanReference(state, baichuan_config(spec), "v2_13b")
    ids = _ids(33)
    with torch.no_grad():
        got = ours(ids)[0]
    for row in range(2):
        want = ref.logits(ids[row].tolist()).to(torch.float32)
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 56])
def test_alibi_slopes_match_the_published_formulas(heads):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # transformers' MPT bias at one query row is slope * (j - (n - 1)); its last key column is -slope.
    hf = build_mpt_alibi_tensor(heads, 4)[:, 0, 0]
    torch.testing.assert_close(mpt_alibi_slopes(heads).float(), -hf / 3, rtol=1e-6, atol=0)
    torch.testing.assert_close(baichuan_alibi_slopes(heads), torch.tensor(interleave_slopes(heads),
                                                                          dtype=torch.float64))
