"""Build a large long-document set from a smaller one, to check the recipe's time on it.

    python benchmarks/large_set.py bbc/train.jsonl bbc/test.jsonl OUT_DIR [--train-size 10000 --test-size 1792]

Each file's rows are repeated, every copy after the first with its sentences shuffled (seeded), up to
the asked size, and written shuffled as OUT_DIR/train.jsonl and OUT_DIR/test.jsonl. Test copies come
from the test file alone; validation split off the training file holds copies of training rows, so
the set checks time and plans, not accuracy (docs/RESULTS.md, "A large training set")."""

import argparse
import json
import random
import re
from pathlib import Path


def copies(path: Path, size: int, rng: random.Random) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    while len(out) < size:
        for row in rows[: size - len(out)]:
            sentences = re.split(r"(?<=[.!?]) ", row["text"])
            if len(out) >= len(rows):  # the first pass keeps each row as it is
                rng.shuffle(sentences)
            out.append({**row, "text": " ".join(sentences)})
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=1_792)
    args = parser.parse_args()
    rng = random.Random(0)
    args.output.mkdir(parents=True, exist_ok=True)
    for source, size, name in ((args.train, args.train_size, "train.jsonl"), (args.test, args.test_size, "test.jsonl")):
        rows = copies(source, size, rng)
        (args.output / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"{args.output / name}: {len(rows):,} rows")


if __name__ == "__main__":
    main()
