"""Classification inference: finegrain's Predictor against transformers+PEFT with the same adapter.

    python benchmarks/predict.py [--quick] [RUN_DIR] [--batch-size 32]

Without RUN_DIR, a short run of examples/rotten_tomatoes.yaml (20 kept layers, LoRA on all
linear layers of the top 6) is trained first on the first 1,000 examples of the peer's
Rotten Tomatoes split (`--quick`: 200), in its own process; the texts to label are the
split's last 1,000 (`--quick`: 200), which the run never saw. With RUN_DIR (a finegrain
classification run directory) the texts are the same test rows.

finegrain: `finegrain.load(run).predict(texts, batch_size)` (length-sorted batches, no
padding work, the head on the last real token). transformers: `LlamaForSequenceClassification`
on the same base (the GGUF dequantized to float32, or the Hugging Face directory the run
names; cut to the run's `model.num_layers`) with `PeftModel.from_pretrained(run/adapter)`,
batches of the same size in the given order, left padding, tokenized by its own tokenizer.
Each side runs in its own process; one warm-up batch each is not timed, model loading is
timed separately. The two must agree: the output shows both accuracies, the share of equal
labels and the largest probability difference.
Last line: `predict speedup vs transformers+peft: xR.RR (...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, matmul_ceiling_gflops, peak_rss_mb, print_facts, run_side, write_peer_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "rotten_tomatoes.yaml"


def held_out_texts(n: int) -> list[str]:
    from finegrain.datasets import rotten_tomatoes_peer_split

    return [e.text for e in rotten_tomatoes_peer_split(0, n)[1]]


def train_side(args) -> dict:
    """Train the recipe on the peer split's first `--train` examples into the run directory `args.run`."""
    from finegrain.config import load_config
    from finegrain.run import train

    with tempfile.TemporaryDirectory() as tmp:
        train_path, _ = write_peer_split(Path(tmp), args.train, 1)
        config = load_config(RECIPE)
        config.data.dataset, config.data.train, config.data.split = None, str(train_path), [1.0, 0.0, 0.0]
        config.output = args.run
        results = train(config, progress=False)
    return {"train_seconds": results["train"]["train_seconds"]}


def finegrain_side(args) -> dict:
    import finegrain

    texts = held_out_texts(args.texts)
    start = time.perf_counter()
    predictor = finegrain.load(args.run)
    load_s = time.perf_counter() - start
    predictor.predict(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    predictions = predictor.predict(texts, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    labels = predictor.task.labels
    return {
        "load_s": round(load_s, 2),
        "seconds": round(seconds, 2),
        "labels": [p["label"] for p in predictions],
        "probabilities": [[p["probabilities"][label] for label in labels] for p in predictions],
        "peak_rss_mb": round(peak_rss_mb()),
    }


def peer_side(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finegrain.checkpoint.load import resolve_model
    from finegrain.run import load_run_config

    texts = held_out_texts(args.texts)
    config = load_run_config(args.run)
    labels = json.loads(Path(args.run, "labels.json").read_text(encoding="utf-8"))
    start = time.perf_counter()
    base = resolve_model(config.model.name)
    source = {"pretrained_model_name_or_path": base.parent, "gguf_file": base.name} if base.is_file() else {
        "pretrained_model_name_or_path": base}
    cut = {"num_hidden_layers": config.model.num_layers} if config.model.num_layers else {}
    tok = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForSequenceClassification.from_pretrained(**source, num_labels=len(labels), dtype=torch.float32, **cut)
    tok.pad_token_id = model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(model, Path(args.run, "adapter")).eval()
    load_s = time.perf_counter() - start

    def label(batch: list[str]) -> torch.Tensor:
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=config.data.max_length)
        return model(**enc).logits.float().softmax(-1)

    with torch.no_grad():
        label(texts[: args.batch_size])  # warm-up
        start = time.perf_counter()
        probabilities = torch.cat([label(texts[i : i + args.batch_size]) for i in range(0, len(texts), args.batch_size)])
        seconds = time.perf_counter() - start
    return {
        "load_s": round(load_s, 2),
        "seconds": round(seconds, 2),
        "labels": [labels[i] for i in probabilities.argmax(-1).tolist()],
        "probabilities": probabilities.tolist(),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a finegrain classification run directory (default: train a short one)")
    parser.add_argument("--quick", action="store_true", help="under 2 minutes: 200 training examples, 200 texts")
    parser.add_argument("--batch-size", type=int, default=32, help="both sides (default 32)")
    parser.add_argument("--train", type=int, default=None, help="training examples of the short run (default 1000)")
    parser.add_argument("--texts", type=int, default=None, help="texts to label (default 1000)")
    parser.add_argument("--side", choices=["train", "finegrain", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train = args.train or (200 if args.quick else 1000)
    args.texts = args.texts or (200 if args.quick else 1000)
    if args.side:
        sides = {"train": train_side, "finegrain": finegrain_side, "peer": peer_side}
        print(json.dumps(sides[args.side](args)))
        return

    from finegrain.datasets import rotten_tomatoes_peer_split

    facts = machine_facts()
    print_facts(facts)
    print(f"matmul ceiling: {matmul_ceiling_gflops():.1f} GFLOP/s; {args.texts} texts, batch size {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or str(Path(tmp, "run"))
        if args.run is None:
            trained = run_side(__file__, "train", [run, "--train", str(args.train)])
            print(f"trained {RECIPE.relative_to(ROOT)} on {args.train} examples in {trained['train_seconds']:.1f} s")
        passed = [run, "--texts", str(args.texts), "--batch-size", str(args.batch_size)]
        sides = {"finegrain": run_side(__file__, "finegrain", passed), "transformers+peft": run_side(__file__, "peer", passed)}
    gold = [e.label for e in rotten_tomatoes_peer_split(0, args.texts)[1]]
    print(f"{'':>18} {'examples/s':>11} {'predict s':>10} {'load s':>7} {'peak RSS MB':>12} {'accuracy':>9}")
    for name, r in sides.items():
        accuracy = sum(p == g for p, g in zip(r["labels"], gold)) / len(gold)
        print(f"{name:>18} {len(gold) / r['seconds']:>11.1f} {r['seconds']:>10.1f} {r['load_s']:>7.1f} "
              f"{r['peak_rss_mb']:>12} {accuracy:>9.3f}")
    ours, peer = sides["finegrain"], sides["transformers+peft"]
    agree = sum(a == b for a, b in zip(ours["labels"], peer["labels"])) / len(gold)
    gap = max(abs(a - b) for x, y in zip(ours["probabilities"], peer["probabilities"]) for a, b in zip(x, y))
    print(f"predict speedup vs transformers+peft: x{peer['seconds'] / ours['seconds']:.2f} "
          f"(same labels {agree:.1%}, largest probability difference {gap:.1e}, peak RSS x{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f})")


if __name__ == "__main__":
    main()
