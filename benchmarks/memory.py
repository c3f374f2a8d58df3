"""Peak memory of LoRA fine-tuning a 1B-parameter LLaMA, with and without activation checkpointing,
or on a quantised base (`model.quantize`).

    python benchmarks/memory.py [--quick] [--steps 2] [--batch-size 8] [--length 128]
    python benchmarks/memory.py --quantize q4|int8 [--shape 1b|7b] [--speed]

The model has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 kv heads, FFN
5632, vocabulary 32000) with random float32 weights; the task is sequence classification
(2 classes, random labels) with LoRA r=8 on every linear layer of every layer, so the whole
decoder is back-propagated through (no frozen prefix). Training is finegrain's own `Trainer`
with `ClassificationTask`, `--steps` optimizer steps at `--batch-size` x `--length` tokens,
once with `train.activation_checkpointing` off and once on, each in its own process: the
peak RSS it reports is that run's own, model construction included. `--quick` (under 2
minutes) takes one step at batch 2 x 64 tokens: it shows the weights' share of the peak, not
the activations of the full batch. Last line: `memory: peak RSS X GB (under 12) without,
Y GB (under 12) with activation checkpointing, step time xR.RR` (OVER where a run exceeds 12 GB).

`--quantize q4|int8` trains the same steps once, on a quantised base: the random weights are
generated one linear layer at a time and quantised at once (`finegrain.model.qlinear`), as a
checkpoint is quantised at load, so no float32 copy of the decoder ever exists. Last line:
`memory: peak RSS X.XX GB with q4 (target 2.5 GB: met)`. `--shape 7b` takes LLaMA-7B's shape
(hidden 4096, 32 layers, FFN 11008) against this machine's 24 GB; with a batch of 2 x 128 tokens it
peaks where 8 x 128 does, since `train.micro_batch_tokens: auto` (89 tokens for this shape, 256
for the 1.1B) runs either as pieces of one row. `--speed` instead times LoRA training steps (5 x 64
tokens) of the default model (SmolLM2-135M, its bundled Q4_1 GGUF) in float32 and quantised, in one
process, alternately, by the wall clock and by the process's CPU time (the work done, whatever
else the host runs). Last line: `speed: q4 trains at x1.02 the speed of float32 (median wall-clock
step; fastest x1.13; CPU time x1.01; target >= 0.8: met)`.
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

LIMIT_GB = 12
QUANTIZED_TARGET_GB = {"1b": 2.5, "7b": 24}  # the targets: q4 on the 1.1B shape; the 7B within 24 GB


def one_billion():
    """TinyLlama-1.1B's architecture (LlamaConfig of finegrain)."""
    from finegrain.model.config import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
        rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False,
    )


def seven_billion():
    """LLaMA-7B's architecture (LlamaConfig of finegrain)."""
    from finegrain.model.config import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
        rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def quantized_llama(config, quantize: str):
    """A `Llama` of `config` with random weights whose decoder linear layers are `QuantLinear`s, each
    generated in float32 (nn.Linear's initialisation) and quantised before the next one exists.
    The LM head stays unmaterialised (on the meta device): the classifier drops it."""
    import math

    import torch
    from torch import nn

    from finegrain.model.llama import Llama, RMSNorm, rope_inverse_frequencies
    from finegrain.model.qlinear import QuantLinear, quantize_weight, quantizes

    with torch.device("meta"):
        llama = Llama(config)
    llama.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    llama.model.inv_freq = rope_inverse_frequencies(config)
    for name, module in list(llama.named_modules()):
        parent, _, child = name.rpartition(".")
        if isinstance(module, RMSNorm):
            module.weight = nn.Parameter(torch.ones(module.weight.shape))
        elif isinstance(module, nn.Linear) and quantizes(f"{name}.weight"):
            bound = 1 / math.sqrt(module.in_features)
            weight = torch.empty(module.out_features, module.in_features).uniform_(-bound, bound)
            setattr(llama.get_submodule(parent), child, QuantLinear(quantize_weight(weight, quantize, name)))
    return llama


def reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh (Linux: /proc/self/clear_refs), so the peak measured after
    this is training's alone, not the build's; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def count_parameters(llama) -> int:
    """The model's parameters, the LM head included, a `QuantLinear`'s weights counted as a float layer's."""
    from finegrain.model.qlinear import QuantLinear

    quantized = sum(m.in_features * m.out_features for m in llama.modules() if isinstance(m, QuantLinear))
    return quantized + sum(p.numel() for p in {id(p): p for p in llama.parameters()}.values())


def train_side(args) -> dict:
    """Build the model, train `args.steps` steps, report parameters, peak RSS and step times."""
    import torch

    from finegrain.config import TrainConfig
    from finegrain.model.llama import Llama
    from finegrain.peft import LoraConfig, apply_lora
    from finegrain.tasks.classification import ClassificationTask, Encoded
    from finegrain.train.trainer import Trainer

    torch.manual_seed(0)
    config = seven_billion() if args.shape == "7b" else one_billion()
    config.num_layers = args.num_layers or config.num_layers
    start = time.perf_counter()
    llama = quantized_llama(config, args.quantize) if args.quantize else Llama(config)
    parameters = count_parameters(llama)
    task = ClassificationTask(["negative", "positive"])
    model = task.build_model(llama)  # the backbone and a head; the LM head is dropped with `llama`
    del llama
    decoder_parameters = sum(p.numel() for p in model.model.layers.parameters())
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, targets="all-linear"))
    model.score.requires_grad_(True)
    model.model.gradient_checkpointing = args.checkpointing
    build_s = time.perf_counter() - start
    rss_built = peak_rss_mb()
    training_peak_only = reset_peak_rss()

    generator = torch.Generator().manual_seed(0)
    items = [
        Encoded(torch.randint(3, config.vocab_size, (args.length,), generator=generator).tolist(), i % 2)
        for i in range(args.steps * args.batch_size)
    ]
    train = TrainConfig(epochs=1, lr=1e-4, batch_size=args.batch_size, warmup_ratio=0.0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, task, items, train, Path(tmp), pad_id=0, progress=False)
        state = trainer.fit()
        tokens_per_s = [json.loads(line)["tokens_per_s"] for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    # metrics.jsonl holds the running tokens/s after each step; each step trains B x T tokens.
    elapsed = [(k + 1) * args.batch_size * args.length / tps for k, tps in enumerate(tokens_per_s)]
    step_s = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    return {
        "parameters": parameters,
        "decoder_parameters": decoder_parameters,
        "trained_parameters": sum(p.numel() for p in trainer.trainable.values()),
        "build_s": round(build_s, 1),
        "rss_built_mb": round(rss_built),
        "step_s": [round(s, 1) for s in step_s],
        "train_s": round(state.train_seconds, 1),
        "peak_rss_mb": round(max(peak_rss_mb(), rss_built)),
        "training_peak_rss_mb": round(peak_rss_mb()) if training_peak_only else None,
    }


def speed_side(args) -> dict:
    """Seconds per LoRA training step (forward and backward) of the default model in float32 and
    quantised (`args.quantize`), both in this process, their steps interleaved: on a shared,
    loaded host, separate runs compare the load of two moments more than the two bases."""
    import torch

    from finegrain.checkpoint.load import load_model
    from finegrain.peft import LoraConfig, apply_lora
    from finegrain.tasks.classification import ClassificationTask

    models = {}
    for quantize in (None, args.quantize):
        llama, _ = load_model(None, progress=False, quantize=quantize)
        model = ClassificationTask(["negative", "positive"]).build_model(llama)
        apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, targets="all-linear"))
        models[quantize or "float32"] = model.train()
    ids = torch.randint(3, 49152, (args.batch_size, args.length), generator=torch.Generator().manual_seed(0))
    seconds = {name: [] for name in models}
    cpu_seconds = {name: [] for name in models}  # all threads' CPU time: the work, whatever else the host runs
    for step in range(args.steps + 1):  # the first round warms up oneDNN and the kernels
        for name, model in models.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            model.model(ids)[:, -1].square().mean().backward()  # every layer trains: no frozen prefix
            if step:
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
    return {"wall": {name: sorted(s) for name, s in seconds.items()},
            "cpu": {name: sorted(s) for name, s in cpu_seconds.items()}}


def quantized_main(args) -> None:
    """`--quantize`: one training run on a quantised base (or, with `--speed`, the step-time ratio)."""
    passed = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--length", str(args.length),
              "--quantize", args.quantize, "--shape", args.shape, *(["--num-layers", str(args.num_layers)] * bool(args.num_layers))]
    if args.speed:
        measured = run_side(__file__, "speed", passed)
        print(f"SmolLM2-135M, LoRA r=8 all-linear, {args.steps} steps of {args.batch_size} x {args.length} tokens each way, "
              "interleaved")
        for clock, seconds in measured.items():
            for name, steps in seconds.items():
                print(f"{name:>8}: {' '.join(f'{s:.2f}' for s in steps)} {clock} s per step (sorted)")
        median = {clock: s["float32"][len(s["float32"]) // 2] / s[args.quantize][len(s[args.quantize]) // 2]
                  for clock, s in measured.items()}
        fastest = measured["wall"]["float32"][0] / measured["wall"][args.quantize][0]
        print(f"speed: {args.quantize} trains at x{median['wall']:.2f} the speed of float32 (median wall-clock step; "
              f"fastest x{fastest:.2f}; CPU time x{median['cpu']:.2f}; target >= 0.8: "
              f"{'met' if median['wall'] >= 0.8 else 'MISSED'})")
        return
    r = run_side(__file__, "train", passed)
    target = QUANTIZED_TARGET_GB[args.shape]
    print(f"model: {r['parameters'] / 1e9:.2f} B parameters ({args.shape} shape, decoder linear layers {args.quantize}), "
          f"{r['trained_parameters'] / 1e6:.1f} M trained (LoRA r=8 all-linear and the head)")
    training = f", peak RSS while training {r['training_peak_rss_mb']} MB" if r["training_peak_rss_mb"] else ""
    print(f"build {r['build_s']:.1f} s, peak RSS while building {r['rss_built_mb']} MB{training}, "
          f"step s {' '.join(f'{s:.1f}' for s in r['step_s'])}")
    gb = r["peak_rss_mb"] / 1024
    depth = f", first {args.num_layers} layers" if args.num_layers else ""
    print(f"memory: peak RSS {gb:.2f} GB with {args.quantize} on the {args.shape} shape{depth} "
          f"(target {target:g} GB: {'met' if gb <= target else 'OVER'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="under 2 minutes: 1 step at batch 2 x 64 tokens")
    parser.add_argument("--quantize", choices=["int8", "q4"], help="train once on a quantised base (model.quantize)")
    parser.add_argument("--shape", choices=["1b", "7b"], default="1b", help="with --quantize: TinyLlama-1.1B's or LLaMA-7B's")
    parser.add_argument("--num-layers", type=int, help="with --quantize: keep the shape's first N decoder layers "
                        "(a shorter run: the peak of the whole depth is extrapolated from two depths)")
    parser.add_argument("--speed", action="store_true", help="with --quantize: step time of the default model, float32 vs quantised")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps each way (default 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8")
    parser.add_argument("--length", type=int, default=None, help="tokens per example (default 128)")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["train", "speed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.quick else 6 if args.speed else 2)
    args.batch_size = args.batch_size or (2 if args.quick else 5 if args.speed else 8)
    args.length = args.length or (64 if args.quick or args.speed else 128)
    if args.side:
        print(json.dumps((speed_side if args.side == "speed" else train_side)(args)))
        return
    if args.quantize:
        quantized_main(args)
        return

    print_facts(machine_facts())
    ceiling = matmul_ceiling_gflops()
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s; {args.steps} steps at batch {args.batch_size} x {args.length} tokens")
    passed = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--length", str(args.length)]
    runs = {"off": run_side(__file__, "train", passed), "on": run_side(__file__, "train", [*passed, "--checkpointing"])}
    print(f"model: {runs['off']['parameters'] / 1e9:.2f} B parameters (LM head included; the classifier drops it), "
          f"{runs['off']['trained_parameters'] / 1e6:.1f} M trained (LoRA r=8 all-linear and the head)")
    print(f"{'checkpointing':>14} {'build s':>8} {'RSS built MB':>13} {'peak RSS MB':>12} {'step s':>14} {'ceiling %':>10}")
    # 4 FLOPs per decoder parameter per token; embeddings are a lookup, the LM head never runs.
    flops_per_step = 4 * runs["off"]["decoder_parameters"] * args.batch_size * args.length
    for name, r in runs.items():
        share = 100 * flops_per_step / (sum(r["step_s"]) / len(r["step_s"])) / (ceiling * 1e9)
        print(f"{name:>14} {r['build_s']:>8.1f} {r['rss_built_mb']:>13} {r['peak_rss_mb']:>12} "
              f"{' '.join(f'{s:.1f}' for s in r['step_s']):>14} {share:>9.1f}%")
    off, on = runs["off"], runs["on"]

    def verdict(r: dict) -> str:
        return f"{r['peak_rss_mb'] / 1024:.2f} GB ({'under' if r['peak_rss_mb'] / 1024 < LIMIT_GB else 'OVER'} {LIMIT_GB})"

    print(f"memory: peak RSS {verdict(off)} without, {verdict(on)} with activation checkpointing, step time "
          f"x{on['train_s'] / off['train_s']:.2f} with checkpointing")


if __name__ == "__main__":
    main()
