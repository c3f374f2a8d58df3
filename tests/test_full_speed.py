"""The trainer's AdamW runs in torch's fused kernel (finegrain.train.trainer.adamw) and updates the
weights as the plain per-parameter AdamW does, to float32 rounding: on its own, and in a whole
full fine-tuning run on the tiny model."""

import torch
from conftest import random_llama
from torch import nn

from finegrain.config import TrainConfig
from finegrain.peft.full import FullConfig
from finegrain.tasks.classification import ClassificationTask, Encoded
from finegrain.train import trainer as trainer_module
from finegrain.train.trainer import Trainer, adamw, lr_lambda


def plain_adamw(groups, lr, weight_decay, fused=False):
    """torch's reference AdamW: a Python loop of tensor operations per parameter."""
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=False, fused=False)


def parameters(seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((64, 48), (48,), (7, 3, 5))]


def test_fused_adamw_takes_the_steps_of_the_plain_one():
    """Two groups at different rates, weight decay and a warmup-then-linear schedule, 6 steps of
    random gradients: the fused optimizer's weights and moments are the reference's."""
    ours, reference = parameters(0), parameters(0)
    optimizers = []
    for build, params in ((adamw, ours), (plain_adamw, reference)):
        groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-2}]
        optimizer = build(groups, 1e-2, 0.1)
        optimizers.append((optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", 2, 6))))
    assert optimizers[0][0].param_groups[0]["fused"] is True and not optimizers[1][0].param_groups[0]["fused"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        for p, q in zip(ours, reference):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        for optimizer, scheduler in optimizers:
            optimizer.step()
            scheduler.step()
    for p, q, start in zip(ours, reference, parameters(0)):
        assert (p - start).abs().max() > 1e-3  # they moved
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizers[0][0].state[p][moment], optimizers[1][0].state[q][moment])


def test_parameters_without_the_kernel_keep_the_default_adamw():
    """A device without the fused kernel (here `meta`) gets torch's default implementation, not an error at step time."""
    optimizer = adamw([{"params": [nn.Parameter(torch.zeros(3, device="meta"))]}], 1e-3, 0.0)
    assert optimizer.param_groups[0]["fused"] is None


def full_trainer(tiny_model, tmp_path):
    """A trainer of every weight of a two-class model on the tiny LLaMA (peft.method: full), 3 steps."""
    torch.manual_seed(0)
    task = ClassificationTask(["a", "b"])
    model = task.build_model(tiny_model)
    FullConfig(modules_to_save=["score"]).select(model)
    generator = torch.Generator().manual_seed(0)
    items = [Encoded(torch.randint(3, 128, (4 + i % 7,), generator=generator).tolist(), i % 2) for i in range(24)]
    config = TrainConfig(epochs=1, batch_size=8, threads=1, lr=1e-3, weight_decay=0.01, warmup_ratio=0.34)
    tmp_path.mkdir()
    return Trainer(model, task, items, config, tmp_path, pad_id=0, progress=False, method=FullConfig())  # fused: full alone


def test_a_full_run_trains_to_the_weights_of_the_plain_adamw(tiny_config, tmp_path, monkeypatch):
    """Every weight of the tiny model, embeddings included, after 3 steps with warmup and weight decay."""
    fused = full_trainer(random_llama(tiny_config), tmp_path / "fused")
    assert all(group["fused"] for group in fused.optimizer.param_groups)
    fused.fit()
    monkeypatch.setattr(trainer_module, "adamw", plain_adamw)
    reference = full_trainer(random_llama(tiny_config), tmp_path / "plain")
    assert not any(group["fused"] for group in reference.optimizer.param_groups)
    reference.fit()
    start = random_llama(tiny_config).state_dict()
    for name, weight in fused.trainable.items():
        torch.testing.assert_close(weight, reference.trainable[name], atol=2e-6, rtol=1e-5, msg=name)
        if name in start:
            assert not torch.equal(weight, start[name]), f"{name} did not train"
    assert fused.state.step == reference.state.step == 3
