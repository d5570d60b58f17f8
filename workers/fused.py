"""Fused execution: many models of one group as one ``torch.func.vmap`` call over the bank.

The bank already holds every parameter as ``[K, *shape]``, so a window of models is a
view (contiguous slots) or a gather (scattered slots), and ``vmap`` over dim 0 runs
them all in one batched call: one kernel over K weight sets instead of K small ones.
Training computes every model's gradient with ``vmap(grad_and_value(...))`` and takes
one optimizer step over the window, each model with its own hyperparameters.
"""

from __future__ import annotations

import logging
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

    def _index(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as an index tensor on the device, copied without a host sync: a pageable
        host-to-device copy (``torch.tensor(..., device=cuda)``) waits for the stream to drain."""
        index = torch.tensor(slots, dtype=torch.int64)
        if self.rt.device.type == "cuda":
            return index.pin_memory().to(self.rt.device, non_blocking=True)
        return index

    def _take(self, table: dict[str, torch.Tensor], slots: list[int], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        window = _window(slots)
        if window is not None:
            return {n: t[window] for n, t in table.items()}
        index = self._index(slots) if index is None else index
        return {n: t.index_select(0, index) for n, t in table.items()}

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any) -> Any:
        tensors = {**params, **buffers}
        if isinstance(x, dict):
            return functional_call(self.rt.module, tensors, (), x, strict=False)
        return functional_call(self.rt.module, tensors, (x,), strict=False)

    def forward(self, slots: list[int], inputs: Any, shared: bool) -> Any:
        """Outputs ``[n, ...]`` of models ``slots``; ``shared``: one input for all, else stacked ``[n, ...]``."""
        self.rt.module.eval()
        index = None if _window(slots) is not None else self._index(slots)
        params = self._take(self.rt.params, slots, index)
        buffers = self._take(self.rt.buffers, slots, index)
        in_dims = (0, 0, None if shared else 0)
        with torch.no_grad():
            return vmap(self._call, in_dims=in_dims, randomness="different")(params, buffers, inputs)

    def train(self, slots: list[int], inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every model in ``slots``; inputs and targets stacked ``[n, ...]``; losses ``[n]``."""
        rt = self.rt
        rt.module.train()
        window = _window(slots)
        index = None if window is not None else self._index(slots)
        params = self._take(rt.params, slots, index)
        buffers = self._take(rt.buffers, slots, index)
        loss_fn = rt.loss_fn

        def loss_of(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: Any, t: torch.Tensor) -> torch.Tensor:
            return loss_fn(self._call(p, b, x), t)

        detached = {n: p.detach() for n, p in params.items()}
        grads, losses = vmap(grad_and_value(loss_of), randomness="different")(detached, buffers, inputs, targets)
        state = self._take(rt.state, slots, index)
        hparams = {k: v[window] if index is None else v.index_select(0, index) for k, v in rt.hparams.items()}
        optimizer_step(rt.spec.optimizer, params, grads, state, hparams)
        if index is not None:  # a gather copied them: write the stepped weights and state back
            with torch.no_grad():
                for table, taken in ((rt.params, params), (rt.state, state)):
                    for n, t in taken.items():
                        table[n].index_copy_(0, index, t)
        return losses.detach()
