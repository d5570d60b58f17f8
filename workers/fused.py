"""Fused execution: many models of one group as one ``torch.func.vmap`` call over the bank.

The bank already holds every parameter as ``[K, *shape]``, so a window of models is a
view (contiguous slots) or a gather (scattered slots), and ``vmap`` over dim 0 runs
them all in one batched call: one kernel over K weight sets instead of K small ones.
Training computes every model's gradient with ``vmap(grad_and_value(...))`` and takes
one optimizer step over the window, each model with its own hyperparameters.

With the group's ``batching.compile`` set, the vmap'd forward and the vmap'd gradient
computation go through ``torch.compile`` (``"reduce-overhead"`` captures CUDA graphs on
a GPU): a vmap'd call pays Python overhead that, for small models, is larger than its
kernels. The optimizer step stays eager: it updates the bank in place. Each new call
shape compiles once (seconds), so the worker first tells the coordinator it may be
silent for a while; a call that cannot compile runs eagerly from then on, with a
warning in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, grad_and_value, vmap

from workers.optim import optimizer_step

if TYPE_CHECKING:
    from workers.execute import GroupRuntime

log = logging.getLogger("cohort.worker")

# A vmap'd call costs ~140 us of Python on top of its kernels, a plain call ~25 us (measured
# on a 2-core CPU, torch 2.13): below this many models, one call per model is faster.
FUSE_MIN_MODELS = 4
# Call shapes compiled per kind of call, below torch._dynamo's recompile limit (8), past
# which it would stop compiling without a word.
MAX_COMPILED_SHAPES = 6


def _window(slots: list[int]) -> slice | None:
    """The slice covering ``slots`` when they are contiguous and ascending, else None."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None


class FusedGroup:
    """vmap'd forward and training step over any set of one group's models on this worker."""

    def __init__(self, runtime: GroupRuntime) -> None:
        self.rt = runtime
        self.single = runtime.spec.single_input
        self.enabled = True
        self.compile_mode = runtime.spec.batching.compile
        # Called before a call that may compile: the worker says it may be silent a while.
        self.on_compile: Callable[[], None] = lambda: None
        self._eager: dict[Any, Callable[..., Any]] = {}
        self._compiled: dict[Any, Callable[..., Any]] = {}
        self._shapes_seen: dict[Any, set[Any]] = {}

    def _run(self, kind: Any, make: Callable[[], Callable[..., Any]], signature: Any, *args: Any) -> Any:
        """Call the vmap'd function ``kind`` (made once by ``make``), compiled when the group asks."""
        eager = self._eager.get(kind)
        if eager is None:
            eager = self._eager[kind] = make()
        if not self.compile_mode:
            return eager(*args)
        shapes = self._shapes_seen.setdefault(kind, set())
        if signature not in shapes:
            if len(shapes) >= MAX_COMPILED_SHAPES:  # past this torch would quietly stop compiling anyway
                if len(shapes) == MAX_COMPILED_SHAPES:
                    shapes.add(None)  # say it once
                    log.warning("group %s: %d call shapes compiled; further shapes run eagerly (keep batch "
                                "sizes steady to stay compiled)", self.rt.spec.name, MAX_COMPILED_SHAPES)
                return eager(*args)
            shapes.add(signature)
            self.on_compile()  # before anything slow: the first import of torch's compiler alone takes seconds
        compiled = self._compiled.get(kind)
        if compiled is None:
            compiled = self._compiled[kind] = torch.compile(eager, mode=self.compile_mode, dynamic=False)
        try:
            return compiled(*args)
        except Exception as compile_error:  # the calls are pure functions of their arguments: run again eagerly
            result = eager(*args)  # bad data raises here, and compiling stays on
            log.warning("group %s: torch.compile(mode=%r) failed, running fused calls eagerly: %s: %s",
                        self.rt.spec.name, self.compile_mode, type(compile_error).__name__, compile_error)
            self.compile_mode = ""
            return result

    def _index(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as an index tensor on the device, copied without a host sync: a pageable
        host-to-device copy (``torch.tensor(..., device=cuda)``) waits for the stream to drain."""
        index = torch.tensor(slots, dtype=torch.int64)
        if self.rt.device.type == "cuda":
            return index.pin_memory().to(self.rt.device, non_blocking=True)
        return index

    def _select(self, slots: list[int]) -> slice | torch.Tensor:
        """How to take ``slots`` out of a bank tensor: a view of a contiguous window, else a gather index."""
        window = _window(slots)
        return window if window is not None else self._index(slots)

    @staticmethod
    def _take(table: dict[str, torch.Tensor], select: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(select, slice):
            return {n: t[select] for n, t in table.items()}
        return {n: t.index_select(0, select) for n, t in table.items()}

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any) -> Any:
        tensors = {**params, **buffers}
        if isinstance(x, dict):
            return functional_call(self.rt.module, tensors, (), x, strict=False)
        return functional_call(self.rt.module, tensors, (x,), strict=False)

    def _loss_of(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any,
                 target: torch.Tensor) -> torch.Tensor:
        return self.rt.loss_fn(self._call(params, buffers, x), target)

    def forward(self, slots: list[int], inputs: Any, shared: bool) -> Any:
        """Outputs ``[n, ...]`` of models ``slots``; ``shared``: one input for all, else stacked ``[n, ...]``."""
        self.rt.module.eval()
        select = self._select(slots)
        params = self._take(self.rt.params, select)
        buffers = self._take(self.rt.buffers, select)
        in_dims = (0, 0, None if shared else 0)

        def make() -> Callable[..., Any]:
            return vmap(self._call, in_dims=in_dims, randomness="different")

        with torch.no_grad():
            return self._run(("forward", shared), make, (len(slots), _shapes(inputs)), params, buffers, inputs)

    def train(self, slots: list[int], inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every model in ``slots``; inputs and targets stacked ``[n, ...]``; losses ``[n]``."""
        rt = self.rt
        rt.module.train()
        select = self._select(slots)
        params = self._take(rt.params, select)
        buffers = self._take(rt.buffers, select)

        def make() -> Callable[..., Any]:
            return vmap(grad_and_value(self._loss_of), randomness="different")

        detached = {n: p.detach() for n, p in params.items()}
        signature = (len(slots), _shapes(inputs), _shapes(targets))
        grads, losses = self._run("train", make, signature, detached, buffers, inputs, targets)
        state = self._take(rt.state, select)
        hparams = self._take(rt.hparams, select)
        optimizer_step(rt.spec.optimizer, params, grads, state, hparams)
        if not isinstance(select, slice):  # a gather copied them: write the stepped weights and state back
            with torch.no_grad():
                for table, taken in ((rt.params, params), (rt.state, state)):
                    for n, t in taken.items():
                        table[n].index_copy_(0, select, t)
        return losses.detach()


def _shapes(value: Any) -> Any:
    """Shapes and dtypes of a tensor or dict of tensors: what a compiled call specializes on."""
    if isinstance(value, dict):
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(value.items()))
    return (tuple(value.shape), value.dtype)
