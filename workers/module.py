"""A group's module as calls use it, and each model as a module of its own over the bank.

Fused calls bind a window of the bank into the group's one module with
``torch.func.functional_call`` under vmap. A per-model call would pay that binding on
every call (about 200 µs of Python for a small model, several times its forward), so each
model instead gets, on first use, a copy of the module whose parameters and buffers *are*
its views of the bank: a plain call, no copy, and every in-place update of the bank (an
optimizer step, ``set_weights``, a restore) is what the next call sees. Switching between
``eval()`` and ``train()`` walks every submodule, so the mode is changed only when it
differs from the last call's.
"""

from __future__ import annotations

import contextlib
import copy
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


def own_version(view: torch.Tensor) -> torch.Tensor:
    """The memory of ``view`` as a tensor whose autograd version counter is its own.

    Every tensor of a bank is a view of one buffer, and views share one version counter:
    batch norm updating its running statistics in place during a training forward would
    then look like a change to the weights saved for the backward pass, and the step fail."""
    alias = torch.empty(0, dtype=view.dtype, device=view.device)
    return alias.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


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


class SlotModules:
    """Model ``slot`` as a module whose parameters and buffers are its views of the bank, made on first use."""

    def __init__(self, template: nn.Module, tables: BankTables) -> None:
        self.template = template  # on the meta device: structure only
        self.tables = tables
        # Tied weights appear under several names but once in the bank: each alias -> its bank name.
        first: dict[int, str] = {}
        self.aliases: dict[str, str] = {}
        for name, tensor in [*template.named_parameters(remove_duplicate=False),
                             *template.named_buffers(remove_duplicate=False)]:
            self.aliases[name] = first.setdefault(id(tensor), name)
        self.modules: dict[int, nn.Module] = {}
        self.training: dict[int, bool] = {}

    def get(self, slot: int, training: bool) -> nn.Module:
        module = self.modules.get(slot)
        if module is None:
            module = self.modules[slot] = self._bind(slot)
            self.training[slot] = module.training
        if self.training[slot] != training:
            module.train(training)
            self.training[slot] = training
        return module

    def parameters(self, slot: int) -> dict[str, nn.Parameter]:
        """The model's parameters by bank name (what a training step differentiates)."""
        module = self.get(slot, self.training.get(slot, True))
        return {name: module.get_parameter(name) for name in self.tables.params}

    def _bind(self, slot: int) -> nn.Module:
        module = copy.deepcopy(self.template)
        views = self.tables.model(slot)
        for alias, name in self.aliases.items():
            owner_name, _, leaf = alias.rpartition(".")
            owner = module.get_submodule(owner_name)
            if name in self.tables.params:
                owner._parameters[leaf] = nn.Parameter(own_version(views[name]), requires_grad=True)
            else:
                owner._buffers[leaf] = own_version(views[name])
        # An alias and its bank name must be one Parameter object again, as the tie was.
        for alias, name in self.aliases.items():
            if alias != name and name in self.tables.params:
                owner_name, _, leaf = alias.rpartition(".")
                module.get_submodule(owner_name)._parameters[leaf] = module.get_parameter(name)
        return module
