"""Running jobs on one group's bank: infer, train_step, ensemble, train_round, evaluate,
and the per-model operations on hyperparameters and new trials.

A ``GroupRuntime`` owns the module (built once, its own parameters unused) and the
bank. Every call binds model ``slot``'s views of the bank into the module with
``torch.func.functional_call``: no weights are copied in or out. The views of each
model are taken once, when the runtime is built: the bank never moves. Floating-point
inputs are cast to the dtype the models compute in (a float32 batch into a bfloat16
group); under ``precision = "bf16-mixed"`` forward and loss run under bf16 autocast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from core.bank import Bank
from core.definition import (
    STEPS,
    build_module,
    cast_floating,
    compute_dtype,
    hparam_name,
    import_object,
)
from core.errors import CohortError, ConfigError
from core.messages import PlanReport
from core.spec import GroupSpec
from core.tensors import DTYPES
from workers import compiled as compiled_module
from workers import fused as fused_module
from workers import losses as losses_module
from workers import module as module_module
from workers import training as training_module
from workers.compile_cache import CompileCache, source_hash
from workers.compiled import CompiledCalls, Padding
from workers.fused import FusedGroup
from workers.losses import resolve_loss
from workers.module import BankTables, GroupModule, SlotModules
from workers.outcome import AlreadyStepped, is_transient
from workers.plans import ONE_BY_ONE, VMAP, PlanChooser
from workers.training import Trainer

log = logging.getLogger("cohort.worker")
PROGRESS_EVERY_S = 2.0


class GroupRuntime:
    """One group's models on this worker: its module, bank, loss and optimizer."""

    def __init__(self, spec: GroupSpec, bank: Bank, device: torch.device) -> None:
        self.spec = spec
        self.bank = bank
        self.device = device
        autocast = torch.bfloat16 if spec.precision == "bf16-mixed" else None
        self.module = GroupModule(build_module(spec.factory, spec.kwargs, "meta").to_empty(device=device), autocast)
        self.loss_fn = resolve_loss(spec.loss)
        hparams = {hp: bank.tensors[hparam_name(hp)] for hp in spec.hparams}
        self.tables = BankTables(bank.role("param"), bank.role("buffer"), bank.role("state"), hparams)
        self.dtype = compute_dtype([DTYPES[e.dtype] for e in spec.entries if e.role == "param"])
        self.trainer = Trainer(spec.optimizer, spec.schedule)
        self.slots = SlotModules(build_module(spec.factory, spec.kwargs, "meta"), self.tables)
        self.fused = FusedGroup(spec.name, self.module, self.loss_fn, self.trainer, self.tables, device)
        self.fused.enabled = spec.batching.fuse
        # On a GPU a call is timed only when the chooser asks (timing means waiting for the device).
        self.plans = PlanChooser(spec.name, spec.batching.plan, always_measure=device.type != "cuda")
        self.mirror: Bank | None = None  # the coordinator's host copy of this bank
        self._meta_module: GroupModule | None = None
        self._meta_outputs: dict[tuple[Any, ...], Any] = {}

    def enable_compile(self, mode: str, cache: CompileCache | None) -> CompiledCalls:
        """Compile the fused calls in ``mode``, shared through ``cache`` (None: this worker only)."""
        meta = build_module(self.spec.factory, self.spec.kwargs, "meta")
        base = {"factory": self.spec.factory, "kwargs": self.spec.kwargs,
                "factory_source": source_hash(import_object(self.spec.factory, "factory")),
                "module": repr(meta), "entries": msgspec.to_builtins(self.spec.entries), "loss": self.spec.loss,
                "loss_source": "" if self.spec.loss in ("cross_entropy", "mse") else source_hash(
                    import_object(self.spec.loss, "loss")),
                "precision": self.spec.precision, "inputs": msgspec.to_builtins(self.spec.inputs),
                "cohort": source_hash(fused_module, module_module, losses_module, compiled_module, training_module),
                "device": self.device.type}
        padding = Padding(self.spec.batching.buckets, self._outputs_lead_with_batch(),
                          self.spec.loss == "cross_entropy" and not _mixes_rows(meta))
        static = [*self.tables.params.values(), *self.tables.buffers.values()]
        self.fused.compiled = CompiledCalls(self.spec.name, mode, self.device, len(self.spec.indices), base, padding,
                                            self.fused, static, cache)
        return self.fused.compiled

    def compile_seconds(self) -> float:
        """Seconds this group's fused calls have spent compiling (or loading) so far on this worker."""
        return 0.0 if self.fused.compiled is None else self.fused.compiled.compile_s

    def plan_reports(self) -> list[PlanReport]:
        """How each kind of call runs (``stats()``), with the operators vmap loops over."""
        reports = self.plans.report()
        for report in reports:
            kind = "forward" if report.op in ("infer", "ensemble") else "evaluate" if report.op == "evaluate" else "train"
            slow = self.fused.slow_ops.get(kind)
            if slow:
                report.notes = [*report.notes, f"vmap has no batching rule for {', '.join(slow)} (torch loops there)"]
        return reports

    def _outputs_lead_with_batch(self) -> bool:
        """Whether every output of one model leads with the batch dim (so padded rows can be cut)."""
        from core.definition import example_inputs

        for batch in (2, 3):
            inputs = example_inputs(self.spec.inputs, self.spec.single_input, batch, "cpu")
            out = self.output_meta(cast_floating(inputs, self.dtype))
            leaves = out.values() if isinstance(out, dict) else (out if isinstance(out, tuple) else (out,))
            if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch for t in leaves):
                return False
        return True

    # ------------------------------------------------------------------ weights

    def initialise(self) -> None:
        """Fill the bank from the group's init: seeded like plain PyTorch, or safetensors files;
        hyperparameters from the config.

        Progress goes to the log every few seconds when it takes that long (many models,
        large files)."""
        began = shown = time.monotonic()
        total = len(self.spec.indices)
        for slot, index in enumerate(self.spec.indices):
            self.reset(slot, None, index)
            with torch.no_grad():
                for hp, values in self.spec.hparams.items():
                    self.tables.hparams[hp][slot] = values[slot]
            if time.monotonic() - shown > PROGRESS_EVERY_S:
                shown = time.monotonic()
                log.info("group %s: %d/%d models initialised (%.0f s)", self.spec.name, slot + 1, total, shown - began)
        if time.monotonic() - began > PROGRESS_EVERY_S:
            log.info("group %s: all %d models initialised in %.1f s", self.spec.name, total, time.monotonic() - began)

    def reset(self, slot: int, seed: int | None, index: int | None = None) -> None:
        """A new trial in ``slot``: weights as ``manual_seed(seed); factory()`` makes them (``seed`` None:
        the group's own rule for this model), optimizer state and step count cleared."""
        index = self.spec.indices[slot] if index is None else index
        if seed is None and self.spec.init_safetensors is not None:
            weights = self._load_safetensors(index)
        else:
            weights = self._seeded_weights((self.spec.init_seed or 0) + index if seed is None else seed)
        with torch.no_grad():
            for name, view in self.bank.model_state(slot).items():
                view.copy_(weights[name])
        self.bank.reset_optimizer_state(slot)

    def set_hparams(self, slots: list[int], values: dict[str, list[float]]) -> None:
        """New hyperparameters for ``slots`` (one value per slot), from their next step on."""
        with torch.no_grad():
            for name, per_slot in values.items():
                table = self.tables.hparams[name]
                for slot, value in zip(slots, per_slot):
                    table[slot] = value

    def get_hparams(self, slot: int) -> torch.Tensor:
        """The model's hyperparameters in the spec's order, then its step count: ``[len(hparams) + 1]``."""
        values = [self.tables.hparams[name][slot] for name in self.spec.hparams]
        return torch.stack([*values, self.tables.state[STEPS][slot]]).to(torch.float64)

    def _seeded_weights(self, seed: int) -> dict[str, torch.Tensor]:
        # Model ``index`` is what ``torch.manual_seed(seed + index); factory(**kwargs)`` builds.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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
        module = self.slots.get(slot, training=False)
        with torch.no_grad(), self.module.compute():
            return _call(module, cast_floating(inputs, self.dtype))

    def train_step(self, slot: int, inputs: Any, target: torch.Tensor) -> torch.Tensor:
        """One optimizer step of model ``slot``; returns the loss (a 0-dim tensor on the device).

        The gradient is computed first, touching nothing; a failure once the optimizer
        step has begun raises ``AlreadyStepped``."""
        module = self.slots.get(slot, training=True)
        leaves = self.slots.parameters(slot)
        with self.module.compute():
            loss = self.loss_fn(_call(module, cast_floating(inputs, self.dtype)), target)  # target checked on the host
        names = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        # Like torch.optim, a parameter without a gradient is left alone, state included.
        used = {n: g.unsqueeze(0) for n, g in zip(names, grads) if g is not None}
        window = slice(slot, slot + 1)
        params = self.tables.params
        try:
            self.trainer.step(
                {n: params[n][window] for n in used},
                used,
                {n: t[window] for n, t in self.tables.state.items()},
                {k: v[window] for k, v in self.tables.hparams.items()},
            )
        except Exception as exc:
            raise AlreadyStepped(exc) from exc
        return loss.detach()

    def evaluate_one(self, slot: int, inputs: Any, target: torch.Tensor) -> torch.Tensor:
        """The loss of model ``slot`` without a step, in eval mode (a 0-dim tensor)."""
        module = self.slots.get(slot, training=False)
        with torch.no_grad(), self.module.compute():
            return self.loss_fn(_call(module, cast_floating(inputs, self.dtype)), target).float()

    def ensemble(self, slots: list[int], inputs: Any, plan: str | None = None) -> Any:
        """The same inputs through models ``slots``: outputs stacked ``[n, ...]``. ``plan``: ``one_by_one``,
        ``vmap`` (eager), ``vmap_compiled``; None: one vmap'd call, compiled where the group compiles."""
        inputs = cast_floating(inputs, self.dtype)
        return self._fused_or_loop(
            plan,
            lambda compiled: self.fused.forward(slots, inputs, shared=True, compiled=compiled),
            lambda: stack_outputs([self.infer(s, inputs) for s in slots]),
        )

    def infer_stacked(self, slots: list[int], inputs: Any, plan: str | None = None) -> Any:
        """Row ``j`` of the stacked inputs through model ``slots[j]``: outputs stacked ``[n, ...]``."""
        inputs = cast_floating(inputs, self.dtype)
        return self._fused_or_loop(
            plan,
            lambda compiled: self.fused.forward(slots, inputs, shared=False, compiled=compiled),
            lambda: stack_outputs([self.infer(s, index_rows(inputs, j)) for j, s in enumerate(slots)]),
        )

    def train_round(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool = False,
                    plan: str | None = None) -> torch.Tensor:
        """One step for each model in ``slots``: on one batch for all (``shared``), or row ``j`` of the
        stacked inputs and targets for ``slots[j]``."""
        inputs = cast_floating(inputs, self.dtype)
        return self._fused_or_loop(
            plan,
            lambda compiled: self.fused.train(slots, inputs, targets, shared, compiled=compiled),
            lambda: self._train_each(slots, inputs, targets, shared),
        )

    def evaluate(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool = False,
                 plan: str | None = None) -> torch.Tensor:
        """Each model's loss without a step (``[n]``, float32), on one batch for all or stacked ones."""
        inputs = cast_floating(inputs, self.dtype)
        return self._fused_or_loop(
            plan,
            lambda compiled: self.fused.evaluate(slots, inputs, targets, shared, compiled=compiled),
            lambda: torch.stack([self.evaluate_one(s, *_row(inputs, targets, j, shared)) for j, s in enumerate(slots)]),
        )

    def _train_each(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool) -> torch.Tensor:
        losses = []
        for j, slot in enumerate(slots):
            try:
                losses.append(self.train_step(slot, *_row(inputs, targets, j, shared)))
            except AlreadyStepped:
                raise
            except Exception as exc:
                if j == 0:
                    raise
                raise AlreadyStepped(exc) from exc  # the models before this one have taken their step
        return torch.stack(losses)

    def _fused_or_loop(self, plan: str | None, fused: Callable[[bool], Any], loop: Callable[[], Any]) -> Any:
        """Run as ``plan`` says: ``one_by_one`` (or fusion off) the loop, else one vmap'd call, compiled
        for ``vmap_compiled``. If vmap cannot run this model but the loop can, the loop from now on; a
        transient error (out of memory) or the model's own error leaves fusion on."""
        if plan == ONE_BY_ONE or not self.fused.enabled:
            return loop()
        try:
            return fused(plan != VMAP)
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


def _call(module: torch.nn.Module, inputs: Any) -> Any:
    return module(**inputs) if isinstance(inputs, dict) else module(inputs)


def _mixes_rows(module: torch.nn.Module) -> bool:
    """A layer whose training step couples the rows of a batch (padding rows would change it)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _row(inputs: Any, targets: torch.Tensor, j: int, shared: bool) -> tuple[Any, torch.Tensor]:
    """Model ``j``'s batch: the shared one, or row ``j`` of stacked inputs and targets."""
    return (inputs, targets) if shared else (index_rows(inputs, j), targets[j])


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
