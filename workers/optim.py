"""Optimizers that step many models at once, with their state in the bank.

Every tensor here has the models on dim 0: a parameter ``[k, *S]``, its gradient,
its state, and each hyperparameter ``[k]`` (one value per model, broadcast). One
code path serves a single model (``k = 1``, a slice of the bank) and a fused step
over a whole group. The formulas follow ``torch.optim.SGD``/``Adam``/``AdamW``
(single-tensor, non-capturable), so cohort training ends where plain PyTorch ends.
"""

from __future__ import annotations

import torch

from core.definition import state_name


def _per_model(value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Shape a ``[k]`` hyperparameter to broadcast against a ``[k, *S]`` tensor."""
    return value.to(dtype or like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


@torch.no_grad()
def optimizer_step(
    optimizer: str,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    hparams: dict[str, torch.Tensor],
) -> None:
    """Update ``params`` in place from ``grads``; ``state`` holds the bank's optimizer entries."""
    for name, p in params.items():
        g = grads[name]
        step = state[state_name("step", name)]
        step.add_(1)
        if optimizer == "sgd":
            _sgd(p, g, state, name, step, hparams)
        else:
            _adam(p, g, state, name, step, hparams, decoupled=optimizer == "adamw")


def _sgd(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], name: str, step: torch.Tensor,
    hp: dict[str, torch.Tensor],
) -> None:
    lr, momentum = _per_model(hp["lr"], p), _per_model(hp["momentum"], p)
    wd, dampening = _per_model(hp["weight_decay"], p), _per_model(hp["dampening"], p)
    d_p = g + wd * p
    # No branch on the hyperparameters' values: on a GPU reading them would wait for the
    # device. With momentum 0 the buffer is updated but not used.
    buf = state[state_name("momentum", name)]
    # torch.optim.SGD starts the buffer at the first gradient, undamped.
    first = _per_model(step == 1, p).bool()
    buf.copy_(torch.where(first, d_p, momentum * buf + (1 - dampening) * d_p))
    nesterov = _per_model(hp["nesterov"], p).bool()
    d_p = torch.where(nesterov, d_p + momentum * buf, torch.where(momentum != 0, buf, d_p))
    p.sub_(lr * d_p)


def _adam(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], name: str, step: torch.Tensor,
    hp: dict[str, torch.Tensor], decoupled: bool,
) -> None:
    lr, wd = _per_model(hp["lr"], p), _per_model(hp["weight_decay"], p)
    beta1, beta2, eps = _per_model(hp["beta1"], p), _per_model(hp["beta2"], p), _per_model(hp["eps"], p)
    exp_avg = state[state_name("exp_avg", name)]
    exp_avg_sq = state[state_name("exp_avg_sq", name)]
    if decoupled:
        p.mul_(1 - lr * wd)
    else:
        g = g + wd * p
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g * (1 - beta2))
    # Bias corrections in float64, as torch.optim computes them in Python floats.
    t = _per_model(step, p, torch.float64)
    bias_correction1 = 1 - _per_model(hp["beta1"], p, torch.float64) ** t
    bias_correction2 = 1 - _per_model(hp["beta2"], p, torch.float64) ** t
    step_size = (lr / bias_correction1).to(p.dtype)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt().to(p.dtype)).add_(eps)
    p.sub_(step_size * exp_avg / denom)
