"""Unigram perplexity of the held-out text under each reference model's tokenizer: the perplexity of the best
context-free model of those very tokens (each token's probability = its frequency in them), the bar a trained model
must beat by at least 5x (docs/models/reference.md).

    python scripts/reference/unigram.py [--text kiln/eval/data/heldout.txt] [--max_tokens N]
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from kiln.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def unigram_perplexity(ids: list[int]) -> float:
    counts = Counter(ids)
    n = len(ids)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return math.exp(entropy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=REPO / "kiln" / "eval" / "data" / "heldout.txt")
    parser.add_argument("--max_tokens", type=int, default=None, help="only the first N tokens (as kiln perplexity)")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    for name in ("dbrx-books", "mpt-books", "baichuan2-books"):
        ids = load_tokenizer(REPO / "models" / name).encode(text)[:args.max_tokens]
        print(f"{name:16s} {len(ids):>8,d} tokens  unigram perplexity {unigram_perplexity(ids):8.1f}")


if __name__ == "__main__":
    main()
