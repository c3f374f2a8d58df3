"""Cut training files to a few labelled rows: what a user with 100 labels in all has.

    python benchmarks/small_files.py OUT_DIR NAME=TRAIN.jsonl [NAME=TRAIN.jsonl ...] [--rows 100] [--seed 0]

Each TRAIN file is read as `finegrain train` reads it and cut to `--rows` rows, stratified by
label with `--seed` (`finegrain.data.split.stratified_subset`, as `data.max_train_examples` cuts
with seed 0), and written as OUT_DIR/NAME/train.jsonl. Other seeds draw other rows: the draws
of the few-shot variance section. docs/RESULTS.md's "With 100 labels in all" sections run
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


def cut(train: str | Path, rows: int, seed: int, folder: Path) -> tuple[int, int]:
    """Write `rows` rows of the TRAIN file, stratified by label with `seed`, as folder/train.jsonl;
    returns (rows written, rows read)."""
    examples = read_file(DataConfig(train=str(train)), str(train)).examples
    kept = stratified_subset(examples, rows, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n" for e in kept)
    (folder / "train.jsonl").write_text(text, encoding="utf-8")
    return len(kept), len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("files", nargs="+", metavar="NAME=TRAIN.jsonl")
    parser.add_argument("--rows", type=int, default=100, help="rows to keep per file (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    args = parser.parse_args()
    for spec in args.files:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"{spec}: give NAME=TRAIN.jsonl")
        kept, read = cut(path, args.rows, args.seed, args.output / name)
        print(f"{name}: {kept} of {read} rows -> {args.output / name / 'train.jsonl'}")


if __name__ == "__main__":
    main()
