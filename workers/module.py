"""A group's module as every call uses it: built once, its own parameters unused.

Calls bind a model's views of the bank with ``torch.func.functional_call``. Switching
between ``eval()`` and ``train()`` walks every submodule, so the mode is changed only
when it differs from the last call's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class GroupModule:
    """The module of one group, the mode (train or eval) it was last put in, and its autocast."""

    def __init__(self, module: nn.Module, autocast: torch.dtype | None = None) -> None:
        self.module = module
        self.training = module.training
        self.autocast = autocast  # bf16-mixed: forward and loss under torch.autocast in this dtype

    def compute(self) -> contextlib.AbstractContextManager[Any]:
        """Where a forward (and its loss) runs: under autocast for mixed precision, else as it is."""
        if self.autocast is None:
            return contextlib.nullcontext()
        device = next((p.device.type for p in self.module.parameters()), "cpu")
        return torch.autocast(device_type=device, dtype=self.autocast)

    def mode(self, training: bool) -> None:
        if training != self.training:
            self.module.train(training)
            self.training = training

    def __call__(self, tensors: dict[str, torch.Tensor], inputs: Any) -> Any:
        """Run the module with ``tensors`` (parameters and buffers by name) on ``inputs``, no copies."""
        if isinstance(inputs, dict):
            return torch.func.functional_call(self.module, tensors, (), inputs, strict=False)
        return torch.func.functional_call(self.module, tensors, (inputs,), strict=False)


@dataclass(frozen=True)
class BankTables:
    """A group's bank on this worker by role; every tensor is ``[K, *shape]``, hyperparameters ``[K]``."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    hparams: dict[str, torch.Tensor]

    def model(self, slot: int) -> dict[str, torch.Tensor]:
        """Model ``slot``'s parameters and buffers as views: what a per-model call binds."""
        return {**{n: t[slot] for n, t in self.params.items()}, **{n: t[slot] for n, t in self.buffers.items()}}
