"""Elastic weight consolidation: a run started from an earlier one keeps what the earlier task needed.

`continual.strategy: ewc` with `init_from: RUN_DIR` (each stage of a continual sequence after the
first: `finegrain.continual`) adds to every step's loss

    ewc_lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

over the trained parameters (Kirkpatrick et al., 2017), where theta* are the earlier run's weights
and F is the diagonal of the (empirical) Fisher information of the earlier task at theta*: the mean,
over the earlier run's training examples, of the squared gradient of each example's own loss (the
task's loss with its gold label). A weight the earlier task's loss is sharp in is held near its
value; one it is flat in moves freely.

`fisher_diagonal` computes F once, before training, on the earlier run's trained model (built by
`finegrain.run`), from the frozen-prefix cache: only the adapted layers run. F needs each example's
own gradient (a batch's gradient squared is not the mean of the squared per-example gradients).
Where every parameter to hold is a LoRA layer's A or B or a plain linear layer's weight or bias
(LoRA runs: the adapter and the head), examples of the same length run as one batch and each one's
gradients come from its rows' inputs and output gradients, the products autograd forms for the
batch's gradient, kept apart per example (`PerExample`); the per-example gradients of each batch
must add up to autograd's gradient of its summed losses, else (or for any other parameter: IA3's
vectors, DoRA's magnitudes, a full fine-tune's norms) every example runs alone, as F's definition
reads. Both give the same F, to float32 rounding. A resumed run computes it again from the same
run and data, to the same numbers, so it goes on exactly as an uninterrupted one.

Parameters are matched by name. A head that is one row per label is matched row by row by label
(a class-incremental stage's head has the earlier classes' rows and new ones; a task-incremental
stage's head is another task's, whose labels match none of the earlier ones even at the same
width): a row of a label the earlier run lacked has F = 0, free to learn, as has every tensor
the earlier run did not train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from finegrain.errors import FinegrainError
from finegrain.inference import item_rows
from finegrain.model.linear import Linear
from finegrain.peft.lora import LoraLinear
from finegrain.train.objectives import Forward, Objective, WrappedObjective


def fisher_diagonal(
    model: nn.Module, task: Any, items: list, names: set[str], pad_id: int,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: bool = False, batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """The mean over `items` of each example's squared loss gradient, for `model`'s parameters in `names`.

    Args:
        model: the earlier run's trained task model, in float32 (its parameters' `requires_grad`
            are set here for `names` and left so).
        task: encodes the earlier task: `collate(items, pad_id, hidden)` and `loss(outputs, batch)`.
        items: the earlier run's encoded training items.
        names: the parameter names (as `model.named_parameters()` gives them) to compute F for.
        hidden: each item's cached states at `start_layer` (`train.prefix_cache.compute_prefix`), or None.
        batch_size: at most this many examples of one length run together (see the module
            docstring); 1 runs each alone.

    Returns:
        {name: (F, float32, the parameter's shape)}.
    """
    if not items:
        raise FinegrainError("continual.strategy: ewc needs the earlier run's training examples and found none; "
                             "use another strategy")
    params = {n: p for n, p in model.named_parameters() if n in names}
    for p in params.values():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the same F every time it is computed (a resumed run's too)
    start = start_layer if hidden is not None else 0
    sums = None
    if batch_size > 1:
        with PerExample(model, params) as per_example:
            if per_example.covers:
                sums = _batched_sums(model, task, items, params, pad_id, hidden, start, per_example, batch_size, progress)
    if sums is None:  # a parameter without a per-example rule, or a batch whose gradients did not add up
        sums = _single_sums(model, task, items, params, pad_id, hidden, start, progress)
    model.train(was_training)
    return {n: s / len(items) for n, s in sums.items()}


def _single_sums(model, task, items, params, pad_id, hidden, start, progress) -> dict[str, torch.Tensor]:
    """The sum over `items` of each one's squared gradient, one example at a time."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i in tqdm(range(len(items)), desc="ewc: Fisher", unit="example", disable=not progress, leave=False):
        batch = task.collate([items[i]], pad_id, [hidden[i]] if hidden is not None else None)
        loss = task.loss(model(batch, start_layer=start), batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                sums[name] += grad.float() ** 2
    return sums


def _batched_sums(model, task, items, params, pad_id, hidden, start, per_example, batch_size,
                  progress) -> dict[str, torch.Tensor] | None:
    """The sum over `items` of each one's squared gradient, examples of one length in batches
    (`PerExample`); None when a batch's per-example gradients do not add up to its gradient."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):  # one length (windows: one list of lengths): no padding, as alone
        by_shape.setdefault(tuple(item_rows(item)), []).append(i)
    batches = [group[k : k + batch_size] for group in by_shape.values() for k in range(0, len(group), batch_size)]
    bar = tqdm(total=len(items), desc="ewc: Fisher", unit="example", disable=not progress, leave=False)
    for indices in batches:
        chunk = [items[i] for i in indices]
        cached = [hidden[i] for i in indices] if hidden is not None else None
        batch = task.collate(chunk, pad_id, cached)
        per_example.start(len(chunk), batch.get("documents"))
        outputs = model(batch, start_layer=start)
        if not torch.is_tensor(outputs) or outputs.shape[0] != len(chunk):
            return None
        # Each example's loss as it reads alone (a weighted mean over one example is its own loss).
        alone = [task.collate([item], pad_id, None if cached is None else [cached[k]]) for k, item in enumerate(chunk)]
        loss = sum(task.loss(outputs[k : k + 1], one) for k, one in enumerate(alone))
        grads = per_example.gradients(loss)
        if grads is None:
            return None
        for name, grad in grads.items():
            sums[name] += (grad**2).sum(0)
        bar.update(len(chunk))
    bar.close()
    return sums


class PerExample:
    """Each example's gradient of a batch's summed losses, for LoRA layers' A and B and linear layers'
    weight and bias: from every call of their layer, its input x and output gradient g, per row
    (B A x's gradients: A's is scaling (g B)^T x, B's scaling g^T (x A^T); a linear layer's g^T x and
    g summed over tokens), added up per example (windows: rows of one example, `documents`).

    A context that hooks the layers' forward calls while it is open. `covers`: every parameter has
    its rule. `gradients(loss)` checks the result against autograd's gradient of the batch: a layer
    that runs other than these rules say gives None.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]):
        self.params = params
        self.rules: dict[nn.Module, tuple[str, dict[str, str]]] = {}  # module -> (kind, {role: name})
        for path, module in model.named_modules():
            prefix = f"{path}." if path else ""
            if type(module) is LoraLinear and module.active is not None and not module.merged:
                roles = {"A": f"{prefix}lora_A.weight", "B": f"{prefix}lora_B.weight"}
                kind = "lora"
            elif type(module) in (nn.Linear, Linear):
                roles = {"weight": f"{prefix}weight", "bias": f"{prefix}bias"}
                kind = "linear"
            else:
                continue
            roles = {role: name for role, name in roles.items() if name in params}
            if roles:
                self.rules[module] = (kind, roles)
        # A LoRA layer's lora_A/lora_B are nn.Linear children its forward never calls: the LoRA rule owns them.
        for module, (kind, _) in list(self.rules.items()):
            if kind == "lora":
                for child in (module.lora_A, module.lora_B):
                    self.rules.pop(child, None)
        claimed = {name for _, roles in self.rules.values() for name in roles.values()}
        self.covers = set(params) == claimed and bool(params)
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]] = []
        self.handles: list[Any] = []
        self.examples, self.documents = 0, None

    def __enter__(self) -> "PerExample":
        if self.covers:
            self.handles = [m.register_forward_hook(self._record) for m in self.rules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.calls = []

    def start(self, examples: int, documents: torch.Tensor | None) -> None:
        """A new batch of `examples` (with `documents`, the example of each row, for windows)."""
        self.examples, self.documents, self.calls = examples, documents, []

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.calls.append((module, args[0], output, output._version))

    def gradients(self, loss: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """{name: (examples, *shape) float32}: each example's gradient of `loss`; None if they do
        not add up to autograd's (see the class docstring)."""
        if any(output._version != version for _, _, output, version in self.calls):
            return None  # an output changed in place: its gradient is not the layer's
        names = list(self.params)
        outputs = [output for _, _, output, _ in self.calls]
        grads = torch.autograd.grad(loss, outputs + [self.params[n] for n in names], allow_unused=True)
        output_grads, batch_grads = grads[: len(outputs)], dict(zip(names, grads[len(outputs) :]))
        per = {n: torch.zeros(self.examples, *p.shape) for n, p in self.params.items()}
        for (module, x, _, _), g in zip(self.calls, output_grads):
            if g is None:
                continue
            kind, roles = self.rules[module]
            rows = x.shape[0]
            x = x.detach().float().reshape(rows, -1, x.shape[-1])  # (R, T, in)
            g = g.float().reshape(rows, -1, g.shape[-1])  # (R, T, out)
            for role, grad in _row_gradients(kind, module, x, g, roles).items():
                grad = self._by_example(grad)
                if grad is None:
                    return None
                per[roles[role]] += grad
        for name, total in batch_grads.items():
            expected = torch.zeros_like(per[name][0]) if total is None else total.float()
            tolerance = 1e-4 * float(expected.abs().max()) + 1e-7
            if not torch.allclose(per[name].sum(0), expected, rtol=1e-3, atol=tolerance):
                return None
        return per

    def _by_example(self, grad: torch.Tensor) -> torch.Tensor | None:
        """(R, ...) per row -> (examples, ...) per example; None for rows that are neither."""
        if grad.shape[0] == self.examples:
            return grad
        if self.documents is None or grad.shape[0] != len(self.documents):
            return None
        return torch.zeros(self.examples, *grad.shape[1:]).index_add_(0, self.documents, grad)


def _row_gradients(kind: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                   roles: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each row's gradients of one layer call, from its input x (R, T, in) and output gradient g (R, T, out)."""
    if kind == "linear":
        grads = {"weight": torch.einsum("rto,rti->roi", g, x)}  # (R, out, in)
        if "bias" in roles:
            grads["bias"] = g.sum(1)  # (R, out)
        return grads
    A, B = module.active.lora_A.weight.detach().float(), module.active.lora_B.weight.detach().float()
    scaling = module.active.scaling  # eval: no dropout
    grads = {}
    if "B" in roles:
        grads["B"] = torch.einsum("rto,rtk->rok", g, x @ A.T) * scaling  # (R, out, r)
    if "A" in roles:
        grads["A"] = torch.einsum("rtk,rti->rki", g @ B, x) * scaling  # (R, r, in)
    return grads


def anchors(
    earlier: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], current: dict[str, torch.Tensor],
    head_modules: list[str], earlier_labels: list, labels: list,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """theta* and F on the current run's parameters (see the module docstring: by name, head rows by label).

    Args:
        earlier: the earlier model's weights by name; `fisher` its F by name.
        current: the current run's trained parameters by name (only their shapes are read).
        head_modules: the task's head modules, whose per-label tensors are matched by label.

    Returns:
        (theta*, F), each {name: float32 tensor of the current parameter's shape}, for the names
        with any F above 0 to hold.
    """
    where = {label: i for i, label in enumerate(earlier_labels)}
    theta, weights = {}, {}
    for name, param in current.items():
        if name not in fisher:
            continue
        old, f = earlier[name].detach().float(), fisher[name]
        per_label = any(name.startswith(f"{head}.") for head in head_modules) and old.dim() >= 1 and \
            old.shape[0] == len(earlier_labels) and param.shape[0] == len(labels) and old.shape[1:] == param.shape[1:]
        if old.shape != param.shape and not per_label:
            continue  # another shape that labels do not explain: nothing of the earlier run to hold
        if per_label and list(earlier_labels) != list(labels):  # another label set, even of the same size
            rows = [(i, where[label]) for i, label in enumerate(labels) if label in where]
            old_rows, f_rows = torch.zeros(param.shape), torch.zeros(param.shape)
            for i, j in rows:
                old_rows[i], f_rows[i] = old[j], f[j]
            old, f = old_rows, f_rows
        if float(f.sum()) > 0:
            theta[name], weights[name] = old.to(param.device), f.to(param.device)
    return theta, weights


class EwcObjective(WrappedObjective):
    """An objective's loss plus the EWC penalty on the trained weights (see the module docstring).

    The penalty is added to each micro-batch's mean loss; the trainer weighs those by their share
    of the step's loss terms, which sum to 1, so a step's gradient holds the penalty's once.

    Args:
        inner: the objective wrapped; its items, batches and cached states are this objective's.
        parameters: the trained parameters by name (the live ones the optimizer steps).
        theta: theta* by name; `fisher` F by name (`anchors`).
        strength: lambda (`continual.ewc_lambda`).
    """

    def __init__(self, inner: Objective, parameters: dict[str, nn.Parameter], theta: dict[str, torch.Tensor],
                 fisher: dict[str, torch.Tensor], strength: float):
        super().__init__(inner)
        self.strength = strength
        self.held = [(parameters[n], theta[n], fisher[n]) for n in fisher]

    def penalty(self) -> torch.Tensor:
        """lambda / 2 * sum F (theta - theta*)^2, in float32."""
        if not self.held:
            return torch.zeros(())
        return self.strength / 2 * sum((f * (p.float() - theta) ** 2).sum() for p, theta, f in self.held)

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        return self.inner.loss(forward, batch) + self.penalty()
