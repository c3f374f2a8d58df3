"""Greedy generation with the default model: finegrain against transformers, same prompts, one run.

    python benchmarks/generate.py [--quick] [--new-tokens 64]

Each side runs in its own process (peak RSS is its own) and reports prefill tokens/s (prompt
tokens over the time to the first new token), decode tokens/s (new tokens after the first
over the time they took, every sequence forced to the full length; each the best of 3 runs)
and peak RSS, at batch 1 and batch 8: finegrain in float32 (exact) and with int8 weights
(`finegrain generate --int8`, an approximation: int8 weights, fused q/k/v and gate/up
projections, each decoding step run whole in finegrain's C kernels), transformers in
float32; and, when
`llama-cpp-python` is installed (optional: its install compiles llama.cpp, ~35 minutes on one
core), llama.cpp on the same Q4_1 GGUF at batch 1.
The last line: `decode speedup vs transformers: X.XX` (batch 1, int8; the float32 ratio follows
in brackets).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, matmul_ceiling_gflops, peak_rss_mb, print_facts, run_side  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "In 1969, the first people to walk on the Moon were",
    "The three most important ideas in economics are",
    "Once upon a time, in a small village by the mountains,",
    "Photosynthesis is the process by which",
    "Here is a list of healthy breakfast foods:",
]


def finegrain_side(args) -> dict:
    from finegrain import load_model
    from finegrain.generation import generate

    model, tokenizer = load_model(progress=False)
    if args.int8:
        from finegrain.model.quantize import quantize_int8

        quantize_int8(model)
    timings = {}
    for batch in args.batches:
        prompts = PROMPTS[:batch]
        prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
        first, total = timed(lambda n: generate(model, tokenizer, prompts, max_new_tokens=n, ignore_eos=True), args.new_tokens)
        timings[batch] = (prompt_tokens, first, total)
    return report(timings, args.new_tokens)


def transformers_side(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finegrain.checkpoint.load import resolve_model

    gguf = resolve_model(None)  # the default model's GGUF
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = 2
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    def run(prompts, new_tokens):
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=2)

    timings = {}
    for batch in args.batches:
        prompts = PROMPTS[:batch]
        prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
        first, total = timed(lambda n: run(prompts, n), args.new_tokens)
        timings[batch] = (prompt_tokens, first, total)
    return report(timings, args.new_tokens)


def llama_cpp_side(args) -> dict:
    """llama.cpp (llama-cpp-python) on the same GGUF file, batch 1, greedy, as many threads as torch."""
    import llama_cpp
    import numpy as np
    import torch

    from finegrain.checkpoint.load import resolve_model

    llm = llama_cpp.Llama(str(resolve_model(None)), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)

    def run(prompt: str, new_tokens: int) -> None:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode()))
        for _ in range(new_tokens - 1):  # no EOS check: every sequence runs to full length
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    prompt = PROMPTS[0]
    first, total = timed(lambda n: run(prompt, n), args.new_tokens)
    return report({1: (len(llm.tokenize(prompt.encode())), first, total)}, args.new_tokens)


def timed(run, new_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds to the first new token and to all `new_tokens`, each the best of `repeats` runs
    after a warm-up (the least disturbed by whatever else the machine is doing)."""
    run(2)

    def best(n: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(1), best(new_tokens)


def report(timings: dict, new_tokens: int) -> dict:
    out = {"peak_rss_mb": round(peak_rss_mb())}
    for batch, (prompt_tokens, first, total) in timings.items():
        out[f"batch{batch}"] = {
            "prefill_tok_s": round(prompt_tokens / first, 1),
            "decode_tok_s": round(batch * (new_tokens - 1) / max(total - first, 1e-9), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer new tokens, batch 1 only: under 2 minutes")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    if args.side:
        print(json.dumps(SIDES[args.side](args)))
        return

    facts = machine_facts()
    print_facts(facts)
    print(f"matmul ceiling: {matmul_ceiling_gflops():.1f} GFLOP/s (fp32, {facts['threads']} threads)")
    passed = ["--new-tokens", str(args.new_tokens), "--batches", *map(str, args.batches)]
    sides = {
        "finegrain": run_side(__file__, "finegrain", passed),
        "finegrain int8": run_side(__file__, "finegrain", [*passed, "--int8"]),
        "transformers": run_side(__file__, "transformers", passed),
    }
    if importlib.util.find_spec("llama_cpp"):  # optional: `pip install llama-cpp-python` compiles llama.cpp
        sides["llama.cpp"] = run_side(__file__, "llama.cpp", passed)
    theirs = sides["transformers"]
    print(f"{'':>14} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for name, result in sides.items():
        for batch in args.batches:
            row = result.get(f"batch{batch}")
            if row is None:
                continue
            print(f"{name:>14} {batch:>5} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.2f} {result['peak_rss_mb']:>12}")
    ratio = {}
    for name in ("finegrain", "finegrain int8"):
        for batch in args.batches:
            a, b = sides[name][f"batch{batch}"], theirs[f"batch{batch}"]
            print(f"{name}, batch {batch}: prefill x{a['prefill_tok_s'] / b['prefill_tok_s']:.2f}, "
                  f"decode x{a['decode_tok_s'] / b['decode_tok_s']:.2f}")
        print(f"{name}: peak RSS x{sides[name]['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")
        ratio[name] = sides[name]["batch1"]["decode_tok_s"] / theirs["batch1"]["decode_tok_s"]
    if "llama.cpp" in sides:
        print(f"finegrain int8 / llama.cpp (its Q4_1 kernels), batch 1: decode "
              f"x{sides['finegrain int8']['batch1']['decode_tok_s'] / sides['llama.cpp']['batch1']['decode_tok_s']:.2f}")
    print(f"decode speedup vs transformers: {ratio['finegrain int8']:.2f} "
          f"(batch 1, int8 weights, opt-in approximation; exact float32: {ratio['finegrain']:.2f})")


SIDES = {"finegrain": finegrain_side, "transformers": transformers_side, "llama.cpp": llama_cpp_side}

if __name__ == "__main__":
    main()
