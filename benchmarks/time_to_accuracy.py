"""Wall time for finegrain's recommended recipe to reach transformers+PEFT's test accuracy.

    python benchmarks/time_to_accuracy.py            # both sides, ~25 min; caches the peer's figures
    python benchmarks/time_to_accuracy.py --quick    # under 2 minutes, peer figures from that cache

The peer is /work/shared/peer/hf_peft_rotten_tomatoes.py's run: SmolLM2 (float32), LoRA r=8 on
q_proj/v_proj of all 30 layers, lr 3e-4, batch 16, at most 64 tokens, 2,000 training examples
x 2 epochs; its target is its final test accuracy on the last 1,000 rows of its split, its
time the wall time of its training loop (model load and test pass not counted).

finegrain runs examples/rotten_tomatoes.yaml (20 kept layers, LoRA r=8 on all linear layers
of the top 6, frozen-prefix cache, lr 1e-3) through `finegrain.run.train` on the same 2,000
training examples, for the peer's 2 epochs (`--recipe-epochs`; the recipe's own 1 epoch is
meant for its 3,163 examples), and the same test set (no validation split: the best-weights
selection would otherwise read data the peer trains on). A thread copies each resumable
checkpoint the run writes (`--checkpoints` along the run) with the
wall time it appeared, counted from the call to `train`: model load, tokenization, the
caching pass over the frozen layers and training are all inside. After the run each copy is
scored on the test set; the test passes for this table are not counted. The result is the
first checkpoint whose test accuracy reaches the peer's (the first crossing of a noisy
curve: a few checkpoints keep that bias small), and the output says so; if none does, the
run's final accuracy and total time are reported as not reaching it.

A full run writes the peer's figures (with machine facts, date and per-example predictions)
to benchmarks/results/time_to_accuracy_peer.json. `--quick` trains finegrain on 400
examples and scores 200 test examples (the last 200 of the same test set), and compares with
the cached peer's accuracy on those same 200 examples; without a cache from this kind of
machine it runs a small peer itself (160 examples x 1 epoch) and says so.
Last line: `time to accuracy vs transformers+peft: xR.RR (...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SMOLLM2_LAYERS, ceiling_share, machine_facts, matmul_ceiling_gflops, peak_rss_mb, peer_classification,
    print_facts, run_side, write_peer_split,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "rotten_tomatoes.yaml"
PEER_CACHE = ROOT / "benchmarks" / "results" / "time_to_accuracy_peer.json"


class CheckpointWatcher(threading.Thread):
    """Copies the trainable weights of each checkpoint the Trainer writes, with the time it appeared.

    `snapshots` holds (optimizer step, seconds since `started`, safetensors bytes). The Trainer
    replaces `checkpoint/` atomically, so a copy is kept only when state.json names the same
    step before and after reading the weights.
    """

    def __init__(self, directory: Path, started: float, interval: float = 0.05):
        super().__init__(daemon=True)
        self.directory, self.started, self.interval = directory, started, interval
        self.snapshots: list[tuple[int, float, bytes]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)
        self.poll()

    def poll(self) -> None:
        state = self.directory / "state.json"
        try:
            step = json.loads(state.read_text())["step"]
            if self.snapshots and self.snapshots[-1][0] == step:
                return
            seen = time.perf_counter() - self.started
            weights = (self.directory / "trainable.safetensors").read_bytes()
            if json.loads(state.read_text())["step"] != step:
                return
        except (OSError, ValueError, KeyError):  # not written yet, or being replaced
            return
        self.snapshots.append((step, seen, weights))


def finegrain_side(args) -> dict:
    """The recipe through `finegrain.run.train`, then each checkpoint copy scored on the test set."""
    from safetensors.torch import load as load_safetensors

    from finegrain.config import load_config, validate
    from finegrain.peft import adapted_layers
    from finegrain.run import Predictor, train
    from finegrain.train.prefix_cache import compute_prefix

    with tempfile.TemporaryDirectory() as tmp:
        train_path, test_path = write_peer_split(Path(tmp), args.train, args.test)
        config = load_config(RECIPE)
        config.data.dataset = None
        config.data.train, config.data.test = str(train_path), str(test_path)
        config.data.split = [1.0, 0.0, 0.0]
        config.train.epochs = args.recipe_epochs
        config.output = str(Path(tmp, "run"))
        steps_per_epoch = -(-args.train // config.train.batch_size)
        config.train.checkpoint_every = max(1, round(steps_per_epoch * config.train.epochs / args.checkpoints))
        validate(config, str(RECIPE))

        started = time.perf_counter()
        watcher = CheckpointWatcher(Path(config.output, "checkpoint"), started)
        watcher.start()
        results = train(config, progress=False)
        run_rss = peak_rss_mb()
        watcher.stop.set()
        watcher.join()

        predictor = Predictor(config.output)
        task, model, pad_id = predictor.task, predictor.model, predictor.tokenizer.pad_token_id
        test_examples = task.read_file(config.data, str(test_path))
        items = task.encode(predictor.tokenizer, test_examples, config.data.max_length)
        start_layer = adapted_layers(config.lora.layers, len(model.model.layers))[0]
        hidden = compute_prefix(model.model, task, items, start_layer, pad_id, progress=False)
        own = model.state_dict()
        checkpoints = []
        for step, seconds, weights in watcher.snapshots:
            tensors = load_safetensors(weights)
            if set(tensors) - set(own):
                raise SystemExit(f"checkpoint at step {step} does not fit the model: {sorted(set(tensors) - set(own))[:3]}")
            model.load_state_dict(tensors, strict=False)
            predictions = task.predict(model, items, pad_id, config.train.eval_batch_size, hidden, start_layer)
            accuracy = task.metrics(predictions, task.gold(test_examples))["accuracy"]
            checkpoints.append({"step": step, "seconds": round(seconds, 1), "accuracy": accuracy})
    return {
        "checkpoints": checkpoints,
        "total_steps": results["train"]["steps"],
        "epochs": config.train.epochs,
        "run_total_s": results["train"]["total_seconds"],
        "train_s": results["train"]["train_seconds"],
        "tokens_per_s": results["train"]["tokens_per_s"],
        "trained_layers": (config.model.num_layers or SMOLLM2_LAYERS) - results["train"]["frozen_prefix_layers"],
        "run_accuracy": results["test"]["accuracy"],
        "peak_rss_mb": round(run_rss),
    }


def peer_side(args) -> dict:
    return peer_classification(args.train, args.test, args.epochs)


def cached_peer(facts: dict) -> dict | None:
    """The full run's peer figures, if they were measured on this kind of machine."""
    if not PEER_CACHE.exists():
        return None
    cached = json.loads(PEER_CACHE.read_text(encoding="utf-8"))
    same_machine = all(cached["machine"][k] == facts[k] for k in ("cpu", "cores", "torch"))
    return cached if same_machine else None


def accuracy_on_tail(predictions: list[str], n: int) -> float:
    """Accuracy of the full test set's predictions on its last `n` examples (the quick test set)."""
    from finegrain.datasets import rotten_tomatoes_peer_split

    _, gold = rotten_tomatoes_peer_split(0, n)
    return sum(p == e.label for p, e in zip(predictions[-n:], gold)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="under 2 minutes: a smaller finegrain run, the cached peer")
    parser.add_argument("--train", type=int, default=None, help="training examples, both sides (default 2000)")
    parser.add_argument("--epochs", type=int, default=2, help="the peer's epochs (default 2)")
    parser.add_argument("--checkpoints", type=int, default=10, help="finegrain checkpoints scored along its run (default 10)")
    parser.add_argument("--recipe-epochs", type=float, default=2, help="finegrain's epochs (default 2, as the peer)")
    parser.add_argument("--cached-peer", action="store_true",
                        help="take the peer's figures from the cache of a full run with the same settings on this machine")
    parser.add_argument("--test", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["finegrain", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train = args.train or (400 if args.quick else 2000)
    args.test = args.test or (200 if args.quick else 1000)
    if args.side:
        print(json.dumps((finegrain_side if args.side == "finegrain" else peer_side)(args)))
        return

    from finegrain.atomic import atomic_write_json

    facts = machine_facts()
    print_facts(facts)
    ceiling = matmul_ceiling_gflops()
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s")
    peer_note = "measured in this run"
    if args.quick:
        cached = cached_peer(facts)
        if cached is not None:
            peer = dict(cached["peer"], accuracy=accuracy_on_tail(cached["peer"]["predictions"], args.test))
            peer_note = (f"cached full run of {cached['machine']['date']} ({cached['train']} x {cached['epochs']} epochs, "
                         f"ceiling then {cached['ceiling_gflops']:.1f} GFLOP/s); accuracy on the last {args.test} of its test set")
            peer_setup = f"{cached['train']} train x {cached['epochs']} epochs"
        else:
            small = ["--train", "160", "--test", str(args.test), "--epochs", "1"]
            peer = run_side(__file__, "peer", small)
            peer_note = f"no cached full run on this machine: a small peer measured now (160 x 1 epoch, {args.test} test)"
            peer_setup = "160 train x 1 epoch"
    elif args.cached_peer:
        cached = cached_peer(facts)
        if cached is None or (cached["train"], cached["test"], cached["epochs"]) != (args.train, args.test, args.epochs):
            raise SystemExit(f"--cached-peer: {PEER_CACHE.relative_to(ROOT)} holds no full run with these settings on this machine")
        peer, peer_setup = cached["peer"], f"{args.train} train x {args.epochs} epochs"
        peer_note = f"cached full run of {cached['machine']['date']}"
    else:
        peer = run_side(__file__, "peer", ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs)])
        peer_setup = f"{args.train} train x {args.epochs} epochs"
        atomic_write_json(PEER_CACHE, {"machine": facts, "ceiling_gflops": round(ceiling, 1), "train": args.train,
                                       "test": args.test, "epochs": args.epochs, "peer": peer})
        peer_note += f"; cached in {PEER_CACHE.relative_to(ROOT)}"
    ours = run_side(__file__, "finegrain", ["--train", str(args.train), "--test", str(args.test),
                                            "--checkpoints", str(args.checkpoints), "--recipe-epochs", str(args.recipe_epochs)])

    target = peer["accuracy"]
    print(f"peer (transformers+peft, {peer_setup}): test accuracy {target:.3f}, training {peer['train_s']:.1f} s "
          f"at {peer['tokens_per_s']:.1f} tokens/s ({ceiling_share(peer['tokens_per_s'], SMOLLM2_LAYERS, ceiling):.1f}% "
          f"of the ceiling), load {peer['load_s']:.1f} s, peak RSS {peer['peak_rss_mb']} MB [{peer_note}]")
    print(f"finegrain ({RECIPE.relative_to(ROOT)}, {args.train} train x {ours['epochs']:g} epochs, {args.test} test): "
          f"training {ours['train_s']:.1f} s at {ours['tokens_per_s']:.1f} tokens/s through {ours['trained_layers']} layers "
          f"({ceiling_share(ours['tokens_per_s'], ours['trained_layers'], ceiling):.1f}% of the ceiling), "
          f"peak RSS {ours['peak_rss_mb']} MB")
    print(f"{'step':>6} {'wall s':>8} {'test acc':>9}")
    for c in ours["checkpoints"]:
        print(f"{c['step']:>6} {c['seconds']:>8.1f} {c['accuracy']:>9.3f}")
    last = ours["checkpoints"][-1]
    if last["step"] == ours["total_steps"] and abs(last["accuracy"] - ours["run_accuracy"]) > 1e-9:
        raise SystemExit(f"the last checkpoint scores {last['accuracy']} but the run's own test pass {ours['run_accuracy']}")
    print(f"the recommended run end to end (its own test pass included): {ours['run_total_s']:.1f} s, "
          f"final test accuracy {ours['run_accuracy']:.3f}")
    reached = next((c for c in ours["checkpoints"] if c["accuracy"] >= target), None)
    if reached is None:
        print(f"time to accuracy vs transformers+peft: not reached (finegrain final {ours['run_accuracy']:.3f} after "
              f"{ours['run_total_s']:.0f} s; peer {target:.3f} after {peer['train_s']:.0f} s of training)")
        return
    how = ("the whole run" if reached["step"] == ours["total_steps"] else
           f"the first of {len(ours['checkpoints'])} checkpoints at or above it, step {reached['step']} of {ours['total_steps']}")
    print(f"finegrain reaches {target:.3f} at {reached['seconds']:.1f} s ({how}; load, tokenization, the caching pass "
          f"and training counted, the test passes for this table not)")
    print(f"time to accuracy vs transformers+peft: x{peer['train_s'] / reached['seconds']:.2f} "
          f"(finegrain {reached['accuracy']:.3f} at {reached['seconds']:.0f} s, {how}; peer {target:.3f} after "
          f"{peer['train_s']:.0f} s of training{'; quick' if args.quick else ''})")


if __name__ == "__main__":
    main()
