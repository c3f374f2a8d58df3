"""finegrain's C attention against RoPE + PyTorch's SDPA, in one process, alternating.

    python benchmarks/attention.py [--lengths 64,128,256,384,512] [--tokens 512] [--rounds 15] [--layers N]

The default model's attention shape (9 heads, 3 KV heads, head_dim 64), float32, causal.
At each length T it times, round after round (C, SDPA, C, SDPA, ...) so both meet the same
load: forward + backward (training) and the forward alone under `torch.no_grad()` (the
prefix-cache pass and scoring), over max(1, tokens // T) sequences. Prints the median time
of each and the median over rounds of each round's ratio SDPA / C (above 1: the C attention
is faster); the two calls of a round run back to back, so the ratio holds up better than the
times on a shared host, which varies from second to second.

`--layers N` times instead the first N decoder layers of the default model (its GGUF) without
autograd, as the frozen-prefix pass and the test pass run them, on `tokens` tokens of random
ids per call: the C attention up to 128 tokens as before 2026-12-04 (RoPE + SDPA above), then
up to `fused.MAX_ATTENTION_LENGTH`, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from finegrain.model import fused
from finegrain.model.ops import apply_rope

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def rope_tables(B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (100000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = torch.arange(T).float()[None, :, None] * inv_freq  # (1, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1)[:, None].expand(B, 1, T, HEAD_DIM), torch.cat((-sin, sin), -1)[:, None].expand(B, 1, T, HEAD_DIM)


def sdpa(q, k, v, cos, sin):
    """What llama.py's Attention runs without the C kernels."""
    B, T, _ = q.shape
    q = apply_rope(q.view(B, T, HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
    v = v.view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM)


def ours(q, k, v, cos, sin):
    y = fused.rope_attention(q, k, v, cos, sin, HEADS, KV_HEADS)
    assert y is not None, "the C attention declined this length"
    return y


def timed(function, inputs, grad, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        torch.autograd.grad(function(*inputs), inputs[:3], grad)
    else:
        with torch.no_grad():
            function(*inputs)
    return time.perf_counter() - start


def measure(T: int, tokens: int, rounds: int) -> dict:
    B = max(1, tokens // T)
    torch.manual_seed(0)
    q = torch.randn(B, T, HEADS * HEAD_DIM, requires_grad=True)
    k = torch.randn(B, T, KV_HEADS * HEAD_DIM, requires_grad=True)
    v = torch.randn(B, T, KV_HEADS * HEAD_DIM, requires_grad=True)
    inputs = (q, k, v, *rope_tables(B, T))
    grad = torch.randn(B, T, HEADS * HEAD_DIM)
    times = {(name, mode): [] for name in ("C", "SDPA") for mode in ("train", "no_grad")}
    for round_ in range(rounds + 1):  # round 0 warms up
        for mode in ("train", "no_grad"):
            for name, function in (("C", ours), ("SDPA", sdpa)):
                elapsed = timed(function, inputs, grad, mode == "train")
                if round_:
                    times[name, mode].append(elapsed)
    medians = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    ratios = {mode: statistics.median(s / c for s, c in zip(times["SDPA", mode], times["C", mode]))
              for mode in ("train", "no_grad")}
    return {"B": B, **medians, **ratios}


def measure_layers(T: int, tokens: int, rounds: int, layers: int, backbone) -> dict:
    """The no-grad pass through `layers` real decoder layers, C attention capped at 128 against uncapped."""
    B = max(1, tokens // T)
    x = backbone.embed_tokens(torch.randint(0, backbone.config.vocab_size, (B, T)))
    limits = {"before": 128, "after": fused.MAX_ATTENTION_LENGTH}
    times: dict[str, list[float]] = {name: [] for name in limits}
    try:
        with torch.no_grad():
            for round_ in range(rounds + 1):
                for name, limit in limits.items():
                    fused.MAX_ATTENTION_LENGTH = limit
                    start = time.perf_counter()
                    backbone.run_layers(x, end=layers)
                    if round_:
                        times[name].append(time.perf_counter() - start)
    finally:
        fused.MAX_ATTENTION_LENGTH = limits["after"]
    return {"B": B, **{name: statistics.median(values) * 1e3 for name, values in times.items()},
            "ratio": statistics.median(b / a for b, a in zip(times["before"], times["after"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,128,256,384,512", help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per call: max(1, tokens // T) sequences")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per length (medians)")
    parser.add_argument("--layers", type=int, default=0,
                        help="time N real decoder layers without autograd, before and after (see above)")
    args = parser.parse_args()
    if args.layers:
        from finegrain.checkpoint.load import load_model

        backbone = load_model(None, progress=False)[0].model
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layers, no autograd")
        print(f"{'T':>5} {'B':>3} {'before ms':>10} {'after ms':>9} {'ratio':>6}")
        for T in (int(length) for length in args.lengths.split(",")):
            r = measure_layers(T, args.tokens, args.rounds, args.layers, backbone)
            print(f"{T:>5} {r['B']:>3} {r['before']:>10.1f} {r['after']:>9.1f} {r['ratio']:>6.2f}")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; heads {HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}")
    print(f"{'T':>5} {'B':>3} {'train C ms':>11} {'SDPA ms':>8} {'ratio':>6} {'no-grad C ms':>13} {'SDPA ms':>8} {'ratio':>6}")
    for T in (int(length) for length in args.lengths.split(",")):
        r = measure(T, args.tokens, args.rounds)
        print(f"{T:>5} {r['B']:>3} {r['C', 'train']:>11.2f} {r['SDPA', 'train']:>8.2f} "
              f"{r['train']:>6.2f} {r['C', 'no_grad']:>13.2f} {r['SDPA', 'no_grad']:>8.2f} {r['no_grad']:>6.2f}")


if __name__ == "__main__":
    main()
