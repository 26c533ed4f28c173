"""The prompt shapes `LLM.generate` takes, as vLLM's: a string, a list of token ids, {"prompt": text} or
{"prompt_token_ids": ids}, or a list of those. Anything else is refused with a line that says what to pass (a
transformers BatchEncoding, the usual mistake of a transformers user, among them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_SHAPES = ('a string, a list of token ids, {"prompt": text} or {"prompt_token_ids": [ids]}, or a list of these')


class PromptError(ValueError):
    """A prompt of a shape kiln does not take; the message names the shapes it does."""


@dataclass
class Prompt:
    """One prompt: its text (None for token ids) or its token ids (None until encoded)."""

    text: str | None
    token_ids: list[int] | None


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _from_mapping(value: Mapping, where: str) -> Prompt:
    keys = set(value.keys())
    if keys == {"prompt"} and isinstance(value["prompt"], str):
        return Prompt(value["prompt"], None)
    if keys == {"prompt_token_ids"} and _is_token_ids(value["prompt_token_ids"]):
        return Prompt(None, [int(t) for t in value["prompt_token_ids"]])
    hint = ""
    if "input_ids" in keys:
        hint = ("; this looks like a transformers BatchEncoding: pass the texts themselves, or "
                "[{'prompt_token_ids': ids} for ids in enc['input_ids'].tolist()] (without padding)")
    raise PromptError(f"{where} is a mapping with keys {sorted(map(str, keys))}; a prompt is {_SHAPES}{hint}")


def one_prompt(value: Any, where: str = "a prompt") -> Prompt:
    if isinstance(value, str):
        return Prompt(value, None)
    if _is_token_ids(value):
        return Prompt(None, [int(t) for t in value])
    if isinstance(value, Mapping):
        return _from_mapping(value, where)
    if hasattr(value, "tolist"):
        raise PromptError(f"{where} is a {type(value).__name__}; pass token ids as a list (value.tolist()) or as "
                          "{'prompt_token_ids': ids}")
    raise PromptError(f"{where} is a {type(value).__name__} ({str(value)[:40]!r}); a prompt is {_SHAPES}")


def parse_prompts(prompts: Any) -> list[Prompt]:
    """One Prompt per request. A single string, mapping or flat list of ints is one prompt."""
    if isinstance(prompts, (str, Mapping)) or (_is_token_ids(prompts) and len(prompts) > 0):
        return [one_prompt(prompts)]
    if hasattr(prompts, "tolist") and not isinstance(prompts, (list, tuple)):
        return [one_prompt(prompts, "the prompts")]  # a tensor or array: refused with its hint
    if not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts is a {type(prompts).__name__}; pass {_SHAPES}")
    return [one_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
