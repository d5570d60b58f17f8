"""Shared by the optimizer tests: a model factory in any dtype, torch.optim references, ulp distances.

A group names the factory as ``"tests.unit.optim_support:mlp"`` with
``kwargs = {"dtype": "bfloat16", ...}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.tensors import DTYPES
from examples.models import mlp as example_mlp

REDUCED = (torch.bfloat16, torch.float16)


def mlp(dtype: str = "float32", **kwargs: Any) -> nn.Module:
    """``examples.models:mlp(**kwargs)`` built in float32 (the same seeded draws for every
    dtype), then cast to ``dtype``."""
    return example_mlp(**kwargs).to(DTYPES[dtype])


def torch_optimizer(kind: str, params: list[torch.Tensor], hp: dict[str, float]) -> torch.optim.Optimizer:
    """torch.optim's optimizer for cohort's hyperparameters, on its single-tensor path
    (the one whose op order workers/optim.py follows)."""
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
            weight_decay=hp["weight_decay"], nesterov=bool(hp["nesterov"]), foreach=False,
        )
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(
        params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], foreach=False, fused=False,
    )


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """The float bits of ``t`` as integers in the order of the values (adjacent floats differ by 1)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    i = t.contiguous().view(bits).to(torch.int64)
    magnitude = i & ((1 << (torch.finfo(t.dtype).bits - 1)) - 1)
    return torch.where(i < 0, -magnitude, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between ``a`` and ``b``, elementwise."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "inf or nan: pick hyperparameters the dtype can hold"
    return (_ordered(a) - _ordered(b)).abs()


def assert_ulps(mine: torch.Tensor, ref: torch.Tensor, where: str, max_ulps: int = 0) -> None:
    """At most ``max_ulps`` representable values apart anywhere (0: bit for bit)."""
    d = ulp_distance(mine, ref)
    worst = int(d.max()) if d.numel() else 0
    assert worst <= max_ulps, (
        f"{where}: {worst} ulps apart at worst (allowed {max_ulps}); {int((d > 0).sum())}/{d.numel()} elements differ"
    )
