"""kiln's tokenizer interface and helpers shared by the backends."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any, Sequence

Messages = list[dict[str, str]]


class TokenizerError(ValueError):
    """A tokenizer directory or a tokenizer call that kiln cannot handle; the message says what to do."""


class ChatTemplateTooLarge(TokenizerError):
    """A chat template that would render more text than its budget (bounded_template.py)."""


class Tokenizer:
    """kiln's tokenizer interface; backends fill in `_encode`, `_encode_chat_text` and `decode`.

    `encode(text)` equals transformers' `tokenizer(text)["input_ids"]` for the published tokenizer.
    `pad_token_id` falls back to eos (as TensorRT-LLM's run.py does); `stop_token_ids` is eos plus
    generation_config.json's `eos_token_id` (int or list).
    """

    def __init__(self, *, bos: int | None, eos: int | None, pad: int | None, vocab_size: int,
                 generation_config: dict[str, Any], chat_template: str | None = None) -> None:
        self.bos_token_id = bos
        self.eos_token_id = eos
        self.pad_token_id = pad if pad is not None else eos
        self.vocab_size = vocab_size
        self.generation_config = generation_config
        self.chat_template = chat_template
        self.stop_token_ids = stop_ids(eos, generation_config.get("eos_token_id"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; without special tokens (no bos/eos) as transformers' add_special_tokens=False."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        return self._encode(text) if add_special_tokens else self._encode_chat_text(text)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_chat_text(self, text: str) -> list[int]:
        """Encode rendered chat text: special tokens in it are parsed, no bos/eos is added (as HF does)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def set_chat_template(self, template: str) -> None:
        """Use `template` (Jinja, as tokenizer_config.json's chat_template) instead of the tokenizer's own format."""
        self.chat_template = template

    @property
    def has_chat_format(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation, in the tokenizer's own chat format."""
        check_messages(messages)
        if self.chat_template is None:
            raise TokenizerError(
                "this tokenizer has no chat format: its tokenizer_config.json has no chat_template (and, for "
                "Baichuan, generation_config.json has no user_token_id/assistant_token_id); "
                "pass plain text prompts instead")
        return self._encode_chat_text(self._render(messages, add_generation_prompt))

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return render_chat_template(self.chat_template or "", messages, add_generation_prompt,
                                    self._template_tokens())

    def _template_tokens(self) -> dict[str, str]:
        return {}


def stop_ids(eos: int | None, generation_eos: Any) -> list[int]:
    ids: list[int] = [] if eos is None else [eos]
    extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    for i in extra:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TokenizerError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")


def render_chat_template(template: str, messages: Messages, add_generation_prompt: bool,
                         tokens: dict[str, str], **extra: Any) -> str:
    """Render a Jinja chat template the way transformers does (sandboxed, trim/lstrip blocks), with the rendered text
    bounded to the messages' own text plus TEMPLATE_OVERHEAD_CHARS (bounded_template.py says how)."""
    from jinja2 import TemplateError

    from kiln.tokenizer.bounded_template import (TEMPLATE_OVERHEAD_CHARS, BoundedSandbox, TemplateTooLarge,
                                                 render_bounded)

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template rejected the messages: {message}")

    budget = sum(len(m.get("content", "")) for m in messages) + TEMPLATE_OVERHEAD_CHARS
    # As transformers' own environment: loop controls and strftime_now, so that templates render the same here.
    env = BoundedSandbox(budget, trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return render_bounded(env, template, messages=messages, add_generation_prompt=add_generation_prompt,
                              **tokens, **extra)
    except TemplateTooLarge as e:
        raise ChatTemplateTooLarge(f"the chat template renders too much text ({e}); it is refused before "
                                   "tokenizing: check chat_template in tokenizer_config.json") from e
    except TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from e


def clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization, applied when the config asks for it.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a str or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def split_on_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """Split text into plain chunks and special token ids (longest special first), as HF's trie does."""
    if not specials:
        return [text] if text else []
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    parts: list[str | int] = []
    pos = 0
    for m in re.finditer(pattern, text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        parts.append(specials[m.group(0)])
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); fix or remove the file") from e
    return data if isinstance(data, dict) else {}
