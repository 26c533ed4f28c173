"""Regenerate kiln/eval/data/aclsum_cc_by.jsonl and the paper list of ATTRIBUTION.md from the ACLSum wheel.

    pip download --no-deps aclsum==0.1.2 -d /tmp/aclsum
    python scripts/make_aclsum_subset.py /tmp/aclsum/aclsum-0.1.2-py3-none-any.whl

Keeps the papers from 2016 on, whose texts the ACL Anthology publishes under CC BY 4.0 (the wheel itself is MIT).
Document: the abstract, introduction and conclusion sentences (ACLSum ships them tokenized; they are detokenized to
plain text), one section per line. Reference: the challenge, approach and outcome summaries, one per line (so that
rougeLsum sees three sentences, as it sees cnn_dailymail's highlights).
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path

SPLITS = ("train", "val", "test")
SECTIONS = ("abstract", "introduction", "conclusion")
ASPECTS = ("challenge", "approach", "outcome")
OUT = Path(__file__).resolve().parent.parent / "kiln" / "eval" / "data"


def year(paper_id: str) -> int:
    """The year in an ACL Anthology id: old style `P16-1001` (letter, two-digit year: P93 is 1993), new style
    `2020.acl-main.1`."""
    old = re.match(r"^[A-Z](\d\d)-\d+$", paper_id)
    if old:
        yy = int(old.group(1))
        return (1900 if yy >= 50 else 2000) + yy
    new = re.match(r"^(\d{4})\.", paper_id)
    if new:
        return int(new.group(1))
    raise ValueError(f"cannot read the year of ACL Anthology id {paper_id!r}")


def detokenize(sentence: str) -> str:
    """Undo the PTB-style spacing of ACLSum's sentences ("a , b ( c ) d ." -> "a, b (c) d.")."""
    text = f" {sentence} ".replace(" `` ", ' "').replace(" '' ", '" ')
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def pairs(wheel: Path) -> list[dict[str, str]]:
    rows = []
    with zipfile.ZipFile(wheel) as z:
        for split in SPLITS:
            for line in z.read(f"aclsum/dataset/{split}.jsonl").decode("utf-8").splitlines():
                if not line.strip():
                    continue
                paper = json.loads(line)
                if year(paper["id"]) < 2016:
                    continue
                # a section at once: ACLSum's sentence splits sometimes leave a closing ")" and its "." in two sentences
                article = "\n".join(detokenize(" ".join(paper["sentences"][k])) for k in SECTIONS)
                highlights = "\n".join(paper["summary"][k].strip() for k in ASPECTS)
                rows.append({"id": paper["id"], "article": article, "highlights": highlights})
    return sorted(rows, key=lambda r: r["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="aclsum-0.1.2-py3-none-any.whl")
    parser.add_argument("--output_dir", type=Path, default=OUT)
    args = parser.parse_args()
    rows = pairs(args.wheel)
    with open(args.output_dir / "aclsum_cc_by.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} pairs; ids: {', '.join(r['id'] for r in rows)}")


if __name__ == "__main__":
    main()
