"""Shared by the benchmarks: machine facts, the matmul ceiling, peak RSS, side-by-side
subprocesses, and the transformers+PEFT peer of the Rotten Tomatoes classification runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from finegrain.cpu import peak_rss_mb

# Parameters of one SmolLM2-135M decoder layer: q and o (576 x 576), k and v (576 x 192),
# gate, up and down (576 x 1536); norms are negligible. 30 layers: 106 M without embeddings.
SMOLLM2_LAYER_PARAMS = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
SMOLLM2_LAYERS = 30
LABELS = {"fresh": 1, "rotten": 0}  # the peer's class indices


def machine_facts() -> dict:
    """The machine a figure was measured on. `cpu` carries the CPU family and model where
    /proc/cpuinfo gives them: hosts named alike ("AMD EPYC") have been Zen 2, 3 and 4."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields and "model" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def matmul_ceiling_gflops(n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a large fp32 matmul on all cores: the dense-compute ceiling of this machine.

    The faster of PyTorch's two CPU matmuls: MKL's (`a @ b`) and oneDNN's, which finegrain's
    frozen linear layers use (on Zen 4, 2048^3 ran at ~180 and ~215 GFLOP/s).
    """
    from finegrain.model.linear import matmul_t, onednn_available

    a, b = torch.randn(n, n), torch.randn(n, n)
    products = [lambda: a @ b] + ([lambda: matmul_t(a, b)] if onednn_available() else [])
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def ceiling_share(tokens_per_s: float, layers: int, ceiling_gflops: float) -> float:
    """Percent of the matmul ceiling reached by LoRA training through `layers` SmolLM2 layers at
    `tokens_per_s` (a frozen layer costs ~4 FLOPs per parameter per token: forward, and the
    backward pass to its input)."""
    return 100 * 4 * SMOLLM2_LAYER_PARAMS * layers * tokens_per_s / (ceiling_gflops * 1e9)


def peer_base() -> Path:
    """The default model's GGUF as a transformers directory (float32 safetensors, config, tokenizer)
    for the peer to load: converting the GGUF takes transformers ~16 s a load, reading the
    directory well under one. Built once per machine under the temporary directory, keyed by the
    GGUF's size and time, and renamed into place whole. A model class loaded from it gets the same
    weights as from the GGUF and draws its new head from the same random numbers (checked for
    sequence and token classification)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finegrain.checkpoint.load import resolve_model

    gguf = resolve_model(None)
    stat = gguf.stat()
    directory = Path(tempfile.gettempdir(), f"finegrain-peer-{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}")
    if not (directory / "config.json").is_file():
        state = torch.random.get_rng_state()  # the conversion must not move the caller's seed
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantized to float32 already; transformers refuses to save a "gguf" model
        del model.config.quantization_config
        building = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        model.save_pretrained(building)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(building)
        torch.random.set_rng_state(state)
        try:
            building.rename(directory)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(building, ignore_errors=True)
    return directory


def reset_peak_rss() -> None:
    """Start this process's peak RSS (`peak_rss_mb`) again from its present memory, after giving
    freed memory back to the system, so that one process can measure several runs in turn. Linux
    only (/proc/self/clear_refs); elsewhere the peak keeps counting from the process's start."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_side(script: str, side: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one side of a benchmark in its own process (so peak RSS is its own); it prints JSON last.
    `env`: variables to add to its environment."""
    result = subprocess.run(
        [sys.executable, script, "--side", side, *args], capture_output=True, text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"{side} side failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_facts(facts: dict) -> None:
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))


def write_peer_split(directory: Path, n_train: int, n_test: int, max_length: int = 64) -> tuple[Path, Path]:
    """`benchmark_split` as train.jsonl and test.jsonl."""
    from finegrain.data.readers import write_examples

    train_examples, test_examples = benchmark_split(n_train, n_test, max_length)
    paths = Path(directory, "train.jsonl"), Path(directory, "test.jsonl")
    write_examples(paths[0], train_examples)
    write_examples(paths[1], test_examples)
    return paths


SHORT_LENGTH = 64  # the peer script's max_length; Rotten Tomatoes snippets are ~25 tokens
CHARS_PER_TOKEN = 6  # English text is ~4.3 characters per SmolLM2 token: 6 leaves a margin


def benchmark_split(n_train: int, n_test: int, max_length: int = SHORT_LENGTH) -> tuple[list, list]:
    """The texts both sides train and test on.

    Up to 64 tokens: the peer's own split (`rotten_tomatoes_peer_split`). Longer: Rotten Tomatoes
    has no texts that long, so each text is built from snippets of one label (fresh or rotten)
    joined until it holds at least `max_length * CHARS_PER_TOKEN` characters, enough to be cut at
    `max_length` tokens. Text i takes the label of snippet i and starts with it; the rest come in
    turn from that label's snippets, so snippets recur across texts but never cross between the
    training pool (the peer's shuffled rows but the last 1,000) and the test pool (those 1,000).
    """
    from finegrain.datasets import rotten_tomatoes, rotten_tomatoes_peer_split

    if max_length <= SHORT_LENGTH:
        return rotten_tomatoes_peer_split(n_train, n_test)
    train_pool, test_pool = rotten_tomatoes_peer_split(len(rotten_tomatoes()) - 1000, 1000)
    chars = max_length * CHARS_PER_TOKEN
    return joined_texts(train_pool, n_train, chars), joined_texts(test_pool, n_test, chars)


def joined_texts(pool: list, n: int, min_chars: int) -> list:
    """n examples, each snippets of one label from `pool` joined to at least `min_chars` characters."""
    from finegrain.data.readers import Example

    by_label: dict[str, list] = {}
    for example in pool:
        by_label.setdefault(example.label, []).append(example)
    cursor = dict.fromkeys(by_label, 0)
    texts = []
    for i in range(n):
        first = pool[i % len(pool)]
        same = by_label[first.label]
        parts = [first.text]
        while sum(len(part) + 1 for part in parts) < min_chars:
            parts.append(same[cursor[first.label] % len(same)].text)
            cursor[first.label] += 1
        texts.append(Example(text=" ".join(parts), label=first.label, source=f"joined:{i + 1}"))
    return texts


def finegrain_classification(n_train: int, n_test: int, epochs: int, max_length: int = SHORT_LENGTH, seed: int = 0,
                             peft: dict | None = None, lr: float = 3e-4, bf16: bool = False) -> dict:
    """finegrain's side of the peer's run: `finegrain.run.train` on `benchmark_split` with the peer's
    settings (no recipe, constant lr without warmup, decay or clipping, batch 16, no baselines).

    `peft`: the run config's `peft:` section; None is LoRA r=8 alpha=16 dropout=0.05 on q_proj/v_proj
    of every layer, as the peer. Returns what `peer_classification` returns, less predictions."""
    import tempfile

    from finegrain.config import RunConfig, from_dict
    from finegrain.run import train

    with tempfile.TemporaryDirectory() as tmp:
        train_path, test_path = write_peer_split(Path(tmp), n_train, n_test, max_length)
        config = from_dict(RunConfig, {
            "model": {"name": None},
            "data": {"train": str(train_path), "test": str(test_path), "split": [1.0, 0.0, 0.0],
                     "max_length": max_length, "long_texts": "truncate", "baselines": False},
            "peft": peft or {"method": "lora"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
            "train": {"epochs": epochs, "lr": lr, "batch_size": 16, "schedule": "constant",
                      "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": None, "seed": seed,
                      "bf16": bf16, "recipe": "off"},
            "output": str(Path(tmp, "run")),
        }, "benchmark")
        results = train(config, progress=False)
    tokens = results["train"]["tokens_per_s"] * results["train"]["train_seconds"]
    return side_summary(results, tokens_per_text=round(tokens / (n_train * epochs), 1),
                        accuracy=results["test"]["accuracy"], macro_f1=results["test"]["macro"]["f1"])


def side_summary(results: dict, **scores) -> dict:
    """What a benchmark's finegrain side reports of a `finegrain.run.train` result: training time and
    tokens/s, `scores`, trainable parameters and this process's peak RSS."""
    return {
        "train_s": results["train"]["train_seconds"],
        "tokens_per_s": results["train"]["tokens_per_s"],
        **scores,
        "trainable": results["train"]["trainable_parameters"],
        "peak_rss_mb": round(peak_rss_mb()),
    }


def peer_lora(model):
    """The peer script's adapter: PEFT LoRA r=8 alpha=16 dropout=0.05 on q_proj/v_proj, task SEQ_CLS."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))


def peer_classification(n_train: int, n_test: int, epochs: int, eval_batch: int = 32, bf16: bool = False,
                        max_length: int = SHORT_LENGTH, seed: int = 0, adapt=peer_lora, lr: float = 3e-4,
                        after_step=None) -> dict:
    """transformers+PEFT LoRA classification: the loop of /work/shared/peer/hf_peft_rotten_tomatoes.py.

    SmolLM2 GGUF dequantized to float32, LoRA r=8 alpha=16 dropout=0.05 on q_proj/v_proj of all
    30 layers (task SEQ_CLS), AdamW lr 3e-4, batch 16 in shuffled order padded to its longest
    text (left padding), at most 64 tokens; the global `random` and torch seeds follow the
    script's, so its 2,000 x 2 run reproduces the 0.830 it reports. `bf16`: the training
    forward under bf16 autocast (what transformers' Trainer does with `bf16=True` on a CPU).
    `seed` replaces the script's 0 in both seeds. `adapt(model)` returns the model to train (the
    script's LoRA by default; `benchmarks/methods.py` passes PEFT's other methods), `lr` its
    learning rate, and `after_step(model, step)` runs after each optimizer step (AdaLoRA's rank
    allocation). `max_length` above 64 trains on
    `benchmark_split`'s joined texts, cut at that length; a batch of 16 then runs as
    micro-batches of at most 2,048 tokens whose losses are weighted by their share of the
    batch (gradient accumulation, the same gradient), as 16 x 512 tokens of activations
    would not fit beside other work.

    Returns:
        load_s, train_s (the loop only), tokens_per_s (real tokens), eval_s, accuracy,
        macro_f1, predictions (labels of the test examples in split order), peak_rss_mb.
    """
    import random

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finegrain.datasets import rotten_tomatoes
    from finegrain.evaluate.metrics import classification_metrics

    started = time.perf_counter()
    torch.manual_seed(seed)
    train_examples, test_examples = benchmark_split(n_train, n_test, max_length)
    # The script shuffles all rows with the global generator after random.seed(0), and its
    # epoch shuffles continue from there; a shuffle's draws depend only on the list's length.
    random.seed(seed)
    random.shuffle(list(range(len(rotten_tomatoes()))))
    train = [(e.text, LABELS[e.label]) for e in train_examples]
    test = [(e.text, LABELS[e.label]) for e in test_examples]
    base = peer_base()  # the default model's GGUF, dequantized
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token_id = 2
    tok.padding_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 2
    model = adapt(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    load_s = time.perf_counter() - started
    batch, ntok, steps = 16, 0, 0
    micro = max(1, min(batch, 2048 // max_length))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        random.shuffle(train)
        for i in range(0, len(train), batch):
            rows = train[i : i + batch]
            for j in range(0, len(rows), micro):
                part = rows[j : j + micro]
                enc = tok([t for t, _ in part], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(**enc, labels=torch.tensor([y for _, y in part]))
                (out.loss * (len(part) / len(rows))).backward()
                ntok += int(enc.attention_mask.sum())
            opt.step()
            steps += 1
            if after_step is not None:  # before zero_grad: AdaLoRA scores weights by this step's gradients
                after_step(model, steps)
            opt.zero_grad()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    model.eval()
    predicted = []
    with torch.no_grad():
        for i in range(0, len(test), eval_batch):
            enc = tok([t for t, _ in test[i : i + eval_batch]], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            predicted += model(**enc).logits.argmax(-1).tolist()
    eval_s = time.perf_counter() - start
    names = {v: k for k, v in LABELS.items()}
    predictions = [names[p] for p in predicted]
    metrics = classification_metrics([e.label for e in test_examples], predictions, sorted(LABELS))
    return {
        "load_s": round(load_s, 2),
        "train_s": round(train_s, 2),
        "tokens_per_s": round(ntok / train_s, 1),
        "tokens_per_text": round(ntok / (len(train) * epochs), 1),
        "eval_s": round(eval_s, 2),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro"]["f1"],
        "predictions": predictions,
        "trainable": sum(p.numel() for p in trainable),
        "peak_rss_mb": round(peak_rss_mb()),
    }
