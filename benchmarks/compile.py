"""Does `torch.compile` speed up finegrain's training step on a CPU? Eager against compiled, one run.

    python benchmarks/compile.py [--quick] [--steps 40]

(`--quick` takes about 3 minutes on 2 cores, not 2: compilation alone takes ~2.)

The step is the main job's (examples/rotten_tomatoes.yaml): the top 6 of 20 kept layers with
LoRA r=8 on every linear layer and the classification head, on cached states of the 14 frozen
layers below, batches of 16 Rotten Tomatoes texts sorted by length (as the trainer's buckets
make them). Each mode runs `--steps` forward+backward+AdamW steps after `--warmup` untimed
ones; the compiled mode's first steps (compilation, recompilation for new lengths) are
timed apart. `dynamic=True` compiles one graph for every length: the lengths of a bucketed
run vary from batch to batch. Last line: `compile speedup: xR.RR (compile time S s)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, print_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def setup(texts: int):
    from finegrain.config import load_config
    from finegrain.run import build
    from finegrain.tasks import task_class
    from finegrain.train.prefix_cache import compute_prefix, lowest_trainable_layer

    config = load_config(ROOT / "examples" / "rotten_tomatoes.yaml")
    splits = task_class(config.task).load_splits(config.data)
    model, tokenizer, task, _ = build(config, splits.labels, progress=False)
    items = task.encode(tokenizer, splits.train[:texts], config.data.max_length)
    task.set_class_weights(items)
    start = lowest_trainable_layer(model, len(model.model.layers))
    hidden = compute_prefix(model.model, task, items, start, tokenizer.pad_token_id, progress=False)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    return model, task, items, hidden, batches, start, tokenizer.pad_token_id


def run(model, task, items, hidden, batches, start, pad_id, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the `warmup` first steps, mean seconds per step of the next `steps`)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(k: int) -> None:
        indices = batches[k % len(batches)]
        batch = task.collate([items[i] for i in indices], pad_id, [hidden[i] for i in indices])
        task.loss(model(batch, start_layer=start), batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    began = time.perf_counter()
    for k in range(warmup):
        step(k)
    first = time.perf_counter() - began
    began = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    return first, (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 timed steps per mode: about 3 minutes, 2 of them compiling")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps per mode (default: every batch once)")
    args = parser.parse_args()
    steps = args.steps or (16 if args.quick else 40)
    print_facts(machine_facts())
    torch.manual_seed(0)
    model, task, items, hidden, batches, start, pad_id = setup(16 * (steps + 8))
    warmup = args.warmup or min(len(batches), 8)
    eager_first, eager = run(model, task, items, hidden, batches, start, pad_id, steps, warmup)
    compiled_model = torch.compile(model, dynamic=True)
    compile_s, compiled = run(compiled_model, task, items, hidden, batches, start, pad_id, steps, warmup)
    print(f"eager:    {eager * 1000:.0f} ms/step ({warmup} first steps {eager_first:.1f} s)")
    print(f"compiled: {compiled * 1000:.0f} ms/step ({warmup} first steps, compilation included, {compile_s:.1f} s)")
    print(f"compile speedup: x{eager / compiled:.2f} (compile time {compile_s - warmup * compiled:.0f} s)")


if __name__ == "__main__":
    main()
