"""Backend 2: Baichuan v1/v2 SentencePiece tokenizer and chat formats, without the remote code."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kiln.tokenizer.base import (Messages, Tokenizer, TokenizerError, check_messages, clean_up_tokenization,
                                 read_json, split_on_specials, token_content)

# Facts from the published files (checked with the search tool):
# - tokenization_baichuan.py (Baichuan2-13B-Chat, as copied into vLLM's transformers_utils/tokenizers/
#   baichuan.py; the v1-based copy in DSXiangLi/LongBaichuan has the same defaults): class defaults
#   add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False;
#   encode = sp.encode per text chunk between special tokens, then [bos] + ids + [eos] per the flags;
#   convert_tokens_to_string decodes runs of ordinary pieces with sentencepiece and writes special tokens
#   as text, with a " " before a special token that follows an ordinary one (not at position 0).
# - tokenizer_config.json sets add_bos_token=false and add_eos_token=false in all of Baichuan-7B (@8f9e37a),
#   Baichuan-13B-Base (@3a34ce6), Baichuan-13B-Chat and Baichuan2-13B-Chat (@c6f8592); Baichuan-7B issue #48
#   confirms no bos is added. An early copy of Baichuan-13B-Chat's config (quoted in a FastChat write-up)
#   lacks both keys, so the class default (bos added) applied there: kiln follows the directory, as the
#   published code does. pad_token is "<unk>" (13B-Chat, Baichuan2), null (13B-Base) or "<pad>" (7B).
# - Special tokens in text are split as transformers 4.29-4.33 did (the releases of these models): the
#   AddedToken lstrip/rstrip flags apply, single_word is ignored (slow tokenizers ignored it then).
BAICHUAN_CLASSES = ("BaichuanTokenizer", "BaiChuanTokenizer")
BAICHUAN2_VOCAB = 125696  # Baichuan2's vocabulary; v1 has 64000 (vLLM tells the versions apart the same way).


class BaichuanTokenizer(Tokenizer):
    """Baichuan v1/v2 SentencePiece tokenizer with the ids and decoding of `tokenization_baichuan.py`."""

    def __init__(self, path: Path, config: dict[str, Any], generation_config: dict[str, Any]) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        names = {k: token_content(config.get(f"{k}_token", d))
                 for k, d in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", None))}
        ids = {k: self._piece_id(v) for k, v in names.items()}
        self.specials = {names[k]: ids[k] for k in names if names[k] is not None and ids[k] is not None}
        self.special_ids = set(self.specials.values())
        self.strip = {ids[k]: _strip_flags(config.get(f"{k}_token")) for k in names if ids[k] is not None}
        self.chat_style = _baichuan_chat_style(path, config, generation_config, self.sp.get_piece_size())
        template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        self.names = names
        super().__init__(bos=ids["bos"], eos=ids["eos"], pad=ids["pad"], vocab_size=self.sp.get_piece_size(),
                         generation_config=generation_config, chat_template=template)

    def _piece_id(self, piece: str | None) -> int | None:
        # A token string missing from the vocabulary (Baichuan-7B's "<pad>") maps to no id: an id past the
        # vocabulary would index past the embedding, so such a pad falls back to eos.
        if piece is None:
            return None
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def _encode_body(self, text: str) -> list[int]:
        parts = split_on_specials(text, self.specials)
        for k, part in enumerate(parts):  # AddedToken lstrip/rstrip eat whitespace next to the token
            if isinstance(part, int):
                lstrip, rstrip = self.strip.get(part, (False, False))
                if lstrip and k > 0 and isinstance(parts[k - 1], str):
                    parts[k - 1] = parts[k - 1].rstrip()  # type: ignore[union-attr]
                if rstrip and k + 1 < len(parts) and isinstance(parts[k + 1], str):
                    parts[k + 1] = parts[k + 1].lstrip()  # type: ignore[union-attr]
        ids: list[int] = []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def _encode(self, text: str) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos and self.eos_token_id is not None else []
        return bos + self._encode_body(text) + eos

    def _encode_chat_text(self, text: str) -> list[int]:
        return self._encode_body(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = self.vocab_size
        ids = [int(i) for i in ids if 0 <= int(i) < n]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        out, run, prev_special = "", [], False
        for k, i in enumerate(ids):
            if i in self.special_ids:
                if not prev_special and k != 0:
                    out += " "
                out += self.sp.decode(run) + self.sp.id_to_piece(i)
                run, prev_special = [], True
            else:
                run.append(i)
                prev_special = False
        out += self.sp.decode(run)
        return clean_up_tokenization(out) if self.clean_up else out

    def _template_tokens(self) -> dict[str, str]:
        return {f"{k}_token": v for k, v in self.names.items() if v}

    @property
    def has_chat_format(self) -> bool:
        return self.chat_template is not None or self.chat_style is not None

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """A chat_template from tokenizer_config.json if there is one, else Baichuan's user/assistant ids."""
        if self.chat_template is not None or self.chat_style is None:
            return super().apply_chat_template(messages, add_generation_prompt)
        check_messages(messages)
        user = int(self.generation_config["user_token_id"])
        assistant = int(self.generation_config["assistant_token_id"])
        if self.chat_style == 2:
            return _baichuan2_chat(self, messages, add_generation_prompt, user, assistant)
        eos = self.generation_config.get("eos_token_id")
        eos = eos if isinstance(eos, int) else self.eos_token_id
        return _baichuan1_chat(self, messages, add_generation_prompt, user, assistant, int(eos))


def _strip_flags(value: Any) -> tuple[bool, bool]:
    if isinstance(value, dict):
        return bool(value.get("lstrip", False)), bool(value.get("rstrip", False))
    return False, False


def _baichuan_chat_style(path: Path, config: dict[str, Any], generation_config: dict[str, Any],
                         sp_size: int) -> int | None:
    """2 for Baichuan2's build_chat_input, 1 for Baichuan-13B-Chat's _build_chat_input, None if no chat ids."""
    if "user_token_id" not in generation_config or "assistant_token_id" not in generation_config:
        return None
    model_config = read_json(path / "config.json")
    # Baichuan2 configs carry z_loss_weight and a 125696 vocabulary; v1 configs have neither.
    is_v2 = (sp_size == BAICHUAN2_VOCAB or model_config.get("vocab_size") == BAICHUAN2_VOCAB
             or "z_loss_weight" in model_config)
    return 2 if is_v2 else 1


def _baichuan1_chat(tok: Tokenizer, messages: Messages, add_generation_prompt: bool, user: int,
                    assistant: int, eos: int) -> list[int]:
    """Baichuan-13B-Chat's `_build_chat_input` (modeling_baichuan.py): rounds are built from the end;
    assistant turns end with eos; assistant turns before the first user turn are dropped, as there.
    kiln does not truncate here (the engine checks max_input_len and says so)."""
    total: list[int] = []
    pending: list[int] = []
    for m in reversed(messages):
        content = tok.encode(m["content"])
        if m["role"] == "user":
            total = [user] + content + pending + total
            pending = []
        elif m["role"] == "assistant":
            pending = [assistant] + content + [eos] + pending
        else:
            raise TokenizerError(f"Baichuan-13B-Chat's chat format has roles 'user' and 'assistant' only, "
                                 f"got {m['role']!r}")
    return total + ([assistant] if add_generation_prompt else [])


def _baichuan2_chat(tok: Tokenizer, messages: Messages, add_generation_prompt: bool, user: int,
                    assistant: int) -> list[int]:
    """Baichuan2's `build_chat_input` (generation_utils.py): optional leading system text, then each turn
    as [user|assistant id] + content (no eos), then the assistant id unless the last turn is the assistant's."""
    system = ""
    body: list[int] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i != 0:
                raise TokenizerError("Baichuan2's chat format takes a system message only as the first message")
            system = m["content"]
            continue
        if role not in ("user", "assistant"):
            raise TokenizerError(f"Baichuan2's chat format has roles 'system', 'user', 'assistant'; got {role!r}")
        body += [user if role == "user" else assistant] + tok.encode(m["content"])
    tail = [assistant] if add_generation_prompt and messages[-1]["role"] != "assistant" else []
    return tok.encode(system) + body + tail
