"""The shipped trained models (models/): their layout, and kiln against transformers (DBRX, MPT) or the tests'
independent Baichuan reference on held-out text: identical greedy continuations of 20 held-out prompts x 64
tokens in fp32, held-out log-likelihoods equal within 1e-4 relative, bf16 within 1% of fp32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.cli.main import main
from kiln.tokenizer import load_tokenizer

from fixtures_baichuan import BaichuanReference
from fixtures_dbrx import hf_dbrx_model
from fixtures_mpt import hf_mpt_model

REPO = Path(__file__).resolve().parents[1]
MODELS = {"dbrx": REPO / "models" / "dbrx-books", "mpt": REPO / "models" / "mpt-books",
          "baichuan": REPO / "models" / "baichuan2-books"}
HELDOUT = REPO / "kiln" / "eval" / "data" / "heldout.txt"
MiB = 2**20


def heldout_prompts(count: int = 20, chars: int = 120) -> list[str]:
    """`count` prompts spread evenly over the held-out books: the opening words of a paragraph."""
    paragraphs = [p.strip() for p in HELDOUT.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 200]
    step = len(paragraphs) // count
    return [paragraphs[i * step][:chars].rsplit(" ", 1)[0] for i in range(count)]


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(model_dir / file)))
    return {k: v.float() for k, v in state.items()}


def _reference(family: str):
    """fp32 reference: greedy(ids, n) -> n ids, and logits(ids) -> [len(ids), vocab]."""
    model_dir = MODELS[family]
    cfg = json.loads((model_dir / "config.json").read_text())
    state = _state(model_dir)
    if family == "baichuan":
        ref = BaichuanReference(state, cfg, "v2_13b", dtype=torch.float32)
        return ref.greedy, lambda ids: ref.logits(ids)
    model = hf_dbrx_model(cfg) if family == "dbrx" else hf_mpt_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    model.generation_config.eos_token_id = None  # compare whole continuations; kiln runs with ignore_eos

    @torch.no_grad()
    def greedy(ids: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    @torch.no_grad()
    def logits(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids])).logits[0]
    return greedy, logits


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """fp32 and bf16 engines of each shipped model, built once."""
    root = tmp_path_factory.mktemp("reference")
    built = {}
    for family, model_dir in MODELS.items():
        for dtype in ("float32", "bfloat16"):
            ckpt, eng = root / f"{family}-{dtype}-ckpt", root / f"{family}-{dtype}"
            assert main(["convert", "--model_dir", str(model_dir), "--output_dir", str(ckpt), "--dtype", dtype]) == 0
            assert main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(eng), "--max_batch_size", "20",
                         "--max_input_len", "600", "--max_seq_len", "1024"]) == 0
            built[family, dtype] = eng
    return built


@pytest.mark.parametrize("family", sorted(MODELS))
def test_shipped_layout(family):
    model_dir = MODELS[family]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(model_dir.glob("model-*.safetensors"))
    assert len(files) >= 2 and {f.name for f in files} == set(index["weight_map"].values())
    assert all(f.stat().st_size <= 15 * MiB for f in files)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "training.json"):
        assert (model_dir / name).is_file()
    assert not list(model_dir.glob("*.py"))  # no code ships with a model
    record = json.loads((model_dir / "training.json").read_text())
    assert record["steps"] == record["steps_planned"] and record["heldout_loss"] < 5


def test_shipped_models_fit_the_budget():
    total = sum(f.stat().st_size for d in MODELS.values() for f in d.iterdir())
    assert total <= 96 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MODELS))
def test_greedy_continuations_match_the_reference(family, engines):
    tok = load_tokenizer(MODELS[family])
    prompts = [tok.encode(p) for p in heldout_prompts()]
    greedy, _ = _reference(family)
    with kiln.LLM(engines[family, "float32"]) as llm:
        outs = llm.generate(prompts, kiln.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    want = [greedy(ids, 64) for ids in prompts]
    assert got == want
    text = tok.decode(got[0])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # words, not byte soup


def _nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Summed next-token negative log-likelihood of ids[1:] under logits [len(ids), vocab]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MODELS))
def test_heldout_likelihood_matches_reference_and_bf16(family, engines):
    tok = load_tokenizer(MODELS[family])
    text = HELDOUT.read_text(encoding="utf-8")
    ids = tok.encode(text[len(text) // 3:len(text) // 3 + 6000])[:512]
    _, logits = _reference(family)
    want = _nll(logits(ids), ids)
    with kiln.LLM(engines[family, "float32"]) as llm:
        fp32 = _nll(llm.score(ids), ids)
    with kiln.LLM(engines[family, "bfloat16"]) as llm:
        bf16 = _nll(llm.score(ids), ids)
    assert abs(fp32 - want) <= 1e-4 * want
    ppl32, ppl16 = math.exp(fp32 / (len(ids) - 1)), math.exp(bf16 / (len(ids) - 1))
    assert abs(ppl16 - ppl32) <= 0.01 * ppl32
    assert ppl32 < 200  # a trained model: far below the ~800-1000 of a unigram model on these books


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dbrx", "mpt"])
def test_summarize_and_perplexity_beside_transformers(family, engines, tmp_path):
    """The two evaluation commands on a trained model, kiln beside transformers in fp32: identical summaries and
    ROUGE of a few shipped articles, and the same held-out perplexity."""
    engine, hf = str(engines[family, "float32"]), str(MODELS[family])
    rouge = tmp_path / "rouge.json"
    assert main(["summarize", "--engine_dir", engine, "--hf_model_dir", hf, "--test_kiln", "--test_hf",
                 "--max_ite", "1", "--batch_size", "2", "--output_len", "24", "--max_input_length", "500",
                 "--output_json", str(rouge)]) == 0
    result = json.loads(rouge.read_text())
    assert result["kiln"]["summaries"] == result["hf"]["summaries"]
    assert result["kiln"]["rouge1"] == result["hf"]["rouge1"] > 0
    ppl = tmp_path / "ppl.json"
    assert main(["perplexity", "--engine_dir", engine, "--hf_model_dir", hf, "--max_tokens", "1200",
                 "--max_length", "512", "--stride", "256", "--output_json", str(ppl)]) == 0
    result = json.loads(ppl.read_text())
    assert result["tokens"] >= 1100
    assert abs(result["perplexity"] - result["hf_perplexity"]) <= 1e-4 * result["hf_perplexity"]
    assert result["perplexity"] < 200
