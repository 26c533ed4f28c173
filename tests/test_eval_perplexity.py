"""Rolling-window perplexity: the windows (every token but the first scored once, with its context), the sum against
a direct computation, and kiln's perplexity against transformers (DBRX, MPT) and the Baichuan test reference in
fp32 on tiny checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kiln
from fixtures_baichuan import BaichuanReference, make_baichuan_checkpoint
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.config import ConfigError
from kiln.eval.hf_reference import load_hf_reference
from kiln.eval.perplexity import rolling_perplexity, windows


@pytest.mark.parametrize("max_length,stride", [(2, 1), (8, 1), (8, 4), (8, 7)])
def test_windows_score_every_token_once_with_context(max_length, stride):
    for n in (0, 1, 2, 3, max_length - 1, max_length, max_length + 1, 3 * max_length + 5):
        scored = []
        for w in windows(n, max_length, stride):
            assert 0 <= w.begin < w.target < w.end <= n and w.end - w.begin <= max_length
            for t in range(w.target, w.end):
                # the first window gives what precedes the token; every later one at least max_length - stride
                assert t - w.begin >= min(t, max_length - stride)
                scored.append(t)
        assert scored == list(range(1, n)), (n, scored)


def test_window_errors():
    for max_length, stride, message in [(8, 0, "--stride is 0"), (8, 8, "--stride is 8"), (1, 1, "--max_length")]:
        with pytest.raises(ConfigError, match=message):
            list(windows(20, max_length, stride))


def test_rolling_sum_equals_direct_bigram_computation():
    # A bigram model needs one token of context, so every window scheme must give the whole-text sum.
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 50, generator=gen)
    ids = torch.randint(0, 50, (97,), generator=gen).tolist()
    direct = sum(-float(torch.log_softmax(table[ids[t - 1]].double(), -1)[ids[t]]) for t in range(1, len(ids)))
    for max_length, stride in [(97, 10), (16, 8), (16, 15), (5, 2)]:
        result = rolling_perplexity(ids, lambda w: table[torch.tensor(w)], max_length, stride)
        assert result.tokens == 96
        assert result.nll == pytest.approx(direct, rel=1e-6)
        assert result.perplexity == pytest.approx(math.exp(direct / 96), rel=1e-6)
    with pytest.raises(ConfigError, match="at least 2"):
        rolling_perplexity([3], lambda w: table[torch.tensor(w)], 8, 4)


def build_engine(tmp: Path, model_dir: Path, *convert: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), *convert]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "48", "--max_seq_len", "64"]) == 0
    return tmp / "engine"


def random_ids(vocab: int, n: int = 150) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize("family", ["dbrx", "mpt"])
def test_kiln_perplexity_equals_transformers_fp32(tmp_path, family):
    if family == "dbrx":
        model_dir, hf, cfg = make_dbrx_checkpoint(tmp_path, seed=3)
    else:
        cfg = mpt_published_config()
        hf = hf_mpt_model(cfg, seed=3)
        model_dir = save_checkpoint(published_state(hf), cfg, tmp_path / "hf")
    ids = random_ids(cfg["vocab_size"])
    llm = kiln.LLM(build_engine(tmp_path, model_dir), device="cpu")
    ours = rolling_perplexity(ids, llm.score, 48, 16)
    # transformers as the tests build it (the model that wrote the checkpoint) ...
    with torch.no_grad():
        theirs = rolling_perplexity(ids, lambda w: hf(torch.tensor([w])).logits[0], 48, 16)
    # ... and as `kiln perplexity --hf_model_dir` loads it from the directory, without remote code
    loaded = rolling_perplexity(ids, load_hf_reference(model_dir, torch.float32, torch.device("cpu")).logits, 48, 16)
    assert ours.tokens == theirs.tokens == loaded.tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-4)
    assert loaded.perplexity == pytest.approx(theirs.perplexity, rel=1e-6)
    assert 50 < ours.perplexity < 10 * cfg["vocab_size"]  # random weights: near-uniform, not degenerate
    # the windows matter: scoring each token with less context gives another number
    assert rolling_perplexity(ids, llm.score, 8, 7).perplexity != pytest.approx(ours.perplexity, rel=1e-4)


def test_kiln_perplexity_equals_baichuan_reference_fp32(tmp_path):
    model_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b", seed=4)
    ids = random_ids(cfg["vocab_size"])
    llm = kiln.LLM(build_engine(tmp_path, model_dir, "--dtype", "float32", "--model_version", "v2_13b"), device="cpu")
    ours = rolling_perplexity(ids, llm.score, 48, 16)
    reference = rolling_perplexity(ids, BaichuanReference(state, cfg, "v2_13b").logits, 48, 16)
    assert ours.tokens == reference.tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(reference.perplexity, rel=1e-4)
