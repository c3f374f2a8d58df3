"""Write the bundled classification sets' splits, as docs/RESULTS.md's tables use them, to JSONL.

    python benchmarks/dump_splits.py DIR

For each set (rt, trec, trecfine, sms, cn, vader): the main job's stratified 65/10/25 split with
seed 0, training capped at 2,000 examples and validation and test at 1,000 each, written as
DIR/<set>_{train,validation,test}.jsonl ({"text", "label"} per line). benchmarks/head_init.sh
reads them (and DIR/bbc_train.jsonl, bbc_test.jsonl, bbcimb_train.jsonl where present: the
held-out BBC files of docs/RESULTS.md, made as it says).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import finegrain.datasets
from finegrain.config import RunConfig
from finegrain.data.load import load_splits

SETS = {
    "rt": {"dataset": "rotten_tomatoes"},
    "trec": {"dataset": "trec", "dataset_options": {"fine": False}},
    "trecfine": {"dataset": "trec", "dataset_options": {"fine": True}},
    "sms": {"dataset": "sms_spam"},
    "cn": {"dataset": "chinese_reviews"},
    "vader": {"dataset": "vader_binary"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for name, keys in SETS.items():
        config = RunConfig()
        for key, value in keys.items():
            setattr(config.data, key, value)
        config.data.split, config.data.split_seed = [0.65, 0.1, 0.25], 0
        config.data.max_train_examples, config.data.max_eval_examples = 2000, 1000
        splits = load_splits(config.data, datasets_module=finegrain.datasets)
        for part in ("train", "validation", "test"):
            rows = (json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n" for e in getattr(splits, part))
            (args.output / f"{name}_{part}.jsonl").write_text("".join(rows), encoding="utf-8")
        print(name, len(splits.train), len(splits.validation), len(splits.test))


if __name__ == "__main__":
    main()
