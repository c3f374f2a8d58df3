"""Linear layers through oneDNN: the same sums as `F.linear` in both passes, and the cases that keep `F.linear`."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import finegrain.model.linear as linear_module
from finegrain.model.linear import MIN_ROWS, Linear, linear, matmul_grad, matmul_t, onednn_available
from finegrain.peft.lora import LoraMatmul, keep_mask

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """The shapes of (input, weight) passed to oneDNN, in order."""
    seen = []
    real = linear_module._onednn

    def spy(x, weight, bias):
        seen.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, bias)

    monkeypatch.setattr(linear_module, "_onednn", spy)
    return seen


@pytest.fixture
def wide_grads_in(monkeypatch):
    """Choose where the input's gradient of a wide weight (in > out) runs, whatever this CPU is:
    `wide_grads_in("mkl")` or `wide_grads_in("onednn")`."""
    def choose(library: str) -> None:
        monkeypatch.setattr(linear_module, "_wide_grads_in_mkl", lambda: library == "mkl")
        monkeypatch.setattr(linear_module, "MKL_GRAD_MIN_OUT", 0)  # the tests' small weights count as tall
    return choose


def exact(x, weight, bias=None):
    """x W^T + b in float64, the reference both float32 paths round from."""
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


@needs_onednn
@pytest.mark.parametrize("shape", [(MIN_ROWS, 48), (5, 9, 48)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_linear_runs_in_onednn_and_equals_f_linear_in_both_passes(shape, with_bias, calls, wide_grads_in):
    wide_grads_in("onednn")
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(40, 48) / 7
    bias = torch.randn(40) if with_bias else None
    y = linear(x, weight, bias)
    grad = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert calls == [(shape, (40, 48)), ((*shape[:-1], 40), (48, 40))]  # the backward reads W's transpose
    assert_close(y.double(), exact(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert_close(grad_x.double(), grad.double() @ weight.double(), atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("shape", [(MIN_ROWS, 48), (5, 9, 48)], ids=["2d", "3d"])
@pytest.mark.parametrize("trains", ["weight", "weight and bias", "bias", "weight and input"])
def test_trained_linear_runs_in_onednn_with_the_gradients_of_f_linear(shape, trains, calls, wide_grads_in):
    """A weight or bias that trains (full fine-tuning, bitfit): forward and input gradient in oneDNN,
    every gradient that is asked for equal to F.linear's, none computed that is not."""
    wide_grads_in("onednn")
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad="input" in trains)
    weight = torch.nn.Parameter(torch.randn(40, 48) / 7, requires_grad="weight" in trains)
    bias = torch.nn.Parameter(torch.randn(40), requires_grad="bias" in trains)
    y = linear(x, weight, bias)
    assert type(y.grad_fn).__name__ == "TrainedLinearFunctionBackward"
    grad = torch.randn_like(y)
    wanted = [t for t in (x, weight, bias) if t.requires_grad]
    got = torch.autograd.grad(y, wanted, grad)
    assert calls[0] == (shape, (40, 48)) and calls[1:] == ([((*shape[:-1], 40), (48, 40))] if x.requires_grad else [])
    plain = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    reference = F.linear(*plain)
    assert_close(y.double(), reference, atol=1e-5, rtol=1e-5)
    expected = torch.autograd.grad(reference, [t for t in plain if t.requires_grad], grad.double())
    for g, e in zip(got, expected, strict=True):
        assert_close(g.double(), e, atol=1e-4, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("shape", [(MIN_ROWS, 48), (5, 9, 48)], ids=["2d", "3d"])
def test_wide_weights_input_gradient_runs_in_mkl_where_chosen_tall_ones_stay_in_onednn(shape, calls, wide_grads_in):
    """Without AVX-512 the input's gradient of a weight wider than tall is MKL's grad @ W (no
    oneDNN call); a tall weight's still reads its transpose in oneDNN. Both equal the exact product."""
    wide_grads_in("mkl")
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    wide, tall = torch.randn(40, 48) / 7, torch.randn(56, 40) / 7
    y = linear(linear(x, wide), tall)
    grad = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    rows = shape[:-1]
    assert calls == [(shape, (40, 48)), ((*rows, 40), (56, 40)), ((*rows, 56), (40, 56))]  # no (48, 40) view
    assert_close(grad_x.double(), grad.double() @ tall.double() @ wide.double(), atol=1e-5, rtol=1e-5)


def test_wide_gradients_choose_mkl_only_without_avx512(monkeypatch):
    import finegrain.cpu

    for flags, mkl in ((frozenset({"avx2", "fma"}), True), (frozenset({"avx2", "avx512f"}), False)):
        linear_module._wide_grads_in_mkl.cache_clear()
        monkeypatch.setattr(finegrain.cpu, "cpu_flags", lambda flags=flags: flags)
        assert linear_module._wide_grads_in_mkl() is mkl
    linear_module._wide_grads_in_mkl.cache_clear()


@needs_onednn
def test_only_tall_wide_weights_take_their_gradient_to_mkl(calls, monkeypatch):
    """On a CPU that sends wide weights' input gradients to MKL, the down projection's shape goes
    there and a key/value projection's (wide but short) stays in oneDNN; both are exact."""
    monkeypatch.setattr(linear_module, "_wide_grads_in_mkl", lambda: True)
    torch.manual_seed(0)
    for weight, in_onednn in ((torch.randn(192, 576) / 24, True), (torch.randn(576, 1536) / 40, False)):
        calls.clear()
        grad = torch.randn(MIN_ROWS, weight.shape[0])
        got = matmul_grad(grad, weight)
        assert (calls == [((MIN_ROWS, weight.shape[0]), (weight.shape[1], weight.shape[0]))]) is in_onednn
        assert_close(got.double(), grad.double() @ weight.double(), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_autocast_and_few_rows_keep_f_linear(calls):
    torch.manual_seed(0)
    x = torch.randn(MIN_ROWS, 16)
    trained = torch.nn.Parameter(torch.randn(8, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, trained.detach()).dtype == torch.bfloat16
    assert_close(linear(x[: MIN_ROWS - 1], trained.detach()), F.linear(x[: MIN_ROWS - 1], trained.detach()))
    assert calls == []
    with torch.no_grad():  # no gradient at all: a trainable weight is just a matrix
        linear(x, trained)
    assert len(calls) == 1


@needs_onednn
@pytest.mark.parametrize("library", ["onednn", "mkl"])
def test_lora_matmul_in_float32_runs_its_passes_where_chosen(library, calls, wide_grads_in):
    """The forward in oneDNN; the input's gradient of this wide weight in oneDNN or MKL (`matmul_grad`)."""
    wide_grads_in(library)
    torch.manual_seed(0)
    x = torch.randn(4, 10, 24, requires_grad=True)
    weight, bias = torch.randn(16, 24) / 5, torch.randn(16)
    A = torch.randn(2, 24, requires_grad=True)
    B = torch.randn(16, 2, requires_grad=True)
    keep = keep_mask(x.shape, 0.2, x.device)
    ours = LoraMatmul.apply(x, weight, bias, A, B, 1.5 / 0.8, keep)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (x, A, B), grad)
    assert [w for _, w in calls] == ([(16, 24), (24, 16)] if library == "onednn" else [(16, 24)])
    xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
    plain = xd @ weight.double().T + bias.double() + (xd * keep / 0.8) @ Ad.T @ Bd.T * 1.5
    assert_close(ours.double(), plain, atol=1e-5, rtol=1e-5)
    expected = torch.autograd.grad(plain, (xd, Ad, Bd), grad.double())
    for g, e in zip(got, expected):
        assert_close(g.double(), e, atol=1e-4, rtol=1e-5)


def test_linear_module_is_an_nn_linear_with_its_state_dict():
    layer = Linear(6, 3)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(MIN_ROWS, 6)
    assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6, rtol=1e-6)


def test_switched_off_by_the_environment_and_probing_draws_no_random_numbers(monkeypatch):
    onednn_available.cache_clear()
    try:
        torch.manual_seed(0)
        onednn_available()
        assert_close(torch.rand(3), (torch.manual_seed(0), torch.rand(3))[1])
        monkeypatch.setenv("FINEGRAIN_ONEDNN", "0")
        onednn_available.cache_clear()
        assert not onednn_available()
        x, w = torch.randn(MIN_ROWS, 4), torch.randn(2, 4)
        assert torch.equal(matmul_t(x, w), F.linear(x, w))
    finally:
        onednn_available.cache_clear()
