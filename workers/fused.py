"""Fused execution: many models of one group as one ``torch.func.vmap`` call over the bank.

The bank already holds every parameter as ``[K, *shape]``, so a window of models is a
view (contiguous slots) or a gather (scattered slots), and ``vmap`` over dim 0 runs
them all in one batched call: one kernel over K weight sets instead of K small ones.
Training computes every model's gradient with ``vmap(grad_and_value(...))`` and takes
one optimizer step over the window, each model with its own hyperparameters; evaluation
is the vmap'd loss. A batch shared by every model is passed once (``in_dims=None``).

With the group's ``batching.compile`` set, the vmap'd calls go through the compiler
(``workers.compiled``: steady shapes, compiled once per machine and loaded everywhere
else); the optimizer step stays eager (it updates the bank in place). A call that cannot
compile runs eagerly, says why once in the log, and is counted (``compiled_calls`` and
``eager_calls``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from workers.compiled import CompiledCalls
from workers.module import BankTables, GroupModule
from workers.outcome import AlreadyStepped, is_transient
from workers.training import Trainer

log = logging.getLogger("cohort.worker")

# torch's warning when vmap has no batching rule for an operator and runs it in a loop over the models.
SLOW_LAYER = re.compile(r"batching rule for (aten::[\w.]+)")

Kind = tuple[str, bool]  # ("forward" | "train" | "evaluate", one batch shared by every model)


def _window(slots: list[int]) -> slice | None:
    """The slice covering ``slots`` when they are contiguous and ascending, else None."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None


class FusedGroup:
    """vmap'd forward, training step and evaluation over any set of one group's models on this worker."""

    def __init__(self, name: str, module: GroupModule, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                 trainer: Trainer, tables: BankTables, device: torch.device) -> None:
        self.name = name
        self.module = module
        self.loss_fn = loss_fn
        self.trainer = trainer
        self.tables = tables
        self.device = device
        self.enabled = True
        self.compiled: CompiledCalls | None = None  # set when the group compiles its fused calls
        self.compiled_calls = 0
        self.eager_calls = 0
        self._eager: dict[Kind, Callable[..., Any]] = {}
        self._said: set[str] = set()
        self._watched: set[Kind] = set()
        # Per kind of call ("forward", "train", "evaluate"): operators vmap runs without a batching rule.
        self.slow_ops: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ calls

    def forward(self, slots: list[int], inputs: Any, shared: bool, compiled: bool = True) -> Any:
        """Outputs ``[n, ...]`` of models ``slots``; ``shared``: one input for all, else stacked ``[n, ...]``.
        ``compiled``: through the compiled call where the group compiles (else eager)."""
        self.module.mode(False)
        with torch.no_grad(), self.module.compute():
            return self._run(("forward", shared), slots, (inputs,), compiled)

    def train(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool = False,
              compiled: bool = True) -> torch.Tensor:
        """One optimizer step of every model in ``slots``, on one batch for all (``shared``) or on
        stacked ``[n, ...]`` inputs and targets; losses ``[n]``.

        Gradients are computed first, touching nothing; a failure after the optimizer
        step has begun raises ``AlreadyStepped``, so that nobody runs these models again."""
        self.module.mode(True)
        with self.module.compute():
            grads, losses = self._run(("train", shared), slots, (inputs, targets), compiled)
        select = self._select(slots)
        try:
            params = _take(self.tables.params, select)
            state = _take(self.tables.state, select)
            self.trainer.step(params, grads, state, _take(self.tables.hparams, select))
            if not isinstance(select, slice):  # a gather copied them: write the stepped weights and state back
                with torch.no_grad():
                    for table, taken in ((self.tables.params, params), (self.tables.state, state)):
                        for n, t in taken.items():
                            table[n].index_copy_(0, select, t)
        except Exception as exc:
            raise AlreadyStepped(exc) from exc
        return losses.detach()

    def evaluate(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool = False,
                 compiled: bool = True) -> torch.Tensor:
        """Every model's loss without a step, in eval mode: ``[n]`` float32."""
        self.module.mode(False)
        with torch.no_grad(), self.module.compute():
            return self._run(("evaluate", shared), slots, (inputs, targets), compiled).float()

    # ------------------------------------------------------------------ the vmap'd functions

    def eager(self, kind: Kind) -> Callable[..., Any]:
        """The vmap'd function of ``kind``: ``fn(params, buffers, select, *data)``, made once."""
        fn = self._eager.get(kind)
        if fn is None:
            fn = self._eager[kind] = self._make(kind)
        return fn

    def _make(self, kind: Kind) -> Callable[..., Any]:
        name, shared = kind
        data_dims = None if shared else 0
        if name == "forward":
            fused = vmap(self._call, in_dims=(0, 0, data_dims), randomness="different")

            def forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], select: Any, x: Any) -> Any:
                return fused(_take(params, select), _take(buffers, select), x)

            return forward
        if name == "train":
            grads = vmap(grad_and_value(self._loss_of), in_dims=(0, 0, data_dims, data_dims), randomness="different")

            def gradients(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], select: Any, x: Any,
                          t: torch.Tensor) -> Any:
                return grads({n: p.detach() for n, p in _take(params, select).items()}, _take(buffers, select), x, t)

            return gradients
        losses_of = vmap(self._loss_of, in_dims=(0, 0, data_dims, data_dims), randomness="different")

        def losses(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], select: Any, x: Any,
                   t: torch.Tensor) -> Any:
            return losses_of(_take(params, select), _take(buffers, select), x, t)

        return losses

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any) -> Any:
        return self.module({**params, **buffers}, x)

    def _loss_of(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any,
                 target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self._call(params, buffers, x), target)

    def _run(self, kind: Kind, slots: list[int], data: tuple[Any, ...], compiled: bool = True) -> Any:
        """``kind`` over ``slots`` on ``data``: compiled when the group asks and it can, else eager."""
        eager = self.eager(kind)
        params, buffers = self.tables.params, self.tables.buffers
        if self.compiled is None or not compiled:
            self.eager_calls += 1
            if kind in self._watched:
                return eager(params, buffers, self._select(slots), *data)
            return self._first_eager(kind, eager, params, buffers, slots, data)
        try:
            result = self.compiled.call(kind, eager, slots, params, buffers, data)
        except Exception as compile_error:
            if is_transient(compile_error):
                raise
            # The calls are pure functions of their arguments: run again eagerly. Bad data
            # raises here, and compiling stays on; otherwise the compiler is at fault.
            result = eager(params, buffers, self._select(slots), *data)
            self._say(f"compiled fused calls failed, running them eagerly: {type(compile_error).__name__}: "
                      f"{compile_error}")
            self.compiled = None
            self.eager_calls += 1
            return result
        self.compiled_calls += 1
        return result

    def _first_eager(self, kind: Kind, eager: Callable[..., Any], params: dict[str, torch.Tensor],
                     buffers: dict[str, torch.Tensor], slots: list[int], data: tuple[Any, ...]) -> Any:
        """The first eager call of a kind, listening for operators vmap has no batching rule for: torch
        runs those model by model inside the "fused" call, which the plan report should say."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = eager(params, buffers, self._select(slots), *data)
        self._watched.add(kind)
        slow = sorted({m.group(1) for w in caught if (m := SLOW_LAYER.search(str(w.message)))})
        if slow:
            self.slow_ops[kind[0]] = sorted({*self.slow_ops.get(kind[0], []), *slow})
            self._say(f"vmap has no batching rule for {', '.join(slow)}: torch loops over the models there")
        for w in caught:  # everything else as it would have been shown
            if not SLOW_LAYER.search(str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return result

    def _say(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            log.warning("group %s: %s", self.name, text)

    def _index(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as an index tensor on the device, copied without a host sync: a pageable
        host-to-device copy (``torch.tensor(..., device=cuda)``) waits for the stream to drain."""
        index = torch.tensor(slots, dtype=torch.int64)
        if self.device.type == "cuda":
            return index.pin_memory().to(self.device, non_blocking=True)
        return index

    def _select(self, slots: list[int]) -> slice | torch.Tensor:
        """How to take ``slots`` out of a bank tensor: a view of a contiguous window, else a gather index."""
        window = _window(slots)
        return window if window is not None else self._index(slots)


def _take(table: dict[str, torch.Tensor], select: slice | torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Models ``select`` of every bank tensor: all (None), views of a window, or a gather (a copy)."""
    if select is None:
        return table
    if isinstance(select, slice):
        return {n: t[select] for n, t in table.items()}
    return {n: t.index_select(0, select) for n, t in table.items()}
