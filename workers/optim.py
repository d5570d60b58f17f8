"""Optimizers that step many models at once, with their state in the bank.

Every tensor here has the models on dim 0: a parameter ``[k, *S]``, its gradient,
its state, and each hyperparameter ``[k]`` (one value per model, broadcast). One
code path serves a single model (``k = 1``, a slice of the bank) and a fused step
over a whole group. The formulas follow ``torch.optim.SGD``/``Adam``/``AdamW``
(single-tensor, non-capturable), so cohort training ends where plain PyTorch ends.

The arithmetic is torch.optim's too, whatever the parameters' dtype. torch.optim passes
its hyperparameters as Python floats: the factors derived from them (``1 - beta2``,
``lr / bias_correction1``, ...) are computed in double precision, and each elementwise
op computes in its "opmath" type (float32 for bfloat16 and float16 tensors) and rounds
only the result it stores. Here the hyperparameters differ between models, so they stay
``[k]`` tensors: the derived factors are computed in float64 and applied as opmath
(float32) tensors, never rounded to bfloat16 or float16 (where ``1 - 0.999`` is 0 and
Adam's second moment would never move). Every result torch.optim stores in the
parameter's dtype (the moments, the weight-decayed gradient, Adam's denominator, the
parameter) is rounded to that dtype at the same point of the same op order, so bf16 and
fp16 training follows torch.optim up to how an op's float32 intermediate is rounded
(tests/unit/test_optim_dtypes.py: bit for bit on the CPU).

One difference is torch's, between its own devices: on the CPU, ``add`` rounds its
scalar (``alpha``, or a number added such as Adam's ``eps``) to the tensor's dtype, where
the CUDA kernel keeps it in float32. Cohort keeps float32 on both, so on the CPU a bf16
or fp16 run differs from torch.optim's where SGD's lr, momentum, dampening or weight
decay, or Adam's L2 weight decay or eps, is not exact in that dtype.

Nothing here reads a tensor's value on the host: no branch on a hyperparameter or a
step count (on a GPU that would wait for the device); ``torch.where`` selects instead.
"""

from __future__ import annotations

import torch

from core.definition import state_name


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The type an elementwise op on ``dtype`` tensors computes in (ATen's ``opmath_type``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_model(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a ``[k]`` tensor to broadcast against a ``[k, *S]`` tensor."""
    return value.reshape((-1,) + (1,) * (like.dim() - 1))


def _factor(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[k]`` float64 factor in ``like``'s opmath type, shaped to broadcast against it.

    This is what torch's kernels make of a Python-float scalar: the double rounded once
    to the opmath type, never to the tensor's own (bfloat16, float16) dtype."""
    return _per_model(value.to(_opmath(like.dtype)), like)


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its opmath type (the same tensor when it already is: do not modify it in place)."""
    return t.to(_opmath(t.dtype))


def _add_scaled(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``y.add(x, alpha=alpha)`` in opmath, the result not yet rounded to ``y``'s dtype.

    torch's ``add`` with ``alpha`` is a fused multiply-add (one rounding) in its vector
    kernels; ``addcmul`` (``y + x * alpha``) rounds the same way, where ``y + alpha * x``
    as two ops would round twice (measured: float32 results bit for bit on the CPU)."""
    return torch.addcmul(_up(y), _up(x), alpha)


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
    # torch/optim/sgd.py, _single_tensor_sgd, op for op; ``.to(dtype)`` is where torch.optim
    # stores a result in the parameter's dtype.
    dtype = p.dtype
    lr, momentum = hp["lr"].to(torch.float64), hp["momentum"].to(torch.float64)
    dampening, wd = hp["dampening"].to(torch.float64), hp["weight_decay"].to(torch.float64)
    # grad = grad.add(param, alpha=weight_decay). With weight decay 0 this is the gradient.
    d_p = _add_scaled(g, p, _factor(wd, p)).to(dtype)
    # No branch on the hyperparameters' values: on a GPU reading them would wait for the
    # device. With momentum 0 the buffer is updated but not used.
    buf = state[state_name("momentum", name)]
    # buf.mul_(momentum).add_(grad, alpha=1 - dampening): two ops, each result stored.
    decayed = (_up(buf) * _factor(momentum, p)).to(dtype)
    stepped = _add_scaled(decayed, d_p, _factor(1 - dampening, p)).to(dtype)
    # torch.optim.SGD starts the buffer at the first gradient, undamped.
    first = _per_model(step == 1, p)
    buf.copy_(torch.where(first, d_p, stepped))
    # nesterov: grad = grad.add(buf, alpha=momentum); else grad = buf (when momentum != 0).
    with_nesterov = _add_scaled(d_p, buf, _factor(momentum, p)).to(dtype)
    nesterov = _per_model(hp["nesterov"] != 0, p)
    d_p = torch.where(nesterov, with_nesterov, torch.where(_per_model(momentum != 0, p), buf, d_p))
    # param.add_(grad, alpha=-lr)
    p.copy_(_add_scaled(p, d_p, _factor(-lr, p)))


def _adam(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], name: str, step: torch.Tensor,
    hp: dict[str, torch.Tensor], decoupled: bool,
) -> None:
    # torch/optim/adam.py, _single_tensor_adam (capturable=False), op for op.
    dtype = p.dtype
    lr, wd = hp["lr"].to(torch.float64), hp["weight_decay"].to(torch.float64)
    beta1, beta2, eps = (hp[k].to(torch.float64) for k in ("beta1", "beta2", "eps"))
    exp_avg = state[state_name("exp_avg", name)]
    exp_avg_sq = state[state_name("exp_avg_sq", name)]
    if decoupled:
        # param.mul_(1 - lr * weight_decay), the factor in double.
        p.copy_(_up(p) * _factor(1 - lr * wd, p))
    else:
        # grad = grad.add(param, alpha=weight_decay)
        g = _add_scaled(g, p, _factor(wd, p)).to(dtype)
    g_up = _up(g)
    # exp_avg.lerp_(grad, 1 - beta1): torch.lerp in opmath, the weight in opmath.
    exp_avg.copy_(torch.lerp(_up(exp_avg), g_up, _factor(1 - beta1, p)))
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): two ops, each result
    # stored; addcmul computes self + (value * t1) * t2.
    decayed = (_up(exp_avg_sq) * _factor(beta2, p)).to(dtype)
    exp_avg_sq.copy_(torch.addcmul(_up(decayed), _factor(1 - beta2, p) * g_up, g_up))
    # Bias corrections in double, as torch.optim computes them from Python floats, each
    # parameter from its own step count.
    t = step.to(torch.float64)
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): three results stored.
    denom = (_up(exp_avg_sq.sqrt()) / _factor(bias_correction2_sqrt, p)).to(dtype)
    denom = (_up(denom) + _factor(eps, p)).to(dtype)
    # param.addcdiv_(exp_avg, denom, value=-step_size): self + (value * t1) / t2, rounded once.
    p.copy_(_up(p) + (_factor(-step_size, p) * _up(exp_avg)) / _up(denom))
