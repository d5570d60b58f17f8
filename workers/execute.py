"""Running jobs on one group's bank: infer, train_step, ensemble, train_round.

A ``GroupRuntime`` owns the module (built once, its own parameters unused) and the
bank. Every call binds model ``slot``'s views of the bank into the module with
``torch.func.functional_call``: no weights are copied in or out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.bank import Bank
from core.definition import build_module, call_module
from core.errors import BadInput, CohortError, ConfigError
from core.spec import GroupSpec
from core.tensors import DTYPES
from workers.fused import FUSE_MIN_MODELS, FusedGroup
from workers.losses import resolve_loss
from workers.optim import optimizer_step

log = logging.getLogger("cohort.worker")
PROGRESS_EVERY_S = 2.0


class GroupRuntime:
    """One group's models on this worker: its module, bank, loss and optimizer."""

    def __init__(self, spec: GroupSpec, bank: Bank, device: torch.device) -> None:
        self.spec = spec
        self.bank = bank
        self.device = device
        self.module: nn.Module = build_module(spec.factory, spec.kwargs, "meta").to_empty(device=device)
        self.loss_fn = resolve_loss(spec.loss)
        self.hparams = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in spec.hparams.items()
        }
        self.params = bank.role("param")
        self.buffers = bank.role("buffer")
        self.state = bank.role("state")
        self.fused = FusedGroup(self)
        self.fused.enabled = spec.batching.fuse
        self._meta_module: nn.Module | None = None
        self._meta_outputs: dict[tuple[Any, ...], Any] = {}

    # ------------------------------------------------------------------ weights

    def initialise(self) -> None:
        """Fill the bank from the group's init: seeded like plain PyTorch, or safetensors files.

        Progress goes to the log every few seconds when it takes that long (many models,
        large files)."""
        began = shown = time.monotonic()
        total = len(self.spec.indices)
        for slot, index in enumerate(self.spec.indices):
            if self.spec.init_safetensors is not None:
                weights = self._load_safetensors(index)
            else:
                weights = self._seeded_weights(index)
            views = self.bank.model_state(slot)
            with torch.no_grad():
                for name, view in views.items():
                    view.copy_(weights[name])
            self.bank.reset_optimizer_state(slot)
            if time.monotonic() - shown > PROGRESS_EVERY_S:
                shown = time.monotonic()
                log.info("group %s: %d/%d models initialised (%.0f s)", self.spec.name, slot + 1, total, shown - began)
        if time.monotonic() - began > PROGRESS_EVERY_S:
            log.info("group %s: all %d models initialised in %.1f s", self.spec.name, total, time.monotonic() - began)

    def _seeded_weights(self, index: int) -> dict[str, torch.Tensor]:
        # Model ``index`` is what ``torch.manual_seed(seed + index); factory(**kwargs)`` builds.
        assert self.spec.init_seed is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.init_seed + index)
            module = build_module(self.spec.factory, self.spec.kwargs, "cpu")
        return dict(module.state_dict())

    def _load_safetensors(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        assert self.spec.init_safetensors is not None
        path = self.spec.init_safetensors.format(index=index, group=self.spec.name)
        try:
            weights = load_file(path)
        except Exception as exc:
            raise ConfigError(f"group {self.spec.name!r} init: cannot load {path!r}: {exc}") from None
        expected = self.bank.model_state(0)
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ConfigError(f"group {self.spec.name!r} init: {path!r} missing {missing[:5]}, unexpected {extra[:5]}")
        for name, view in expected.items():
            if tuple(weights[name].shape) != tuple(view.shape):
                raise ConfigError(
                    f"group {self.spec.name!r} init: {path!r} tensor {name!r} has shape "
                    f"{list(weights[name].shape)}, the model needs {list(view.shape)}"
                )
        return weights

    # ------------------------------------------------------------------ jobs

    def _bound(self, slot: int, trainable: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        bound = {n: t[slot] for n, t in self.params.items()}
        if trainable:
            bound.update(trainable)
        bound.update({n: t[slot] for n, t in self.buffers.items()})
        return bound

    def infer(self, slot: int, inputs: Any) -> Any:
        self.module.eval()
        with torch.no_grad():
            return call_module(self.module, self._bound(slot), inputs)

    def train_step(self, slot: int, inputs: Any, target: torch.Tensor) -> torch.Tensor:
        """One optimizer step of model ``slot``; returns the loss (a 0-dim tensor on the device)."""
        self.module.train()
        leaves = {n: t[slot].detach().requires_grad_(True) for n, t in self.params.items()}
        output = call_module(self.module, self._bound(slot, leaves), inputs)
        loss = self.loss_fn(output, target)  # the target was checked on the host (check_job)
        names = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        # Like torch.optim, a parameter without a gradient is left alone, state included.
        used = {n: g.unsqueeze(0) for n, g in zip(names, grads) if g is not None}
        window = slice(slot, slot + 1)
        optimizer_step(
            self.spec.optimizer,
            {n: self.params[n][window] for n in used},
            used,
            {n: t[window] for n, t in self.state.items()},
            {k: v[window] for k, v in self.hparams.items()},
        )
        return loss.detach()

    def ensemble(self, slots: list[int], inputs: Any) -> Any:
        """The same inputs through models ``slots``: outputs stacked ``[n, ...]``, fused when it can."""
        return self._fused_or_loop(
            len(slots),
            lambda: self.fused.forward(slots, inputs, shared=True),
            lambda: stack_outputs([self.infer(s, inputs) for s in slots]),
        )

    def infer_stacked(self, slots: list[int], inputs: Any) -> Any:
        """Row ``j`` of the stacked inputs through model ``slots[j]``: outputs stacked ``[n, ...]``."""
        return self._fused_or_loop(
            len(slots),
            lambda: self.fused.forward(slots, inputs, shared=False),
            lambda: stack_outputs([self.infer(s, index_rows(inputs, j)) for j, s in enumerate(slots)]),
        )

    def train_round(self, slots: list[int], inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """One step for each model in ``slots``; row ``j`` of inputs and targets goes to ``slots[j]``."""
        return self._fused_or_loop(
            len(slots),
            lambda: self.fused.train(slots, inputs, targets),
            lambda: torch.stack([self.train_step(s, index_rows(inputs, j), targets[j]) for j, s in enumerate(slots)]),
        )

    def _fused_or_loop(self, n_models: int, fused: Callable[[], Any], loop: Callable[[], Any]) -> Any:
        """Run fused; if vmap cannot run this model but the loop can, keep to the loop from now on."""
        if not self.fused.enabled or n_models < FUSE_MIN_MODELS:
            return loop()
        try:
            return fused()
        except CohortError:
            raise
        except Exception as fused_error:
            result = loop()  # the model's own error (bad data) raises here, and fusion stays on
            self.fused.enabled = False
            log.warning("group %s: fused execution unavailable, running models one by one: %s: %s",
                        self.spec.name, type(fused_error).__name__, fused_error)
            return result

    def output_meta(self, inputs: Any) -> Any:
        """The output of one model for ``inputs``, on the meta device: shapes without compute."""
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()) if isinstance(inputs, dict) \
            else (tuple(inputs.shape), inputs.dtype)
        if key not in self._meta_outputs:
            if self._meta_module is None:
                self._meta_module = build_module(self.spec.factory, self.spec.kwargs, "meta")
            meta = {k: torch.empty_like(v, device="meta") for k, v in inputs.items()} if isinstance(inputs, dict) \
                else torch.empty_like(inputs, device="meta")
            with torch.no_grad():
                self._meta_outputs[key] = call_module(self._meta_module, {}, meta)
        return self._meta_outputs[key]

    def check_inputs(self, inputs: Any, stacked: int | None = None) -> None:
        """Check inputs against the spec on the worker too (a direct caller has no coordinator)."""
        specs = self.spec.inputs
        given = {"x": inputs} if self.spec.single_input else inputs
        if not isinstance(given, dict) or set(given) != {s.name for s in specs}:
            raise BadInput(f"group {self.spec.name!r} expects inputs {[s.name for s in specs]}")
        for spec in specs:
            t = given[spec.name]
            shape = list(t.shape[1:]) if stacked is not None else list(t.shape)
            if t.dtype != DTYPES[spec.dtype] or len(shape) != len(spec.shape) or any(
                d != -1 and d != s for d, s in zip(spec.shape, shape)
            ):
                raise BadInput(f"input {spec.name!r} must be {spec.dtype} {list(spec.shape)}, got {t.dtype} {list(t.shape)}")


def index_rows(inputs: Any, j: int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[j] for k, v in inputs.items()}
    return inputs[j]


def stack_outputs(outputs: list[Any]) -> Any:
    """Stack per-model outputs along a new dim 0, leaf by leaf."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outputs)
    if isinstance(first, dict):
        return {k: torch.stack([o[k] for o in outputs]) for k in first}
    return tuple(torch.stack([o[i] for o in outputs]) for i in range(len(first)))
