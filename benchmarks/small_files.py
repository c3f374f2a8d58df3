"""Cut training files to a few labelled rows: what a user with 100 labels in all has.

    python benchmarks/small_files.py OUT_DIR NAME=TRAIN.jsonl [NAME=TRAIN.jsonl ...] [--rows 100]

Each TRAIN file is read as `finegrain train` reads it and cut to `--rows` rows, stratified by
label with seed 0 (`finegrain.data.split.stratified_subset`, as `data.max_train_examples` cuts),
and written as OUT_DIR/NAME/train.jsonl. docs/RESULTS.md's "With 100 labels in all" sections run
the recipe on them with no config, the recipe taking 10 of the 100 for validation:

    python benchmarks/classification_results.py --files OUT_DIR/NAME/train.jsonl TEST.jsonl \\
        --name NAME --only recipe --max-train 0 --max-eval 0 --output runs/NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finegrain.config import DataConfig
from finegrain.data.load import read_file
from finegrain.data.split import stratified_subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("files", nargs="+", metavar="NAME=TRAIN.jsonl")
    parser.add_argument("--rows", type=int, default=100)
    args = parser.parse_args()
    for spec in args.files:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"{spec}: give NAME=TRAIN.jsonl")
        examples = read_file(DataConfig(train=path), path).examples
        rows = stratified_subset(examples, args.rows, seed=0)
        folder = args.output / name
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n" for e in rows)
        (folder / "train.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(rows)} of {len(examples)} rows -> {folder / 'train.jsonl'}")


if __name__ == "__main__":
    main()
