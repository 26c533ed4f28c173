"""Incremental detokenisation of generated token ids (streaming text)."""

from __future__ import annotations

from typing import Sequence

from kiln.tokenizer.base import Tokenizer


class IncrementalDetokenizer:
    """Streams the text of generated ids: `add(id)` returns the newly completed text, `flush()` the rest.

    Like vLLM's detokenizer it decodes only a short window (prefix_offset..end) per token and returns the
    part past the previously emitted text (read_offset); text ending in U+FFFD (an incomplete UTF-8
    character) is held back. The pieces concatenate to `tokenizer.decode(output_ids, skip_special_tokens)`,
    i.e. the text of the output alone (the prompt ids are kept for callers, not decoded), except where a
    decoder rewrites earlier text (clean_up_tokenization_spaces, Baichuan's spaces before special tokens
    when they are not skipped).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(output_ids[prefix_offset:read_offset])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.output_ids.append(int(token_id))
        new_text = self._decode(self.output_ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        piece = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.output_ids)
        self._prefix_text = self._decode(self.output_ids[self._prefix_offset:self._read_offset])
        return piece

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the end); call once at the end."""
        new_text = self._decode(self.output_ids[self._prefix_offset:])
        piece = new_text[len(self._prefix_text):] if len(new_text) > len(self._prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self.output_ids)
        self._prefix_text = ""
        return piece
