"""One training step's bookkeeping around the optimizer: schedule, clipping, step count.

For a window of ``k`` models at once (one model is ``k = 1``), with every tensor's first
dim the models: the learning rate each model uses is its base ``lr`` (a hyperparameter
in the bank, which ``set_hparams`` changes) scaled by the group's schedule at that
model's own step count; the gradients are clipped per model to its ``clip_grad_norm``
(0 is off) as ``torch.nn.utils.clip_grad_norm_`` does over that model's parameters;
then the optimizer steps and the model's step count moves on. Everything is tensor
arithmetic on the device: nothing waits for it.
"""

from __future__ import annotations

import math

import torch

from core.definition import STEPS
from core.spec import ScheduleSpec
from workers.optim import optimizer_step


def scheduled_lr(schedule: ScheduleSpec, base: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The ``[k]`` learning rates for each model's next step (``steps``: steps taken so far), float64."""
    lr, t = base.to(torch.float64), steps.to(torch.float64)
    name = schedule.name
    if name == "constant":
        return lr
    if name == "step":
        return lr * schedule.gamma ** torch.floor(t / schedule.step_size)
    if name == "linear":
        frac = torch.clamp(t, max=schedule.total_steps) / schedule.total_steps
        return lr * (schedule.start_factor + (schedule.end_factor - schedule.start_factor) * frac)
    warmup, total, floor = schedule.warmup_steps, schedule.total_steps, schedule.min_lr
    after = t - warmup
    cosine = floor + (lr - floor) * (1 + torch.cos(math.pi * after / (total - warmup))) / 2
    if warmup == 0:
        return cosine
    return torch.where(t < warmup, lr * (t + 1) / warmup, cosine)


def clip_grad_norm(grads: dict[str, torch.Tensor], max_norm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each model's gradients scaled to a total 2-norm of at most ``max_norm`` (``[k]``; 0 leaves them)."""
    first = next(iter(grads.values()))
    total = torch.zeros(first.shape[0], dtype=torch.float32, device=first.device)
    for g in grads.values():
        total += g.float().pow(2).flatten(1).sum(1)
    total = total.sqrt()
    coef = torch.clamp(max_norm.to(torch.float32) / (total + 1e-6), max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))
    return {n: (g * coef.reshape((-1,) + (1,) * (g.dim() - 1)).to(g.dtype)) for n, g in grads.items()}


class Trainer:
    """A group's step rule: optimizer, schedule, clipping."""

    def __init__(self, optimizer: str, schedule: ScheduleSpec) -> None:
        self.optimizer = optimizer
        self.schedule = schedule

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
             hparams: dict[str, torch.Tensor]) -> None:
        """Update ``params`` (and ``state``, the step counts included) in place for every model of the window."""
        steps = state[STEPS]
        effective = dict(hparams)
        effective["lr"] = scheduled_lr(self.schedule, hparams["lr"], steps)
        if grads and "clip_grad_norm" in hparams:
            grads = clip_grad_norm(grads, hparams["clip_grad_norm"])
        optimizer_step(self.optimizer, params, grads, {n: t for n, t in state.items() if n != STEPS}, effective)
        steps.add_(1)
