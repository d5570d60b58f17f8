"""Training losses, with the target checked against the output before it is used.

A target that does not fit is the user's input error (``BadInput``), never a crash:
on a GPU an out-of-range class index would be a device-side assert that kills the
worker's CUDA context, so class indices are range-checked on the host first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from core.definition import import_object
from core.errors import BadInput, JobFailed

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def check_target(loss: str, output: Any, target: torch.Tensor) -> None:
    """Raise ``BadInput`` if ``target`` cannot be used with ``output`` under a builtin loss."""
    if loss not in ("cross_entropy", "mse"):
        return
    if not isinstance(output, torch.Tensor):
        raise BadInput(f"loss {loss!r} needs the model to return one tensor, it returned {type(output).__name__}")
    shape, tshape = list(output.shape), list(target.shape)
    if loss == "mse":
        if tshape != shape or not target.is_floating_point():
            raise BadInput(f"mse target must be a float tensor of the output's shape {shape}, got {target.dtype} {tshape}")
        return
    if not shape:
        raise BadInput("cross_entropy needs an output with a class dimension, the model returned a scalar")
    classes = shape[-1]
    if target.is_floating_point():
        if tshape != shape:
            raise BadInput(f"cross_entropy with probabilities needs a target of the output's shape {shape}, got {tshape}")
        return
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise BadInput(f"cross_entropy target must be class indices (int64) or probabilities (float), got {target.dtype}")
    if tshape != shape[:-1]:
        raise BadInput(f"cross_entropy target of class indices must have shape {shape[:-1]} (output {shape}), got {tshape}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise BadInput(
            f"cross_entropy target has class index {int(target.min()) if int(target.min()) < 0 else int(target.max())}"
            f" outside [0, {classes})"
        )


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The last dim holds the classes: [B, C] classifiers and [B, T, V] language models alike.
    logits = output.reshape(-1, output.shape[-1])
    if target.is_floating_point():
        return F.cross_entropy(logits, target.reshape(-1, output.shape[-1]).to(output.dtype))
    return F.cross_entropy(logits, target.reshape(-1).long())


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target.to(output.dtype))


def resolve_loss(name: str) -> LossFn:
    """The loss function a group names: a builtin, or ``"package.module:function"``."""
    if name == "cross_entropy":
        return _cross_entropy
    if name == "mse":
        return _mse
    fn = import_object(name, "loss")

    def custom(output: Any, target: torch.Tensor) -> torch.Tensor:
        value = fn(output, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise JobFailed(f"loss {name!r} must return a scalar tensor, got {type(value).__name__}")
        return value.reshape(())

    return custom
