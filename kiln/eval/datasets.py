"""Summarization data for `kiln summarize`: the shipped ACLSum subset, a local copy of ccdv/cnn_dailymail 3.0.0 as
the Hugging Face hub lays it out, or a JSONL file with named fields. Nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kiln.config import ConfigError

SHIPPED = "aclsum_cc_by.jsonl"  # in kiln/eval/data; see ATTRIBUTION.md there
CNN_NAME = "ccdv/cnn_dailymail"
CNN_VERSION = "3.0.0"


@dataclass(frozen=True)
class SummaryExample:
    """One document to summarize and its reference summary (sentences separated by newlines, for rougeLsum)."""

    id: str
    article: str
    highlights: str


def shipped_path() -> Path:
    return Path(str(resources.files("kiln.eval") / "data" / SHIPPED))


def read_jsonl(path: str | Path, input_field: str = "article", reference_field: str = "highlights") -> list[
        SummaryExample]:
    """Every line of a JSONL file as an example; `input_field` and `reference_field` name the two texts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--dataset_path {path} does not exist; give a JSONL file with one object per line")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} line {number} is not JSON ({err.msg}); give one object per line") from err
            examples.append(_example(row, str(row.get("id", number)) if isinstance(row, dict) else "",
                                     input_field, reference_field, f"{path} line {number}"))
    if not examples:
        raise ConfigError(f"{path} holds no examples")
    return examples


def _example(row: object, ident: str, input_field: str, reference_field: str, where: str) -> SummaryExample:
    if not isinstance(row, dict):
        raise ConfigError(f"{where} is not a JSON object")
    for field in (input_field, reference_field):
        if not isinstance(row.get(field), str):
            fields = ", ".join(sorted(row)) or "none"
            raise ConfigError(f"{where} has no text field {field!r} (its fields: {fields}); name the fields with "
                              "--input_field and --reference_field")
    return SummaryExample(ident, row[input_field], row[reference_field])


def cnn_dailymail_files(dataset_dir: str | Path) -> list[Path]:
    """The test split's parquet or arrow files under `dataset_dir`, which is either the dataset's own directory or
    one holding `ccdv/cnn_dailymail` (summarize.py appends the name unless the path already ends with it). Several
    configs (1.0.0, 2.0.0, 3.0.0) may lie side by side: 3.0.0's files are taken then."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ConfigError(f"--dataset_dir {root} is not a directory; give a local copy of {CNN_NAME} "
                          f"{CNN_VERSION} (e.g. {CNN_VERSION}/test-00000-of-00001.parquet inside it)")
    if (root / CNN_NAME).is_dir():
        root = root / CNN_NAME
    files = [p for p in sorted(root.rglob("*")) if p.suffix in (".parquet", ".arrow") and _is_test_split(p, root)]
    versioned = [p for p in files if CNN_VERSION in p.relative_to(root).parts]
    files = versioned or files
    if not files:
        raise ConfigError(f"no test split of {CNN_NAME} in {root}: looked for parquet or arrow files named test* "
                          f"(e.g. {CNN_VERSION}/test-00000-of-00001.parquet, {CNN_VERSION}/test/0000.parquet, "
                          "cnn_dailymail-test.arrow)")
    return files


def _is_test_split(path: Path, root: Path) -> bool:
    name = path.stem.lower()
    in_test_dir = "test" in (part.lower() for part in path.relative_to(root).parts[:-1])
    return in_test_dir or name.startswith("test") or "-test" in name or "_test" in name


def _read_table(path: Path):  # -> pyarrow.Table
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        try:  # the datasets library writes arrow stream files; plain arrow files are read too
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err


def read_cnn_dailymail(dataset_dir: str | Path, input_field: str = "article",
                       reference_field: str = "highlights") -> list[SummaryExample]:
    """The test split of a local ccdv/cnn_dailymail 3.0.0 copy, in file order."""
    examples: list[SummaryExample] = []
    for path in cnn_dailymail_files(dataset_dir):
        table = _read_table(path)
        missing = [f for f in (input_field, reference_field) if f not in table.column_names]
        if missing:
            raise ConfigError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(table.column_names)}); "
                              "name the columns with --input_field and --reference_field")
        ids = table.column("id").to_pylist() if "id" in table.column_names else range(len(examples), len(
            examples) + table.num_rows)
        for ident, article, highlights in zip(ids, table.column(input_field).to_pylist(),
                                              table.column(reference_field).to_pylist()):
            examples.append(SummaryExample(str(ident), article or "", highlights or ""))
    return examples


def load_examples(dataset_dir: str | None, dataset_path: str | None, input_field: str = "article",
                  reference_field: str = "highlights") -> list[SummaryExample]:
    """--dataset_path (JSONL), else --dataset_dir (cnn_dailymail), else the shipped ACLSum subset."""
    if dataset_dir and dataset_path:
        raise ConfigError("give --dataset_dir or --dataset_path, not both")
    if dataset_path:
        return read_jsonl(dataset_path, input_field, reference_field)
    if dataset_dir:
        return read_cnn_dailymail(dataset_dir, input_field, reference_field)
    return read_jsonl(shipped_path())


def shuffled(examples: list[SummaryExample], seed: int) -> list[SummaryExample]:
    """The order summarize.py evaluates in: `datasets.Dataset.shuffle(seed)`, which takes
    `numpy.random.default_rng(seed).permutation(len(dataset))`."""
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[int(i)] for i in order]
