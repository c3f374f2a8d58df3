"""LoRA sequence classification on Rotten Tomatoes: finegrain against transformers+PEFT, one run.

    python benchmarks/train_classification.py [--quick] [--train 2000] [--epochs 2] [--bf16] [--pairs 1]
                                              [--seeds N] [--max-length 64]

Both sides use the same data (the peer's split: fresh/rotten rows shuffled with
random.seed(0), the first N train, the last 1,000 test), the default model (the SmolLM2 GGUF,
dequantized to float32), LoRA r=8 alpha=16 dropout=0.05 on q_proj/v_proj of every layer, a
linear head on the last token, AdamW lr 3e-4 without warmup, decay or clipping, batch 16,
at most 64 tokens, seed 0. The peer side is /work/shared/peer/hf_peft_rotten_tomatoes.py's
loop. Each side runs in its own process; the table shows training tokens/s (real tokens,
padding not counted), training wall time, peak RSS, test accuracy and macro-F1, and the
share of the machine's matmul ceiling that training reaches (4 FLOPs per base parameter per
token; a float32 count, so bf16 runs can pass 100%). `--bf16` adds both sides under bf16
autocast (finegrain's `train.bf16`, an opt-in approximation that pays on CPUs with native
bf16; the peer's forward in `torch.autocast`) and their ratios. Last line: `train speedup vs
transformers+peft: X.XX (accuracy A.AAA vs B.BBB)`, float32 against float32. A shared host
drifts by ±10-20% over minutes; `--pairs N` runs N float32 pairs one after the other
(finegrain, peer, finegrain, peer, ...), prints each pair's ratios, and the last line gives
the median pair's ratio and all N.

`--max-length 256` or `512` trains and tests both sides on texts that long: Rotten Tomatoes
snippets of one label joined until each text passes that length, then cut at it by both
tokenizers (`common.benchmark_split`; the tokens/text column shows what each side read). The
peer then accumulates each batch of 16 over micro-batches of at most 2,048 tokens (the same
gradient; 16 x 512 tokens of activations would not fit beside other work). `--seeds N` runs
N pairs with seeds 0 .. N-1 on both sides (LoRA and head initialisation, dropout, batch order)
and reports each side's test accuracy and macro-F1 as mean ± std (sample std) and the speed
ratio as the median pair.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import statistics  # noqa: E402

from finegrain.cpu import quiet_openmp  # noqa: E402

from common import (  # noqa: E402
    SMOLLM2_LAYERS, ceiling_share, finegrain_classification, machine_facts, matmul_ceiling_gflops,
    peer_classification, print_facts, run_side,
)


def finegrain_side(args) -> dict:
    return finegrain_classification(args.train, args.test, args.epochs, max_length=args.max_length, seed=args.seed,
                                    bf16=args.bf16)


def peer_side(args) -> dict:
    return peer_classification(args.train, args.test, args.epochs, bf16=args.bf16, max_length=args.max_length,
                               seed=args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 training and 128 test examples, 1 epoch (under 2 minutes)")
    parser.add_argument("--train", type=int, default=None, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=None, help="test examples (default 1000)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2")
    parser.add_argument("--bf16", action="store_true",
                        help="also run finegrain with train.bf16 (bf16 autocast, an opt-in approximation; CPUs with native bf16)")
    parser.add_argument("--pairs", type=int, default=1, help="float32 (finegrain, peer) pairs to run in turn (default 1)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="run N pairs with seeds 0..N-1 and report each side's test accuracy as mean ± std")
    parser.add_argument("--max-length", type=int, default=64,
                        help="tokens per text (default 64); above 64 both sides read Rotten Tomatoes snippets "
                             "of one label joined to that length")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["finegrain", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs: must be at least 1, got {args.pairs}")
    if args.seeds is not None and (args.seeds < 1 or args.pairs > 1):
        parser.error("--seeds: give a number of seeds of at least 1, and not together with --pairs")
    if not 2 <= args.max_length <= 2048:
        parser.error(f"--max-length: must be between 2 and 2048, got {args.max_length}")
    args.train = args.train or (128 if args.quick else 2000)
    args.test = args.test or (128 if args.quick else 1000)
    args.epochs = args.epochs or (1 if args.quick else 2)
    if args.side:
        print(json.dumps((finegrain_side if args.side == "finegrain" else peer_side)(args)))
        return

    facts = machine_facts()
    print_facts(facts)
    ceiling = matmul_ceiling_gflops()
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s; {args.train} train x {args.epochs} epochs, {args.test} test, "
          f"at most {args.max_length} tokens per text")
    passed = ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs),
              "--max-length", str(args.max_length)]
    seeds = list(range(args.seeds)) if args.seeds else [0] * args.pairs
    pairs = [(run_logged("finegrain", [*passed, "--seed", str(seed)]), run_logged("peer", [*passed, "--seed", str(seed)]))
             for seed in seeds]
    label = "seed" if args.seeds else "#"
    numbers = [f" {label}{seed if args.seeds else i + 1}" if len(pairs) > 1 else "" for i, seed in enumerate(seeds)]
    sides = {}
    for number, (ours, peer) in zip(numbers, pairs):
        sides[f"finegrain{number}"], sides[f"transformers+peft{number}"] = ours, peer
    if args.bf16:
        sides["finegrain bf16"] = run_logged("finegrain", [*passed, "--bf16"])
        sides["transformers+peft bf16"] = run_logged("peer", [*passed, "--bf16"])
    print(f"{'':>24} {'tokens/s':>9} {'tok/text':>9} {'train s':>8} {'peak RSS MB':>12} {'accuracy':>9} "
          f"{'macro-F1':>9} {'ceiling %':>10}")
    for name, r in sides.items():
        share = ceiling_share(r["tokens_per_s"], SMOLLM2_LAYERS, ceiling)
        print(f"{name:>24} {r['tokens_per_s']:>9.1f} {r['tokens_per_text']:>9.1f} {r['train_s']:>8.1f} "
              f"{r['peak_rss_mb']:>12} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f} {share:>9.1f}%")
    speedups = [ours["tokens_per_s"] / peer["tokens_per_s"] for ours, peer in pairs]
    for number, speedup, (ours, peer) in zip(numbers, speedups, pairs):
        print(f"ratios{number}: tokens/s x{speedup:.2f}, "
              f"peak RSS x{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}, accuracy {ours['accuracy'] - peer['accuracy']:+.3f}")
    if args.bf16:
        ours16, peer16 = sides["finegrain bf16"], sides["transformers+peft bf16"]
        print(f"bf16 against bf16: tokens/s x{ours16['tokens_per_s'] / peer16['tokens_per_s']:.2f}, "
              f"peak RSS x{ours16['peak_rss_mb'] / peer16['peak_rss_mb']:.2f}, "
              f"accuracy {ours16['accuracy'] - peer16['accuracy']:+.3f}; finegrain bf16 against the float32 peer: "
              f"tokens/s x{ours16['tokens_per_s'] / pairs[0][1]['tokens_per_s']:.2f}")
    if args.seeds:
        for metric in ("accuracy", "macro_f1"):
            print(f"test {metric.replace('_', '-')} over {len(seeds)} seeds: "
                  f"finegrain {mean_std([ours[metric] for ours, _ in pairs])}, "
                  f"transformers+peft {mean_std([peer[metric] for _, peer in pairs])}")
    median = sorted(range(len(pairs)), key=lambda i: speedups[i])[(len(pairs) - 1) // 2]  # the lower middle for even N
    ours, peer = pairs[median]
    kind = "seeds" if args.seeds else "pairs"
    each = f"median of {len(pairs)} {kind}: {', '.join(f'{r:.2f}' for r in speedups)}; " if len(pairs) > 1 else ""
    print(f"train speedup vs transformers+peft: {speedups[median]:.2f} "
          f"({each}accuracy {ours['accuracy']:.3f} vs {peer['accuracy']:.3f})")


def run_logged(side: str, args: list[str]) -> dict:
    """`run_side`, with one line as each side ends: a long run cut short still shows what it measured.

    The finegrain side runs with the OpenMP wait policy `finegrain train` sets for itself
    (`finegrain.cpu.quiet_openmp`: waiting threads sleep instead of spinning, unless the user
    chose); the peer side as transformers leaves it. On a quiet host this changes little; on a
    shared one, spinning threads cost finegrain's many small parallel regions far more than
    the peer's few large ones (it trained ~4x slower than the peer here with them spinning).
    """
    env = quiet_openmp(dict(os.environ)) if side == "finegrain" else {}
    result = run_side(__file__, side, args, env)
    print(f"  {side} {' '.join(args)}: {result['tokens_per_s']:.1f} tok/s, accuracy {result['accuracy']:.3f}, "
          f"macro-F1 {result['macro_f1']:.3f}", flush=True)
    return result


def mean_std(values: list[float]) -> str:
    """'0.812 ± 0.004' (sample standard deviation; ± 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


if __name__ == "__main__":
    main()
