"""A quantised frozen base (`model.quantize: int8 | q4`): linear layers that keep int8 or 4-bit weights.

With `model.quantize` set, every linear layer inside the decoder layers (q, k, v, o, gate, up,
down) is a `QuantLinear` from the moment it is read (`finegrain.checkpoint`): its weight is
never a float32 tensor, so a 1.1B model trains LoRA in about a third of the memory (and a 7B
model fits a 24 GB machine). Each layer is quantised as it is read, so no float32 copy of the
whole model ever exists. The embeddings, norms and the output head stay as loaded (a lookup,
small vectors, and a head most small models tie to the embeddings); adapters, task heads and
the optimizer stay float32.

Formats (`QuantizedWeight.format`):
    int8: symmetric int8, one float32 scale per output channel (the largest weight of a row maps
        to 127.5, as `finegrain.model.quantize` rounds for decoding).
    q4_0, q4_1, q4_k: llama.cpp's 4-bit GGUF blocks, byte for byte. `q4` keeps a GGUF's own
        Q4_0/Q4_1/Q4_K tensors as they are stored (so on the bundled Q4_1 model `q4` computes
        with exactly the weights a float32 load dequantizes); every other source (float
        checkpoints, GGUF tensors of another type) is quantised to Q4_1 (blocks of 32: a float16
        step and minimum, 5 bits per weight), as gguf-py's reference quantiser does.

Forward, y = x W^T + b, and backward, the input's gradient g W (the weight is frozen: no
gradient reaches it), run in finegrain's C kernels (`qlinear.c`) where a C compiler is
available and in PyTorch otherwise, to the same numbers (float32 rounding): a product of many
rows dequantises the weight one tile at a time (at most `TILE_ELEMENTS` floats) and multiplies
it in oneDNN/MKL, as a float32 layer does; a few rows (decoding, a classifier's last position)
are multiplied straight from the blocks. Nothing float32 is kept between calls.

An approximation: outputs differ from the float32 model by the weights' rounding (none for
`q4` on a Q4 GGUF). On the main job (`finegrain train examples/rotten_tomatoes.yaml`) test
accuracy stays within 0.01 of the float32 base; docs/PERFORMANCE.md has the measurements.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model import native
from finegrain.model.linear import MIN_ROWS, matmul_grad, matmul_t

CHOICES = ("int8", "q4")  # model.quantize (or null: float weights)
FORMATS = {"int8": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3}  # the format codes of qlinear.c
BLOCK = {"int8": 1, "q4_0": 32, "q4_1": 32, "q4_k": 256}  # elements per block
BLOCK_BYTES = {"int8": 1, "q4_0": 18, "q4_1": 20, "q4_k": 144}
GGUF_KEPT = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k"}  # GGUF tensor types `q4` keeps as stored
FLOAT_Q4 = "q4_1"  # what `q4` makes of any other source
TILE_ELEMENTS = 1 << 22  # float32 weights dequantised at a time (16 MB) for a many-row product
_scratch = threading.local()  # each thread's tile buffer, reused: fresh pages cost more than the dequantising
_QUANTIZED = re.compile(r"(?:.*\.)?layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def quantizes(name: str) -> bool:
    """Whether `model.quantize` stores the checkpoint tensor `name` quantised (decoder linear weights)."""
    return _QUANTIZED.fullmatch(name) is not None


def check_choice(quantize: str | None) -> None:
    """A one-line error unless `quantize` is one of `CHOICES` or None."""
    if quantize is not None and quantize not in CHOICES:
        raise FinegrainError(f"model.quantize: '{quantize}' is unknown; use one of null, {', '.join(CHOICES)}")


@dataclass
class QuantizedWeight:
    """A (out_features, in_features) weight as a checkpoint reader hands it to `QuantLinear`.

    Attributes:
        format: a key of `FORMATS`.
        data: int8 (out, in) for int8; the blocks of each row as uint8 (out, row bytes) otherwise.
        scale: (out,) float32 for int8; None for the block formats, whose scales are in the blocks.
        in_features: the row length in weights.
    """

    format: str
    data: torch.Tensor
    scale: torch.Tensor | None
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features


def quantize_weight(weight: torch.Tensor, quantize: str, name: str = "a linear layer") -> QuantizedWeight:
    """Quantise a float weight (out, in): `int8` per output channel, `q4` to Q4_1 blocks.

    Raises:
        FinegrainError: `q4` on rows that are not whole blocks of 32.
    """
    weight = weight.detach().float()
    if quantize == "int8":
        data, scale = int8_rows(weight)
        return QuantizedWeight("int8", data, scale, weight.shape[1])
    if weight.shape[1] % BLOCK[FLOAT_Q4]:
        raise FinegrainError(
            f"model.quantize: q4 stores blocks of 32 weights, and {name} has rows of {weight.shape[1]}; "
            f"use model.quantize: int8 (or null)"
        )
    return QuantizedWeight(FLOAT_Q4, q4_1_blocks(weight), None, weight.shape[1])


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights (out, in) and one float32 scale per row (out,).

    torch.ao's symmetric per-channel observer: the largest weight of a row maps to 127.5.
    """
    scale = (weight.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def q4_1_blocks(weight: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 blocks (out, in / 32 * 20) of a float32 weight, byte for byte what gguf-py's
    `quants.quantize(..., Q4_1)` writes: per 32 weights a float16 step d = (max - min) / 15 and
    minimum m, then 16 bytes of nibbles q = round((w - m) / d) (low nibbles the first 16)."""
    out_features = weight.shape[0]
    blocks = weight.reshape(out_features, -1, 32)  # (out, nb, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (high - low) / 15
    inverse = torch.where(step == 0, 0.0, 1 / step)
    q = (blocks - low).mul_(inverse).add_(0.5).trunc_().clamp_(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # (out, nb, 16)
    halves = [t.half().view(torch.uint8) for t in (step, low)]  # (out, nb, 2) each
    return torch.cat([*halves, nibbles], dim=-1).reshape(out_features, -1)


def dequantize(
    weight: QuantizedWeight, rows: slice = slice(None), columns: slice = slice(None), out: torch.Tensor | None = None
) -> torch.Tensor:
    """The float32 weights of `weight` in `rows` x `columns` (whole blocks, or to the row's end).

    The C kernel where it builds, else PyTorch (`dequantize_reference`), to the same numbers.
    `out`: a float32 buffer of at least that many elements to write them into (`QuantLinear` reuses one).
    """
    out_features, in_features = weight.shape
    r0, r1, _ = rows.indices(out_features)
    c0, c1, _ = columns.indices(in_features)
    lib = native.library()
    if lib is None or weight.data.device.type != "cpu":
        return dequantize_reference(weight, rows, columns)
    tile = torch.empty(r1 - r0, c1 - c0) if out is None else out[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
    data, scale = weight.data, weight.scale
    lib.fg_q_dequantize(
        FORMATS[weight.format], data.data_ptr() + r0 * data.stride(0) * data.element_size(), data.stride(0),
        None if scale is None else scale.data_ptr() + 4 * r0, r1 - r0, c0, c1 - c0, tile.data_ptr(),
    )
    return tile


def dequantize_reference(
    weight: QuantizedWeight, rows: slice = slice(None), columns: slice = slice(None)
) -> torch.Tensor:
    """`dequantize` in PyTorch: the fallback without a C compiler and the tests' reference."""
    fmt, (r0, r1, _), (c0, c1, _) = weight.format, rows.indices(weight.shape[0]), columns.indices(weight.shape[1])
    if fmt == "int8":
        return weight.data[r0:r1, c0:c1].float() * weight.scale[r0:r1, None]
    block, size = BLOCK[fmt], BLOCK_BYTES[fmt]
    blocks = weight.data[r0:r1, c0 // block * size : -(-c1 // block) * size].reshape(r1 - r0, -1, size)  # (R, nb, size)

    def half(at: int) -> torch.Tensor:  # the float16 at byte `at` of each block: (R, nb, 1)
        return blocks[..., at : at + 2].contiguous().view(torch.float16).float()

    def nibbles(q: torch.Tensor) -> torch.Tensor:  # bytes (..., n) -> (..., 2n): the low nibbles, then the high
        return torch.cat([q & 15, q >> 4], dim=-1).float()

    if fmt == "q4_0":
        values = (nibbles(blocks[..., 2:]) - 8) * half(0)
    elif fmt == "q4_1":
        values = half(0) * nibbles(blocks[..., 4:]) + half(2)
    else:  # q4_k: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes
        s = blocks[..., 4:16].long()  # (R, nb, 12)
        scales = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1).float()
        mins = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1).float()
        q = nibbles(blocks[..., 16:].reshape(r1 - r0, -1, 4, 32))  # (R, nb, 4, 64): each 64 = 32 low, 32 high
        q = q.reshape(r1 - r0, -1, 8, 32)  # (R, nb, 8 sub-blocks, 32)
        values = (half(0) * scales)[..., None] * q - (half(2) * mins)[..., None]
    values = values.reshape(r1 - r0, -1)
    start = c0 - c0 // block * block
    return values[:, start : start + c1 - c0]


class QuantLinear(nn.Linear):
    """A frozen linear layer whose weight stays int8 or 4-bit (`QuantizedWeight`).

    It is an `nn.Linear` to everything that finds linear layers by type (LoRA's `targets`, the
    adapter files' target lists), but it has no float `weight`: reading one raises the one-line
    `model.quantize` error, so a method or tool that needs the float weight (merging, fusing for
    decoding, a method that rescales the weight) says so instead of computing with bytes.
    `peft.method: lora` trains on it (`finegrain.peft.lora.LoraLinear`). The stored tensors are
    the buffers `blocks` and `scale` (int8 only) and the frozen float32 `bias`, if any.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.out_features, self.in_features = weight.shape
        self.format = weight.format
        self.register_buffer("blocks", weight.data)
        self.register_buffer("scale", weight.scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._int8_view: native.Linear | None = None

    @property
    def weight(self) -> torch.Tensor:
        raise FinegrainError(
            f"model.quantize: this {self.out_features}x{self.in_features} layer keeps {self.format} weights, not a "
            "float weight, which this step needs; set model.quantize: null "
            "(choices: null, int8, q4; LoRA trains on int8/q4)"
        )

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.format, self.blocks, self.scale, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def dequantize(self, rows: slice = slice(None), columns: slice = slice(None)) -> torch.Tensor:
        """The float32 weight (out, in), or a tile of it."""
        return dequantize(self.quantized_weight, rows, columns)

    def _tile(self, rows: slice = slice(None), columns: slice = slice(None)) -> torch.Tensor:
        """`dequantize` into this thread's scratch buffer, valid until the thread's next tile.

        A fresh tile per call would be fresh memory: on the test host the page faults of a new
        16 MB buffer took ~100x as long as dequantising into it."""
        (r0, r1, _), (c0, c1, _) = rows.indices(self.out_features), columns.indices(self.in_features)
        buffer = getattr(_scratch, "buffer", None)
        if buffer is None or buffer.numel() < (r1 - r0) * (c1 - c0):
            buffer = _scratch.buffer = torch.empty(max(TILE_ELEMENTS, (r1 - r0) * (c1 - c0)))
        return dequantize(self.quantized_weight, rows, columns, out=buffer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return QuantLinearFunction.apply(x, self)
        return self.matmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b with no autograd: (..., in) -> (..., out), float32."""
        rows = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        lib = native.library()
        if lib is not None and rows.shape[0] < MIN_ROWS:
            y = self._few_rows(lib, rows)
        else:
            y = self._tiled(rows)
        return y.view(*x.shape[:-1], self.out_features)

    def matmul_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The input's gradient g W: (..., out) -> (..., in), one row tile of W at a time."""
        g = grad.reshape(-1, self.out_features).float()  # (N, out)
        step = max(1, TILE_ELEMENTS // self.in_features)
        if step >= self.out_features:
            grad_x = matmul_grad(g, self._tile())
        else:
            grad_x = torch.zeros(g.shape[0], self.in_features)
            for r0 in range(0, self.out_features, step):
                grad_x.addmm_(g[:, r0 : r0 + step], self._tile(rows=slice(r0, r0 + step)))
        return grad_x.view(*grad.shape[:-1], self.in_features)

    def _tiled(self, rows: torch.Tensor) -> torch.Tensor:
        """Many rows: W dequantised a tile of columns at a time, each multiplied in oneDNN/MKL."""
        block = BLOCK[self.format]
        step = max(block, TILE_ELEMENTS // self.out_features // block * block)
        if step >= self.in_features:
            return matmul_t(rows, self._tile(), self.bias)
        y = torch.zeros(rows.shape[0], self.out_features)
        if self.bias is not None:
            y += self.bias
        for c0 in range(0, self.in_features, step):
            y.addmm_(rows[:, c0 : c0 + step], self._tile(columns=slice(c0, c0 + step)).t())
        return y

    def _few_rows(self, lib: ctypes.CDLL, rows: torch.Tensor) -> torch.Tensor:
        """A few rows, straight from the stored weights: int8 through the decoding kernel of
        `finegrain.model.quantize` (`int8_decode.c`), the 4-bit blocks through `qlinear.c`."""
        y = torch.empty(rows.shape[0], self.out_features)
        bias = None if self.bias is None else self.bias.data_ptr()
        if self.format == "int8":
            if self._int8_view is None or self._int8_view.weight != self.blocks.data_ptr():
                self._int8_view = native.Linear(
                    self.blocks.data_ptr(), self.scale.data_ptr(), bias, self.out_features, self.in_features
                )
            lib.fg_int8_linear(ctypes.byref(self._int8_view), rows.data_ptr(), y.data_ptr(), rows.shape[0])
        else:
            lib.fg_q_linear(
                FORMATS[self.format], self.blocks.data_ptr(), self.blocks.stride(0), None, bias,
                rows.data_ptr(), y.data_ptr(), rows.shape[0], self.out_features, self.in_features,
            )
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}")


class QuantLinearFunction(torch.autograd.Function):
    """y = x W^T + b for a `QuantLinear`; the backward pass returns the input's gradient only,
    dequantising W again rather than keeping a float copy of it for every layer."""

    @staticmethod
    def forward(ctx, x, layer: QuantLinear):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layer.matmul_grad(grad), None

