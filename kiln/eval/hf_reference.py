"""transformers beside kiln on the same Hugging Face checkpoint, in the same process, without remote code.

The checkpoint's config.json is read by kiln's own family reader and turned into transformers' config by the same
function `kiln bench --compare_hf` uses (kiln.bench.hf.hf_config): that fixes the two ways transformers misreads the
published configs (DBRX's RoPE theta, which transformers 5 drops from attn_config and replaces by 10000,
model-facts.md §1 (a); MPT's remote-code spellings and llm-foundry-only keys) and refuses shapes transformers cannot
hold. The weights are then loaded by transformers' `from_pretrained`, and every tensor must land. Baichuan has no
transformers class (only remote code, which kiln never runs), so there is no comparison for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from kiln.bench.hf import HFUnavailable, behaviour_notes, hf_config
from kiln.checkpoint.hf_reader import read_json
from kiln.models import family_for_hf_config

BAICHUAN_NOTE = ("transformers runs Baichuan only through the checkpoint's remote code, which kiln never executes: "
                 "no transformers comparison for Baichuan; kiln alone")

__all__ = ["BAICHUAN_NOTE", "HFUnavailable", "HFReference", "load_hf_reference"]


class HFReference:
    """transformers' causal LM of a checkpoint directory, with `notes` saying where it computes something else."""

    def __init__(self, model: torch.nn.Module, device: torch.device, notes: list[str]) -> None:
        self.model, self.device, self.notes = model, device, notes

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab] float32
        return self.model(torch.tensor([ids], device=self.device)).logits[0].float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], pad_id: int, stop_ids: Sequence[int], max_new_tokens: int,
                 gen_kwargs: dict[str, Any]) -> list[list[int]]:
        """Generated ids per prompt (up to and including the first stop token). Prompts are left-padded into one
        batch, as summarize.py does, with an attention mask so that the padding is never attended."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                  eos_token_id=list(stop_ids), pad_token_id=pad_id, **gen_kwargs)
        results = []
        for row in out[:, width:].tolist():  # [prompts, generated] with pad after a stop
            stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
            results.append(row if stop is None else row[: stop + 1])
        return results


def load_hf_reference(hf_model_dir: str | Path, dtype: torch.dtype | None, device: torch.device) -> HFReference:
    """transformers' model of `hf_model_dir` on `device` in `dtype` (default: the checkpoint's). HFUnavailable (with
    the reason) for Baichuan and for shapes transformers' classes cannot hold."""
    from transformers import DbrxForCausalLM, MptForCausalLM

    path = Path(hf_model_dir)
    raw = read_json(path / "config.json", "config.json")
    family = family_for_hf_config(raw)
    if family.name == "baichuan":
        raise HFUnavailable(BAICHUAN_NOTE)
    config = family.config_from_hf(raw)
    hf_cfg = hf_config(config)
    cls = DbrxForCausalLM if family.name == "dbrx" else MptForCausalLM
    model, info = cls.from_pretrained(str(path), config=hf_cfg, dtype=dtype or config.torch_dtype,
                                      trust_remote_code=False, output_loading_info=True)
    _check_loading(info, config.tie_word_embeddings)
    return HFReference(model.to(device).eval(), device, behaviour_notes(config))


def _check_loading(info: dict[str, Any], tied: bool) -> None:
    """Every tensor of transformers' model came from the checkpoint and every checkpoint tensor was used (a missing
    one would silently stay random)."""
    missing = [n for n in info.get("missing_keys", []) if not (tied and n == "lm_head.weight")]
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise HFUnavailable(f"transformers' model does not match the checkpoint (missing {missing[:4]}, unexpected "
                            f"{unexpected[:4]}): no transformers comparison")
