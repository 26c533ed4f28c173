"""What the server process knows of the model, read from the engine directory without the weights: the build limits,
the model's config (vocabulary, end tokens) and the tokenizer (prompts, chat template, token texts). The weights live
in the engine process only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.sampling_params import SamplingParams


@dataclass
class ServedModel:
    """The engine's info (config.json: model, build, mapping) and its tokenizer (None: token ids only)."""

    info: Any
    tokenizer: Any

    @classmethod
    def load(cls, engine_dir: str, tokenizer_dir: str | None, chat_template: str | None) -> "ServedModel":
        """The engine's config and tokenizer as kiln.LLM reads them (the same files, the same errors), no weights."""
        from kiln.checkpoint.kiln_format import load_artifact
        from kiln.llm import engine_tokenizer

        info = load_artifact(engine_dir, "engine")
        tokenizer = engine_tokenizer(engine_dir, tokenizer_dir)
        if chat_template is not None and tokenizer is not None:
            tokenizer.set_chat_template(Path(chat_template).read_text(encoding="utf-8"))
        return cls(info, tokenizer)

    @property
    def build(self) -> Any:
        return self.info.build

    @property
    def vocab_size(self) -> int:
        return self.info.model.vocab_size

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        from kiln.llm import request_stop_ids

        return request_stop_ids(params, self.tokenizer, self.info.model.eos_token_id)
