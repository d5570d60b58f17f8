"""Fused execution: many models of one group as one ``torch.func.vmap`` call over the bank.

The bank already holds every parameter as ``[K, *shape]``, so a window of models is a
view (contiguous slots) or a gather (scattered slots), and ``vmap`` over dim 0 runs
them all in one batched call: one kernel over K weight sets instead of K small ones.
Training computes every model's gradient with ``vmap(grad_and_value(...))`` and takes
one optimizer step over the window, each model with its own hyperparameters.

With the group's ``batching.compile`` set, the vmap'd forward and the vmap'd gradient
computation go through ``torch.compile`` (``"reduce-overhead"`` captures CUDA graphs on
a GPU): a vmap'd call pays Python overhead that, for small models, is larger than its
kernels. The optimizer step stays eager: it updates the bank in place.

Every ``torch.compile(vmap(...))`` would trace the same code object inside torch, and
dynamo's recompile limit is counted per code object: past 8 call shapes in a whole
worker it would quietly run the rest eagerly. So each compiled call shape gets a
wrapper with a code object of its own, and hitting a limit anyway raises instead of
going quiet. A call that cannot compile runs eagerly, says why once in the log, and is
counted (``compiled_calls`` and ``eager_calls``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from workers.module import BankTables, GroupModule
from workers.outcome import AlreadyStepped, is_transient
from workers.training import Trainer

log = logging.getLogger("cohort.worker")

# A vmap'd call costs ~140 us of Python on top of its kernels, a plain call ~25 us (measured
# on a 2-core CPU, torch 2.13): below this many models, one call per model is faster.
FUSE_MIN_MODELS = 4
# Past this many call shapes of one kind, each new one is still compiled, with a warning:
# varying batch sizes compile again and again.
MANY_SHAPES = 16
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def _window(slots: list[int]) -> slice | None:
    """The slice covering ``slots`` when they are contiguous and ascending, else None."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None


def own_code(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn`` behind a wrapper whose code object is its own, so dynamo counts its compiles apart."""

    def call(*args: Any) -> Any:
        return fn(*args)

    name = "cohort_" + "".join(c if c.isalnum() else "_" for c in label)
    call.__code__ = call.__code__.replace(co_name=name, co_qualname=name)
    return call


class FusedGroup:
    """vmap'd forward and training step over any set of one group's models on this worker."""

    def __init__(self, name: str, module: GroupModule, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                 trainer: Trainer, tables: BankTables, device: torch.device, compile_mode: str = "") -> None:
        self.name = name
        self.module = module
        self.loss_fn = loss_fn
        self.trainer = trainer
        self.tables = tables
        self.device = device
        self.enabled = True
        self.compile_mode = compile_mode
        # Called before a call that may compile: the worker says it may be silent a while.
        self.on_compile: Callable[[], None] = lambda: None
        self.compiled_calls = 0
        self.eager_calls = 0
        self._eager: dict[Any, Callable[..., Any]] = {}
        self._compiled: dict[tuple[Any, Any], Callable[..., Any]] = {}
        self._shapes: dict[Any, int] = {}
        self._said: set[str] = set()
        self._replayed: dict[tuple[Any, Any], torch.cuda.Event] = {}
        self._static = False

    # ------------------------------------------------------------------ calls

    def forward(self, slots: list[int], inputs: Any, shared: bool) -> Any:
        """Outputs ``[n, ...]`` of models ``slots``; ``shared``: one input for all, else stacked ``[n, ...]``."""
        self.module.mode(False)
        select = self._select(slots)
        in_dims = (0, 0, None if shared else 0)

        def make() -> Callable[..., Any]:
            fused = vmap(self._call, in_dims=in_dims, randomness="different")

            def forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], select: Any, x: Any) -> Any:
                return fused(_take(params, select), _take(buffers, select), x)

            return forward

        signature = (_signature(select), _shapes(inputs))
        with torch.no_grad(), self.module.compute():
            return self._run(("forward", shared), make, signature, self.tables.params, self.tables.buffers, select,
                             inputs)

    def train(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """One optimizer step of every model in ``slots``, on one batch for all (``shared``) or on
        stacked ``[n, ...]`` inputs and targets; losses ``[n]``.

        Gradients are computed first, touching nothing; a failure after the optimizer
        step has begun raises ``AlreadyStepped``, so that nobody runs these models again."""
        self.module.mode(True)
        select = self._select(slots)
        data_dims = None if shared else 0

        def make() -> Callable[..., Any]:
            fused = vmap(grad_and_value(self._loss_of), in_dims=(0, 0, data_dims, data_dims), randomness="different")

            def gradients(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], select: Any, x: Any,
                          t: torch.Tensor) -> Any:
                taken = {n: p.detach() for n, p in _take(params, select).items()}
                return fused(taken, _take(buffers, select), x, t)

            return gradients

        signature = (_signature(select), _shapes(inputs), _shapes(targets))
        with self.module.compute():
            grads, losses = self._run(("train", shared), make, signature, self.tables.params, self.tables.buffers,
                                      select, inputs, targets)
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

    def evaluate(self, slots: list[int], inputs: Any, targets: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Every model's loss without a step, in eval mode: ``[n]`` float32."""
        self.module.mode(False)
        select = self._select(slots)
        data_dims = None if shared else 0

        def make() -> Callable[..., Any]:
            fused = vmap(self._loss_of, in_dims=(0, 0, data_dims, data_dims), randomness="different")

            def losses(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], select: Any, x: Any,
                       t: torch.Tensor) -> Any:
                return fused(_take(params, select), _take(buffers, select), x, t)

            return losses

        signature = (_signature(select), _shapes(inputs), _shapes(targets))
        with torch.no_grad(), self.module.compute():
            return self._run(("evaluate", shared), make, signature, self.tables.params, self.tables.buffers, select,
                             inputs, targets).float()

    # ------------------------------------------------------------------ plumbing

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any) -> Any:
        return self.module({**params, **buffers}, x)

    def _loss_of(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: Any,
                 target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self._call(params, buffers, x), target)

    def _run(self, kind: Any, make: Callable[[], Callable[..., Any]], signature: Any, *args: Any) -> Any:
        """Call the vmap'd function ``kind`` (made once by ``make``), compiled when the group asks."""
        eager = self._eager.get(kind)
        if eager is None:
            eager = self._eager[kind] = make()
        if not self.compile_mode:
            self.eager_calls += 1
            return eager(*args)
        compiled = self._compiled.get((kind, signature))
        if compiled is None:
            compiled = self._compile(kind, signature, eager)
        try:
            result = self._replay(kind, signature, compiled, args) if self._graphs else compiled(*args)
        except Exception as compile_error:
            if is_transient(compile_error):
                raise
            # The calls are pure functions of their arguments: run again eagerly. Bad data
            # raises here, and compiling stays on; otherwise the compiler is at fault.
            result = eager(*args)
            self._say(f"torch.compile(mode={self.compile_mode!r}) failed, running fused calls eagerly: "
                      f"{type(compile_error).__name__}: {compile_error}")
            self.compile_mode = ""
            self.eager_calls += 1
            return result
        self.compiled_calls += 1
        return result

    @property
    def _graphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs (static input and output buffers per graph)."""
        return self.device.type == "cuda" and self.compile_mode in GRAPH_MODES

    def _replay(self, kind: Any, signature: Any, compiled: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """One replay of a captured graph, ordered after the previous replay of the same graph.

        Jobs of different models run on different streams, and two replays of one graph
        share its static buffers: the second must wait for the first. Its outputs live in
        the graph's buffers until the next replay, so they are cloned before it may start."""
        stream = torch.cuda.current_stream(self.device)
        previous = self._replayed.get((kind, signature))
        if previous is not None:
            stream.wait_event(previous)
        result = _clone(compiled(*args))
        done = torch.cuda.Event()
        done.record(stream)
        self._replayed[(kind, signature)] = done
        return result

    def _compile(self, kind: Any, signature: Any, eager: Callable[..., Any]) -> Callable[..., Any]:
        seen = self._shapes[kind] = self._shapes.get(kind, 0) + 1
        if seen == MANY_SHAPES + 1:
            log.warning("group %s: more than %d call shapes of %s compiled; each new batch size compiles "
                        "again (keep batch sizes steady)", self.name, MANY_SHAPES, kind)
        self.on_compile()  # before anything slow: the first import of torch's compiler alone takes seconds
        import torch._dynamo

        torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error we see, not a quiet eager run
        if self._graphs and not self._static:
            # The bank never moves and is updated in place: a replay reads it where it is
            # instead of copying K models' weights into the graph's own input buffers.
            for table in (self.tables.params, self.tables.buffers):
                for tensor in table.values():
                    torch._dynamo.mark_static_address(tensor)
            self._static = True
        label = f"{self.name}_{kind}_{len(self._compiled)}"
        compiled = torch.compile(own_code(eager, label), mode=self.compile_mode, dynamic=False)
        self._compiled[(kind, signature)] = compiled
        return compiled

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


def _clone(value: Any) -> Any:
    """A copy of a call's outputs (tensors, or tuples and dicts of them) out of a graph's buffers."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _take(table: dict[str, torch.Tensor], select: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """Models ``select`` of every bank tensor: views of a contiguous window, else a gather (a copy)."""
    if isinstance(select, slice):
        return {n: t[select] for n, t in table.items()}
    return {n: t.index_select(0, select) for n, t in table.items()}


def _signature(select: slice | torch.Tensor) -> Any:
    """What a compiled call specializes on in the selection: the window's bounds, or how many gathered."""
    return (select.start, select.stop) if isinstance(select, slice) else ("gather", int(select.shape[0]))


def _shapes(value: Any) -> Any:
    """Shapes and dtypes of a tensor or dict of tensors: what a compiled call specializes on."""
    if isinstance(value, dict):
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(value.items()))
    return (tuple(value.shape), value.dtype)
