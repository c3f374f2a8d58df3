"""Checkpoint averaging: the run's weights are the mean of its trainable weights at its last K evaluations.

`train.average_last: K` keeps a copy of the trainable weights at each evaluation point (the
validations of `train.eval_every`, or each epoch's end, and the last step), the K latest only.
After training their element-wise mean replaces the best evaluation's weights as the run's weights:
it is validated (metrics.jsonl gets the line, metrics.json `train.average_last`) and saved to
`best/`, from which the adapter is written. Weights averaged along the end of one run's trajectory
sit nearer the centre of a wide optimum than any one of them (Izmailov et al., 2018, SWA; the
"last K checkpoints" average of Vaswani et al., 2017), which tends to score better on new data
than selecting one checkpoint by a small validation set.

An adapter's tensors are averaged each on its own (LoRA's A and B alike, as SWA does for any
weights), not their product. The copies are kept on the CPU and saved with every checkpoint (as
the state of a step hook, `train.objectives.StepHook`), so a resumed run averages the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The trainable weights at the last `count` evaluations, and their mean.

    Args:
        count: how many evaluations' weights are kept and averaged (`train.average_last`).
    """

    def __init__(self, count: int):
        self.count = count
        self.steps: list[int] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(self, trainable: Mapping[str, torch.Tensor], step: int) -> None:
        """Keep a CPU copy of the weights at evaluation `step` (once per step), dropping the oldest past `count`."""
        if self.steps and self.steps[-1] == step:
            return
        self.steps.append(step)
        self.snapshots.append({name: p.detach().to("cpu", torch.float32, copy=True) for name, p in trainable.items()})
        del self.steps[: -self.count], self.snapshots[: -self.count]

    def mean(self) -> dict[str, torch.Tensor]:
        """The element-wise mean of the kept weights, in float32 (the caller casts to each parameter's dtype)."""
        return {name: torch.stack([s[name] for s in self.snapshots]).mean(0) for name in self.snapshots[0]}

    def load_mean(self, trainable: Mapping[str, torch.Tensor]) -> None:
        """Copy the mean into the trainable parameters, on their device and in their dtype."""
        mean = self.mean()
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(mean[name].to(param.device, param.dtype))

    # -- a StepHook's face, so that every checkpoint keeps the copies (exact resume) -------

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Nothing: copies are taken at evaluations, which the trainer knows of."""

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "snapshots": self.snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.snapshots = list(state["steps"]), list(state["snapshots"])
