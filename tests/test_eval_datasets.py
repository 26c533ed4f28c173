"""Summarization data: the cnn_dailymail readers on files written here in the hub's layouts, JSONL, the shipped
ACLSum subset, and summarize.py's prompt, truncation and batching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.config import ConfigError
from kiln.eval.datasets import load_examples, read_cnn_dailymail, read_jsonl, shipped_path, shuffled
from kiln.eval.summarize import batches, encode_prompt, prompt_text


def cnn_table(tag: str, n: int) -> pa.Table:
    return pa.table({"article": [f"{tag} article {i}" for i in range(n)],
                     "highlights": [f"{tag} summary {i}.\nsecond line" for i in range(n)],
                     "id": [f"{tag}{i:03d}" for i in range(n)]})


@pytest.fixture()
def hub_copy(tmp_path) -> Path:
    """ccdv/cnn_dailymail as the hub lays it out, with the 3.0.0 test split in two shards beside other splits and
    another config's test split that must not be read."""
    root = tmp_path / "datasets" / "ccdv" / "cnn_dailymail"
    (root / "3.0.0").mkdir(parents=True)
    (root / "1.0.0").mkdir(parents=True)
    pq.write_table(cnn_table("a", 3), root / "3.0.0" / "test-00000-of-00002.parquet")
    pq.write_table(cnn_table("b", 2), root / "3.0.0" / "test-00001-of-00002.parquet")
    pq.write_table(cnn_table("train", 4), root / "3.0.0" / "train-00000-of-00001.parquet")
    pq.write_table(cnn_table("val", 4), root / "3.0.0" / "validation-00000-of-00001.parquet")
    pq.write_table(cnn_table("old", 4), root / "1.0.0" / "test-00000-of-00001.parquet")
    return tmp_path / "datasets"


def test_cnn_dailymail_parquet_in_hub_layout(hub_copy):
    expected = [f"a{i:03d}" for i in range(3)] + [f"b{i:03d}" for i in range(2)]
    # summarize.py's --dataset_dir: the directory holding ccdv/cnn_dailymail, or that directory itself
    for root in (hub_copy, hub_copy / "ccdv" / "cnn_dailymail"):
        examples = read_cnn_dailymail(root)
        assert [e.id for e in examples] == expected
    assert examples[4].article == "b article 1" and examples[4].highlights == "b summary 1.\nsecond line"
    assert [e.id for e in load_examples(str(hub_copy), None)] == expected


def test_cnn_dailymail_arrow_stream_as_datasets_caches_it(tmp_path):
    table = cnn_table("s", 3)
    cache = tmp_path / "ccdv___cnn_dailymail" / "3.0.0" / "0123abcd"
    cache.mkdir(parents=True)
    with pa.OSFile(str(cache / "cnn_dailymail-test.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with pa.OSFile(str(cache / "cnn_dailymail-train.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(cnn_table("train", 1))
    assert [e.id for e in read_cnn_dailymail(tmp_path)] == ["s000", "s001", "s002"]


def test_cnn_dailymail_errors(tmp_path, hub_copy):
    with pytest.raises(ConfigError, match="is not a directory"):
        read_cnn_dailymail(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no test split of ccdv/cnn_dailymail"):
        read_cnn_dailymail(_empty(tmp_path))
    with pytest.raises(ConfigError, match="no column 'document'.*--input_field"):
        read_cnn_dailymail(hub_copy, input_field="document")


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty" / "3.0.0").mkdir(parents=True)
    (tmp_path / "empty" / "3.0.0" / "README.md").write_text("no data")
    return tmp_path / "empty"


def test_jsonl_with_named_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"doc": "one", "ref": "r1"}) + "\n\n" + json.dumps({"doc": "two", "ref": "r2",
                                                                                   "id": "x"}) + "\n")
    examples = read_jsonl(path, "doc", "ref")
    assert [(e.id, e.article, e.highlights) for e in examples] == [("1", "one", "r1"), ("x", "two", "r2")]
    with pytest.raises(ConfigError, match=r"line 1 has no text field 'article' \(its fields: doc, ref\)"):
        read_jsonl(path)
    path.write_text('{"article": "a", "highlights": "b"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        read_jsonl(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="not both"):
        load_examples(str(tmp_path), str(path))


def test_shipped_aclsum_subset():
    examples = load_examples(None, None)
    assert len(examples) == 112 and len({e.id for e in examples}) == 112
    attribution = (shipped_path().parent / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "MIT" in attribution
    for e in examples:
        old = re.match(r"^[A-Z](\d\d)-\d+$", e.id)
        year = 2000 + int(old.group(1)) if old else int(e.id[:4])
        assert 2016 <= year <= 2022 and (not old or int(old.group(1)) < 50), e.id
        assert e.id in attribution
        assert len(e.article) > 500 and " ," not in e.article and " ." not in e.article
        assert len(e.highlights.split("\n")) == 3


def test_prompt_truncation_and_batches():
    assert prompt_text(" He did n't go.") == "He didn't go. TL;DR:"  # summarize.py strips the ends only

    class Tok:  # a tokenizer that adds a BOS (9) in front of one id per character
        def encode(self, text: str) -> list[int]:
            return [9] + [ord(c) for c in text]

    ids = encode_prompt(Tok(), "abcdef", 4)
    assert ids == [9, ord("d"), ord("e"), ord("f")]  # the tail, BOS kept, as transformers' left truncation
    assert encode_prompt(Tok(), "ab", 4) == [9, ord("a"), ord("b")]
    examples = load_examples(None, None)[:7]
    assert [len(b) for b in batches(examples, 3, 20)] == [3, 3, 1]
    assert [len(b) for b in batches(examples, 3, 2)] == [3, 3]
    order = shuffled(examples, 0)
    assert sorted(e.id for e in order) == sorted(e.id for e in examples) and order == shuffled(examples, 0)
    assert order != shuffled(examples, 1)
