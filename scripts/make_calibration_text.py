"""Write kiln/eval/data/calibration.txt: the default calibration text of `kiln quantize` / `kiln convert` for AWQ and
GPTQ, 60 evenly spaced passages of ~4,400 characters cut at paragraph breaks from the TRAINING portion of the
reference models' public-domain books (`.reference_data/train.txt`, written by scripts/reference/prepare_data.py).
Never from the held-out text (kiln/eval/data/heldout.txt), which perplexity is measured on.

    python scripts/make_calibration_text.py [--train .reference_data/train.txt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PASSAGES, CHARS = 60, 4400


def passages(text: str) -> list[str]:
    out = []
    for i in range(PASSAGES):
        start = text.find("\n\n", i * len(text) // PASSAGES) + 2  # begin at a paragraph
        end = text.rfind("\n\n", start, start + CHARS)
        out.append(text[start:end if end > start else start + CHARS].strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=Path, default=REPO / ".reference_data" / "train.txt")
    args = parser.parse_args()
    text = args.train.read_text(encoding="utf-8")
    held = (REPO / "kiln" / "eval" / "data" / "heldout.txt").read_text(encoding="utf-8")
    chosen = passages(text)
    assert not any(p[:200] in held for p in chosen), "a passage overlaps the held-out text"
    (REPO / "kiln" / "eval" / "data" / "calibration.txt").write_text("\n\n".join(chosen) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
