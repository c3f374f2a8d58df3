"""Adversarial training: each batch's loss also on inputs pushed, within a small ball, towards a higher loss.

`adversarial: {method: fgm|pgd|freelb, epsilon, steps}` wraps the run's objective
(`AdversarialObjective`): with fgm and pgd a step minimises clean loss + adversarial loss, the
second on the inputs plus a perturbation `delta` found by gradient ascent on the loss:

- fgm (Miyato et al., 2017): one step, delta = epsilon * g / ||g||, g the gradient of the clean
  loss with respect to the input (the clean forward gives it at no extra forward);
- pgd (Madry et al., 2018): `steps` ascent steps of 2 * epsilon / steps along the normalised
  gradient, each projected back onto the ball of radius epsilon (the first reuses the clean
  forward's gradient, so pgd costs `steps` + 1 forwards a batch);
- freelb (Zhu et al., 2020): `steps` forwards at delta_0 = 0, delta_1, ... delta_{K-1}, each delta
  one ascent step of 2 * epsilon / steps from the one before, projected onto the ball; the loss is
  the mean of the K losses, so the trained weights get the mean of the K gradients ("free" large
  batch: the ascent steps' forwards also train, where pgd throws them away). delta starts at zero
  (the FreeLB code's `adv_init_mag` 0), so the first of the K losses is the clean one and freelb
  with `steps` 1 is plain training. It costs `steps` forwards a batch and keeps their graphs
  until the backward.

The norm is each token's L2 norm over the hidden size: every token's vector moves by at most
epsilon (padding, which gets no gradient, not at all). The ascent steps take gradients of delta
only; the adversarial loss's gradient reaches the trained weights through the final forward,
with delta held fixed.

What is perturbed is what the first trained layer reads. With the frozen-prefix cache
(`train.prefix_cache`, adapted layers above the bottom) that is the cached hidden state at the
first adapted layer (`batch["hidden"]`), not the token embeddings: the frozen layers below never
run in a training step, so their input cannot be perturbed. Without the cache the embedding
output is perturbed (the decoder's `embed_tokens`), as in the papers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.train.objectives import Forward, Objective, WrappedObjective


def per_token_unit(g: torch.Tensor) -> torch.Tensor:
    """(B, T, H): each token's vector scaled to L2 norm 1 (a zero vector stays zero)."""
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(B, T, H): each token's vector scaled down to L2 norm at most `epsilon`."""
    norm = delta.norm(dim=-1, keepdim=True)
    return delta * (epsilon / norm.clamp_min(epsilon))


class AdversarialObjective(WrappedObjective):
    """An objective's loss plus the same loss on perturbed inputs (see the module docstring).

    Args:
        inner: the objective wrapped (the task's loss, or distillation's); its items, batches and
            cached states are this objective's.
        method: fgm, pgd or freelb.
        epsilon: the largest L2 norm of each token's perturbation.
        steps: pgd's ascent steps, freelb's forwards (fgm takes one step).
        embedding: the decoder's token embedding, perturbed when a batch carries no cached states.
    """

    def __init__(self, inner: Objective, method: str, epsilon: float, steps: int, embedding: nn.Module):
        if method not in ("fgm", "pgd", "freelb"):
            raise ValueError(f"adversarial method {method!r}: fgm, pgd or freelb")
        super().__init__(inner)
        self.method, self.epsilon, self.embedding = method, epsilon, embedding
        self.steps = 1 if method == "fgm" else steps
        self.step_size = epsilon if method == "fgm" else 2 * epsilon / steps

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        """Clean loss + the loss at the perturbation the ascent steps found (held fixed); for
        freelb the mean loss over the ascent's perturbations (`free_loss`)."""
        if self.method == "freelb":
            return self.free_loss(forward, batch)
        delta = None  # None: a zero perturbation made to the input's shape, to read the clean loss's gradient
        clean = None
        for step in range(self.steps):
            loss, delta = self.perturbed_loss(forward, batch, delta)
            (g,) = torch.autograd.grad(loss, delta, retain_graph=clean is None, allow_unused=True)
            if g is None:
                raise FinegrainError("adversarial: the perturbation does not reach the loss (the input is replaced "
                                     "before the first trained layer, as prompt tuning does); unset adversarial.method")
            clean = loss if clean is None else clean
            delta = project(delta.detach() + self.step_size * per_token_unit(g), self.epsilon)
            delta.requires_grad_(step + 1 < self.steps)  # the next ascent step's gradient; none in the last forward
        adversarial, _ = self.perturbed_loss(forward, batch, delta)
        return clean + adversarial

    def free_loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        """FreeLB: the mean of the losses at delta_0 = 0, ..., delta_{K-1}, each delta one projected
        ascent step from the last; each loss keeps its graph (its gradient reaches the weights with
        its delta held fixed), and only the last forward needs no gradient with respect to delta."""
        delta, losses = None, []
        for step in range(self.steps):
            loss, delta = self.perturbed_loss(forward, batch, delta)
            losses.append(loss)
            if step + 1 == self.steps:
                break
            (g,) = torch.autograd.grad(loss, delta, retain_graph=True, allow_unused=True)
            if g is None:
                raise FinegrainError("adversarial: the perturbation does not reach the loss (the input is replaced "
                                     "before the first trained layer, as prompt tuning does); unset adversarial.method")
            delta = project(delta.detach() + self.step_size * per_token_unit(g), self.epsilon).requires_grad_(True)
        return torch.stack(losses).mean()

    def perturbed_loss(self, forward: Forward, batch: dict[str, Any],
                       delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner loss with `delta` (B, T, H) added to what the first trained layer reads, and
        the delta used. With `delta` None a zero one that requires grad is made and returned."""
        if "hidden" in batch:  # cached states at the first adapted layer (train.prefix_cache)
            if delta is None:
                delta = torch.zeros_like(batch["hidden"], dtype=torch.float32, requires_grad=True)
            perturbed = {**batch, "hidden": batch["hidden"] + delta.to(batch["hidden"].dtype)}
            return self.inner.loss(forward, perturbed), delta
        made: list[torch.Tensor] = []
        with added_to_output(self.embedding, delta, made):
            loss = self.inner.loss(forward, batch)
        if not made:
            raise FinegrainError("adversarial: the model never read the token embedding in a training step; "
                                 "unset adversarial.method")
        return loss, made[0]


@contextmanager
def added_to_output(module: nn.Module, delta: torch.Tensor | None, made: list[torch.Tensor]) -> Iterator[None]:
    """While open, `module`'s output has `delta` added (a zero one requiring grad when None, made at
    the first call and appended to `made`)."""

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        if not made:
            zero = delta is None
            made.append(torch.zeros_like(output, dtype=torch.float32, requires_grad=True) if zero else delta)
        return output + made[0].to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
