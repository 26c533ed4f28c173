"""Backend 1: a transformers fast tokenizer (tokenizer.json), loaded with trust_remote_code=False."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kiln.tokenizer.base import ChatTemplateTooLarge, Messages, Tokenizer, TokenizerError, render_chat_template


class HFTokenizer(Tokenizer):
    """A transformers (fast) tokenizer loaded from tokenizer.json without remote code."""

    def __init__(self, hf: Any, generation_config: dict[str, Any]) -> None:
        self.hf = hf
        template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
        super().__init__(bos=hf.bos_token_id, eos=hf.eos_token_id, pad=hf.pad_token_id, vocab_size=len(hf),
                         generation_config=generation_config, chat_template=template)

    def set_chat_template(self, template: str) -> None:
        super().set_chat_template(template)
        self.hf.chat_template = template  # transformers renders it (see _render)

    def _encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def _encode_chat_text(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        # transformers renders without any bound on the output: render first in kiln's bounded sandbox (same Jinja
        # environment) so that a template that would make gigabytes is refused before transformers runs it. Other
        # errors are left to transformers' render, whose text (tojson and all) is the one used.
        try:
            render_chat_template(self.chat_template or "", messages, add_generation_prompt,
                                 dict(self.hf.special_tokens_map))
        except ChatTemplateTooLarge:
            raise
        except TokenizerError:
            pass
        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tokenize=False)
        except Exception as e:  # jinja errors and raise_exception() from the template
            raise TokenizerError(f"chat template failed for these messages: {e}") from e

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = self.vocab_size
        return self.hf.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=skip_special_tokens)


def load_hf(path: Path, config: dict[str, Any], generation_config: dict[str, Any]) -> Tokenizer:
    import transformers

    errors = []
    # An auto_map names remote code; AutoTokenizer would refuse (or run it), so read tokenizer.json directly.
    if "auto_map" not in config:
        try:
            hf = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            return HFTokenizer(hf, generation_config)
        except Exception as e:  # unknown tokenizer_class, config.json needing remote code, ...
            errors.append(f"AutoTokenizer: {e}")
    try:
        hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(path), trust_remote_code=False)
        return HFTokenizer(hf, generation_config)
    except Exception as e:
        errors.append(f"PreTrainedTokenizerFast: {e}")
    raise TokenizerError(f"could not load {path}/tokenizer.json with transformers: " + "; ".join(errors))


def load_hf_builtin(path: Path, generation_config: dict[str, Any], looked_for: str) -> Tokenizer:
    """A tokenizer without tokenizer.json whose class transformers itself provides (no remote code)."""
    import transformers

    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise TokenizerError(f"transformers could not load the tokenizer in {str(path)!r} without remote code: "
                             f"{e}. kiln looked for: {looked_for}") from e
    return HFTokenizer(hf, generation_config)
