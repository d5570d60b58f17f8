"""Running jobs on one group's bank: infer, train_step, ensemble, train_round.

A ``GroupRuntime`` owns the module (built once, its own parameters unused) and the
bank. Every call binds model ``slot``'s views of the bank into the module with
``torch.func.functional_call``: no weights are copied in or out. The views of each
model are taken once, when the runtime is built: the bank never moves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from core.bank import Bank
from core.definition import build_module
from core.errors import CohortError, ConfigError
from core.spec import GroupSpec
from workers.fused import FUSE_MIN_MODELS, FusedGroup
from workers.losses import resolve_loss
from workers.module import BankTables, GroupModule
from workers.optim import optimizer_step
from workers.outcome import AlreadyStepped, is_transient

log = logging.getLogger("cohort.worker")
PROGRESS_EVERY_S = 2.0


class GroupRuntime:
    """One group's models on this worker: its module, bank, loss and optimizer."""

    def __init__(self, spec: GroupSpec, bank: Bank, device: torch.device) -> None:
        self.spec = spec
        self.bank = bank
        self.device = device
        self.module = GroupModule(build_module(spec.factory, spec.kwargs, "meta").to_empty(device=device))
        self.loss_fn = resolve_loss(spec.loss)
        hparams = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in spec.hparams.items()}
        self.tables = BankTables(bank.role("param"), bank.role("buffer"), bank.role("state"), hparams)
        self._views = [self.tables.model(slot) for slot in range(len(spec.indices))]
        self.fused = FusedGroup(spec.name, self.module, self.loss_fn, spec.optimizer, self.tables, device,
                                spec.batching.compile)
        self.fused.enabled = spec.batching.fuse
        self.mirror: Bank | None = None  # the coordinator's host copy of this bank
        self._meta_module: GroupModule | None = None
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

    def infer(self, slot: int, inputs: Any) -> Any:
        self.module.mode(False)
        with torch.no_grad():
            return self.module(self._views[slot], inputs)

    def train_step(self, slot: int, inputs: Any, target: torch.Tensor) -> torch.Tensor:
        """One optimizer step of model ``slot``; returns the loss (a 0-dim tensor on the device).

        The gradient is computed first, touching nothing; a failure once the optimizer
        step has begun raises ``AlreadyStepped``."""
        self.module.mode(True)
        params = self.tables.params
        leaves = {n: t[slot].detach().requires_grad_(True) for n, t in params.items()}
        output = self.module({**self._views[slot], **leaves}, inputs)
        loss = self.loss_fn(output, target)  # the target was checked on the host (check_job)
        names = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        # Like torch.optim, a parameter without a gradient is left alone, state included.
        used = {n: g.unsqueeze(0) for n, g in zip(names, grads) if g is not None}
        window = slice(slot, slot + 1)
        try:
            optimizer_step(
                self.spec.optimizer,
                {n: params[n][window] for n in used},
                used,
                {n: t[window] for n, t in self.tables.state.items()},
                {k: v[window] for k, v in self.tables.hparams.items()},
            )
        except Exception as exc:
            raise AlreadyStepped(exc) from exc
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
            lambda: self._train_each(slots, inputs, targets),
        )

    def _train_each(self, slots: list[int], inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        losses = []
        for j, slot in enumerate(slots):
            try:
                losses.append(self.train_step(slot, index_rows(inputs, j), targets[j]))
            except AlreadyStepped:
                raise
            except Exception as exc:
                if j == 0:
                    raise
                raise AlreadyStepped(exc) from exc  # the models before this one have taken their step
        return torch.stack(losses)

    def _fused_or_loop(self, n_models: int, fused: Callable[[], Any], loop: Callable[[], Any]) -> Any:
        """Run fused. If vmap cannot run this model but the loop can, keep to the loop from now on;
        a transient error (out of memory) or the model's own error leaves fusion on."""
        if not self.fused.enabled or n_models < FUSE_MIN_MODELS:
            return loop()
        try:
            return fused()
        except (CohortError, AlreadyStepped):
            raise
        except Exception as fused_error:
            if is_transient(fused_error):
                raise
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
                self._meta_module = GroupModule(build_module(self.spec.factory, self.spec.kwargs, "meta"))
            meta = {k: torch.empty_like(v, device="meta") for k, v in inputs.items()} if isinstance(inputs, dict) \
                else torch.empty_like(inputs, device="meta")
            with torch.no_grad():
                self._meta_outputs[key] = self._meta_module({}, meta)
        return self._meta_outputs[key]


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
