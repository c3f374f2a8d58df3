"""Every adaptation method of `finegrain.peft.METHODS` against the same method in transformers+PEFT.

    python benchmarks/methods.py [--quick] [--task classification|ner] [--train 2000] [--test 1000] [--epochs 1] [--methods lora,ia3]

Each method trains on the Rotten Tomatoes benchmark split of `train_classification.py` (the
peer's split, at most 64 tokens, batch 16, AdamW at a constant learning rate without decay or
clipping, a linear head on the last token, every layer of the default model), once in finegrain
(`peft: {method: M, ...}`) and, where PEFT has the method, once in transformers+PEFT with the
same options. Each side runs in its own process, its methods one after the other (the base model
read anew for each, the peak RSS started again before each; the peer reads the GGUF converted once
to a transformers directory, `common.peer_base`). Both sides of a method share its learning rate (a
method's usual one: 3e-4 for LoRA and its kin, 3e-3 for IA3, 1e-3 for bitfit, 3e-2 for prompt tuning,
3e-5 for full fine-tuning). `head` (the head alone on the frozen model) and `full` (every
weight) need no PEFT: the peer side freezes all but the head, or nothing. `adapter`
(bottleneck adapters) has no PEFT counterpart and runs alone.

The table: trainable parameters, training tokens/s (real tokens), peak RSS, test accuracy, and
finegrain's tokens/s over PEFT's same method. `head` gets no ratio: finegrain runs its frozen backbone once before training (the prefix
cache), outside the training time the table shows. `--quick` (48 training and 16 test examples:
three steps a method; every method on both sides in under 3 minutes on a quiet 2-core machine)
shows speed, not accuracy. Last lines: the whole benchmark's seconds, then
`methods vs peft: min ratio X.XX over N methods`.

`--task ner`: the second table, on WNUT-16 tweets (`finegrain.datasets.wnut16`, its fixed split:
the first `--train` tweets of its train part and the first `--test` of its test part; default
2,000 and 239, `--quick` 48 and 16), with entity F1 (seqeval's default mode) in place of
accuracy. Both sides tag in BIO over the 10 types, label each word's first subtoken (each word
tokenized on its own, as `finegrain.tasks.tokens` does), read predictions by argmax at those
subtokens, at most 64 tokens, the same methods and learning rates, PEFT's task type TOKEN_CLS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    finegrain_classification, machine_facts, peak_rss_mb, peer_base, peer_classification, peer_lora, print_facts,
    reset_peak_rss, run_side, side_summary,
)

from finegrain.cpu import quiet_openmp  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
VIRTUAL_TOKENS = 20
QUICK_TRAIN, QUICK_TEST = 48, 16  # --quick: 3 steps of 16 a method


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


def peer_adalora(steps: int, task_type: str = "SEQ_CLS"):
    """PEFT's AdaLoRA at finegrain's defaults, with `update_and_allocate` after each step."""
    def config_of(peft):
        return peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.05, total_step=steps,
                                  tinit=steps // 10, tfinal=steps // 5, deltaT=1,
                                  target_modules=["q_proj", "v_proj"], task_type=task_type)

    def after_step(model, step):
        model.base_model.update_and_allocate(step)
    return peer_peft(config_of), after_step


# method -> (learning rate, finegrain's `peft:` section, the peer's `adapt` or None)
def methods(steps: int, task_type: str = "SEQ_CLS") -> dict[str, tuple[float, dict, object]]:
    """Each method's learning rate, finegrain's `peft:` section and the peer's `adapt`; `task_type`:
    PEFT's SEQ_CLS (classification) or TOKEN_CLS (NER)."""
    adalora_adapt, adalora_after = peer_adalora(steps, task_type)
    return {
        "lora": (3e-4, {"method": "lora"}, peer_lora if task_type == "SEQ_CLS" else peer_peft(lambda peft: peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type=task_type))),
        "dora": (3e-4, {"method": "dora", **LORA}, peer_peft(lambda peft: peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_dora=True,
            task_type=task_type))),
        "adalora": (3e-4, {"method": "adalora", "init_r": 12, "target_r": 8, "alpha": 16, "dropout": 0.05,
                           "targets": ["q_proj", "v_proj"], "tinit": steps // 10, "tfinal": steps // 5, "deltaT": 1},
                    (adalora_adapt, adalora_after)),
        "ia3": (3e-3, {"method": "ia3"}, peer_peft(lambda peft: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type=task_type))),
        "prompt": (3e-2, {"method": "prompt", "num_virtual_tokens": VIRTUAL_TOKENS}, peer_peft(
            lambda peft: peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type=task_type,
                                               prompt_tuning_init="SAMPLE_VOCAB"))),  # finegrain's start
        "prefix": (1e-2, {"method": "prefix", "num_virtual_tokens": VIRTUAL_TOKENS}, peer_peft(
            lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type=task_type))),
        "bitfit": (1e-3, {"method": "bitfit"}, None),  # at 3e-3 it stayed near chance on two seeds of three (docs/METHODS.md)
        "adapter": (3e-4, {"method": "adapter"}, None),
        "head": (1e-3, {"method": "head"}, peer_head_only),
        "full": (3e-5, {"method": "full"}, peer_full),
    }


# -- the second table: NER on WNUT-16 ------------------------------------------------------------

NER_LENGTH = 64  # tokens; WNUT-16 tweets average ~30 SmolLM2 tokens


def wnut16_split(n_train: int, n_test: int) -> tuple[list, list]:
    """The first `n_train` tweets of WNUT-16's fixed train part and the first `n_test` of its test part."""
    from finegrain.datasets import wnut16

    examples = wnut16()
    return ([e for e in examples if e.extra["split"] == "train"][:n_train],
            [e for e in examples if e.extra["split"] == "test"][:n_test])


def wnut16_types() -> list[str]:
    from finegrain.datasets.ner import NER_DATASETS

    return list(NER_DATASETS["wnut16"].labels)


def finegrain_ner(n_train: int, n_test: int, epochs: int, peft: dict, lr: float, seed: int = 0) -> dict:
    """finegrain's side of the NER table: `finegrain.run.train` (task ner) on `wnut16_split` at the
    peer's settings (BIO, first subtoken, argmax, constant lr, batch 16, no clipping)."""
    import dataclasses
    import tempfile

    from finegrain.config import RunConfig, from_dict
    from finegrain.data.conll import write_token_examples
    from finegrain.run import train

    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp, "train.jsonl"), Path(tmp, "test.jsonl")
        for path, part in zip(paths, wnut16_split(n_train, n_test)):
            write_token_examples(path, [dataclasses.replace(e, extra={}) for e in part])
        config = from_dict(RunConfig, {
            "task": "ner",
            "model": {"name": None},
            "data": {"train": str(paths[0]), "test": str(paths[1]), "split": [1.0, 0.0, 0.0],
                     "max_length": NER_LENGTH, "labels": wnut16_types(), "baselines": False},
            "head": {"scheme": "BIO", "subword": "first", "decoding": "argmax"},
            "peft": peft,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
            "train": {"epochs": epochs, "lr": lr, "batch_size": 16, "schedule": "constant",
                      "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": None, "seed": seed, "recipe": "off"},
            "output": str(Path(tmp, "run")),
        }, "benchmark")
        results = train(config, progress=False)
    return side_summary(results, f1=results["test"]["micro"]["f1"])


def peer_ner(n_train: int, n_test: int, epochs: int, adapt, lr: float, after_step=None, seed: int = 0) -> dict:
    """transformers + PEFT token classification: LlamaForTokenClassification on the default GGUF
    (float32), `adapt(model)` the method, AdamW at a constant `lr`, batch 16 in shuffled order, right
    padded. The loss is the cross-entropy at each word's first subtoken, on the logits of the real
    tokens (prompt tuning's virtual tokens come first and are cut off: PEFT's TOKEN_CLS prompt tuning
    passes the labels unshifted)."""
    import random

    import torch.nn.functional as F
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from finegrain.evaluate.entities import entity_metrics
    from finegrain.tags import tag_set

    torch.manual_seed(seed)
    tags = tag_set(wnut16_types(), "BIO")
    index = {tag: i for i, tag in enumerate(tags)}
    base = peer_base()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(tags), dtype=torch.float32)
    model.config.pad_token_id = 2
    model = adapt(model)

    def encode(example):
        """ids, labels (the tag at each word's first subtoken, -100 elsewhere), each word's first subtoken."""
        ids, labels, firsts = [], [], []
        for i, word in enumerate(example.words):
            spaced = i > 0 and example.offsets[i][0] > example.offsets[i - 1][1]
            piece = tok(" " + word if spaced else word, add_special_tokens=False).input_ids
            firsts.append(len(ids) if piece and len(ids) < NER_LENGTH else -1)
            labels += [index[example.tags[i]]] + [-100] * (len(piece) - 1) if piece else []
            ids += piece
        return ids[:NER_LENGTH], labels[:NER_LENGTH], firsts

    def collate(rows):
        width = max(len(ids) for ids, _, _ in rows)
        pad = lambda values, fill: values + [fill] * (width - len(values))  # noqa: E731
        return (torch.tensor([pad(ids, 2) for ids, _, _ in rows]), torch.tensor([pad([1] * len(ids), 0) for ids, _, _ in rows]),
                torch.tensor([pad(labels, -100) for _, labels, _ in rows]))

    def logits_of(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]  # (B, T, C)

    train_examples, test_examples = wnut16_split(n_train, n_test)
    train_rows, test_rows = [encode(e) for e in train_examples], [encode(e) for e in test_examples]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    rng, ntok, steps = random.Random(seed), 0, 0
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        for i in range(0, len(order), 16):
            ids, mask, labels = collate([train_rows[j] for j in order[i : i + 16]])
            logits = logits_of(ids, mask)
            F.cross_entropy(logits.reshape(-1, len(tags)), labels.reshape(-1), ignore_index=-100).backward()
            ntok += int(mask.sum())
            opt.step()
            steps += 1
            if after_step is not None:
                after_step(model, steps)
            opt.zero_grad()
    train_s = time.perf_counter() - start
    model.eval()
    predicted = []
    with torch.no_grad():
        for i in range(0, len(test_rows), 32):
            rows = test_rows[i : i + 32]
            best = logits_of(*collate(rows)[:2]).argmax(-1)
            predicted += [[tags[int(best[k, f])] if f >= 0 else "O" for f in firsts] for k, (_, _, firsts) in enumerate(rows)]
    metrics = entity_metrics([e.tags for e in test_examples], predicted, mode="default")
    return {
        "train_s": round(train_s, 2),
        "tokens_per_s": round(ntok / train_s, 1),
        "f1": metrics["micro"]["f1"],
        "trainable": sum(p.numel() for p in trainable),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def side(args) -> dict[str, dict]:
    """One side's result for each of `args.methods`, trained one after the other in this process
    (the base model read once from disk per method, the peak RSS started again before each)."""
    steps = -(-args.train // 16) * args.epochs
    ner = args.task == "ner"
    table = methods(steps, "TOKEN_CLS" if ner else "SEQ_CLS")
    results = {}
    for method in args.methods.split(","):
        reset_peak_rss()
        lr, section, peer = table[method]
        lr = args.lr or lr
        if args.side == "finegrain":
            run = finegrain_ner if ner else finegrain_classification
            results[method] = run(args.train, args.test, args.epochs, peft=section, lr=lr, seed=args.seed)
            continue
        adapt, after_step = peer if isinstance(peer, tuple) else (peer, None)
        run = peer_ner if ner else peer_classification
        results[method] = run(args.train, args.test, args.epochs, adapt=adapt, lr=lr, after_step=after_step, seed=args.seed)
        results[method].pop("predictions", None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TRAIN} training and {QUICK_TEST} test examples, 1 epoch: speed only, in under 3 minutes")
    parser.add_argument("--task", choices=["classification", "ner"], default="classification",
                        help="classification: Rotten Tomatoes, accuracy (default); ner: WNUT-16, entity F1")
    parser.add_argument("--train", type=int, default=None, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=None, help="test examples (default 1000; ner: 239, all of its test part)")
    parser.add_argument("--epochs", type=int, default=1, help="default 1")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all of finegrain.peft.METHODS)")
    parser.add_argument("--seed", type=int, default=0,
                        help="both sides' seed: head and adapter draws, dropout masks, batch order (default 0)")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: each method's own)")
    parser.add_argument("--side", choices=["finegrain", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train = args.train or (QUICK_TRAIN if args.quick else 2000)
    args.test = args.test or (QUICK_TEST if args.quick else 239 if args.task == "ner" else 1000)
    if args.side:
        print(json.dumps(side(args)))
        return

    from finegrain.peft import METHODS

    table = methods(1)
    chosen = args.methods.split(",") if args.methods else [m for m in table if m in METHODS]
    unknown = [m for m in chosen if m not in METHODS or m not in table]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not in this checkout's methods ({', '.join(m for m in table if m in METHODS)})")
    started = time.perf_counter()
    print_facts(machine_facts())
    score = "f1" if args.task == "ner" else "accuracy"
    data = "WNUT-16 tweets (entity F1)" if args.task == "ner" else "Rotten Tomatoes (accuracy)"
    rate = f"lr {args.lr:g} for every method" if args.lr else "each method's own lr"
    print(f"{data}: {args.train} train x {args.epochs} epochs, {args.test} test, at most 64 tokens per text, batch 16, "
          f"seed {args.seed}, {rate}")
    passed = ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs), "--task", args.task,
              "--seed", str(args.seed), *(["--lr", str(args.lr)] if args.lr else [])]
    with_peer = [m for m in chosen if table[m][2] is not None]
    peer_base()  # converted once, before either side is timed
    print(f"finegrain: {len(chosen)} methods, then transformers + PEFT: {len(with_peer)}", flush=True)
    ours = run_side(__file__, "finegrain", [*passed, "--methods", ",".join(chosen)], quiet_openmp(dict(os.environ)))
    peer = run_side(__file__, "peer", [*passed, "--methods", ",".join(with_peer)]) if with_peer else {}
    print(f"{'method':>8} {'side':>10} {'trainable':>12} {'tokens/s':>9} {'peak RSS MB':>12} {score:>9} {'x peft':>7}")
    ratios = []
    for method in chosen:
        # head: finegrain runs the frozen backbone once before training (the prefix cache), outside
        # its training time, so its tokens/s is not comparable with the peer's; compare whole runs.
        ratio = ours[method]["tokens_per_s"] / peer[method]["tokens_per_s"] if method in peer and method != "head" else None
        for name, r in (("finegrain", ours[method]), ("peft", peer.get(method))):
            if r is None:
                continue
            shown = f"{ratio:.2f}" if name == "finegrain" and ratio else ""
            print(f"{method:>8} {name:>10} {r['trainable']:>12,} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12} "
                  f"{r[score]:>9.3f} {shown:>7}")
        if ratio:
            ratios.append(ratio)
    print(f"whole benchmark: {time.perf_counter() - started:.0f} s")
    if ratios:
        print(f"methods vs peft: min ratio {min(ratios):.2f} over {len(ratios)} methods")


if __name__ == "__main__":
    main()
