"""Every adaptation method of `finegrain.peft.METHODS` against the same method in transformers+PEFT.

    python benchmarks/methods.py [--quick] [--train 2000] [--test 1000] [--epochs 1] [--methods lora,ia3]

Each method trains on the Rotten Tomatoes benchmark split of `train_classification.py` (the
peer's split, at most 64 tokens, batch 16, AdamW at a constant learning rate without decay or
clipping, a linear head on the last token, every layer of the default model), once in finegrain
(`peft: {method: M, ...}`) and, where PEFT has the method, once in transformers+PEFT with the
same options, each in its own process. Both sides of a method share its learning rate (a
method's usual one: 3e-4 for LoRA and its kin, 3e-3 for IA3 and bitfit, 3e-2 for prompt tuning,
3e-5 for full fine-tuning). `head` (the head alone on the frozen model) and `full` (every
weight) need no PEFT: the peer side freezes all but the head, or nothing. `adapter`
(bottleneck adapters) has no PEFT counterpart and runs alone.

The table: trainable parameters, training tokens/s (real tokens), peak RSS, test accuracy, and
finegrain's tokens/s over PEFT's same method. `head` gets no ratio: finegrain runs its frozen backbone once before training (the prefix
cache), outside the training time the table shows. `--quick` (128 training and 128 test examples;
under 3 minutes per method pair on a quiet 2-core machine) shows speed, not accuracy. Last line:
`methods vs peft: min ratio X.XX over N methods`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    finegrain_classification, machine_facts, peer_classification, peer_lora, print_facts, run_side,
)

from finegrain.cpu import quiet_openmp  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
VIRTUAL_TOKENS = 20


def peer_peft(config_of):
    """An `adapt` for `peer_classification`: PEFT's method built by `config_of(peft)`, task SEQ_CLS."""
    def adapt(model):
        import peft

        return peft.get_peft_model(model, config_of(peft))
    return adapt


def peer_head_only(model):
    """The head alone trains (the linear-probe baseline)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("score."))
    return model


def peer_full(model):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def peer_adalora(steps: int):
    """PEFT's AdaLoRA at finegrain's defaults, with `update_and_allocate` after each step."""
    def config_of(peft):
        return peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.05, total_step=steps,
                                  tinit=steps // 10, tfinal=steps // 5, deltaT=1,
                                  target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")

    def after_step(model, step):
        model.base_model.update_and_allocate(step)
    return peer_peft(config_of), after_step


# method -> (learning rate, finegrain's `peft:` section, the peer's `adapt` or None)
def methods(steps: int) -> dict[str, tuple[float, dict, object]]:
    adalora_adapt, adalora_after = peer_adalora(steps)
    return {
        "lora": (3e-4, {"method": "lora"}, peer_lora),
        "dora": (3e-4, {"method": "dora", **LORA}, peer_peft(lambda peft: peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_dora=True,
            task_type="SEQ_CLS"))),
        "adalora": (3e-4, {"method": "adalora", "init_r": 12, "target_r": 8, "alpha": 16, "dropout": 0.05,
                           "targets": ["q_proj", "v_proj"], "tinit": steps // 10, "tfinal": steps // 5, "deltaT": 1},
                    (adalora_adapt, adalora_after)),
        "ia3": (3e-3, {"method": "ia3"}, peer_peft(lambda peft: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="SEQ_CLS"))),
        "prompt": (3e-2, {"method": "prompt", "num_virtual_tokens": VIRTUAL_TOKENS}, peer_peft(
            lambda peft: peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type="SEQ_CLS"))),
        "prefix": (1e-2, {"method": "prefix", "num_virtual_tokens": VIRTUAL_TOKENS}, peer_peft(
            lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type="SEQ_CLS"))),
        "bitfit": (3e-3, {"method": "bitfit"}, None),
        "adapter": (3e-4, {"method": "adapter"}, None),
        "head": (1e-3, {"method": "head"}, peer_head_only),
        "full": (3e-5, {"method": "full"}, peer_full),
    }


def side(args) -> dict:
    from finegrain.peft import METHODS  # noqa: F401 (the methods this checkout has)

    steps = -(-args.train // 16) * args.epochs
    lr, section, peer = methods(steps)[args.method]
    if args.side == "finegrain":
        return finegrain_classification(args.train, args.test, args.epochs, peft=section, lr=lr)
    adapt, after_step = peer if isinstance(peer, tuple) else (peer, None)
    result = peer_classification(args.train, args.test, args.epochs, adapt=adapt, lr=lr, after_step=after_step)
    result.pop("predictions")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 training and 128 test examples, 1 epoch")
    parser.add_argument("--train", type=int, default=None, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=None, help="test examples (default 1000)")
    parser.add_argument("--epochs", type=int, default=1, help="default 1")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all of finegrain.peft.METHODS)")
    parser.add_argument("--side", choices=["finegrain", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train = args.train or (128 if args.quick else 2000)
    args.test = args.test or (128 if args.quick else 1000)
    if args.side:
        print(json.dumps(side(args)))
        return

    from finegrain.peft import METHODS

    table = methods(1)
    chosen = args.methods.split(",") if args.methods else [m for m in table if m in METHODS]
    unknown = [m for m in chosen if m not in METHODS or m not in table]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not in this checkout's methods ({', '.join(m for m in table if m in METHODS)})")
    print_facts(machine_facts())
    print(f"{args.train} train x {args.epochs} epochs, {args.test} test, at most 64 tokens per text, batch 16")
    passed = ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs)]
    rows = []
    for method in chosen:
        ours = run_side(__file__, "finegrain", [*passed, "--method", method], quiet_openmp(dict(os.environ)))
        peer = run_side(__file__, "peer", [*passed, "--method", method]) if table[method][2] is not None else None
        rows.append((method, ours, peer))
        print(f"  {method}: finegrain {ours['tokens_per_s']:.1f} tok/s, accuracy {ours['accuracy']:.3f}"
              + (f"; peft {peer['tokens_per_s']:.1f} tok/s, accuracy {peer['accuracy']:.3f}" if peer else "; no peft"),
              flush=True)
    print(f"{'method':>8} {'side':>10} {'trainable':>10} {'tokens/s':>9} {'peak RSS MB':>12} {'accuracy':>9} {'x peft':>7}")
    ratios = []
    for method, ours, peer in rows:
        # head: finegrain runs the frozen backbone once before training (the prefix cache), outside
        # its training time, so its tokens/s is not comparable with the peer's; compare whole runs.
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"] if peer and method != "head" else None
        for name, r in (("finegrain", ours), ("peft", peer)):
            if r is None:
                continue
            shown = f"{ratio:.2f}" if name == "finegrain" and ratio else ""
            print(f"{method:>8} {name:>10} {r['trainable']:>10,} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12} "
                  f"{r['accuracy']:>9.3f} {shown:>7}")
        if ratio:
            ratios.append(ratio)
    if ratios:
        print(f"methods vs peft: min ratio {min(ratios):.2f} over {len(ratios)} methods")


if __name__ == "__main__":
    main()
