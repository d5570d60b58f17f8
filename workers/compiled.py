"""Fused calls through the compiler, in steady shapes, compiled once per machine.

A compiled call is specialised to its shapes: vmap bakes in the number of models, and
every new batch size would compile again (seconds to minutes). So a call is brought to a
few steady shapes first, and its result cut back:

- models: a call on all the worker's models of the group passes the bank itself; any other
  selection becomes a gather of exactly that many models (the bank's count), the real ones
  first, padded by repeating the last; the extra results are dropped, and a training step
  only ever applies the real models' gradients;
- batch: rows are padded with zeros up to the group's next bucket (``batching.buckets``,
  powers of two by default) where that is exact: inference whose outputs lead with the
  batch, and training or evaluation with class-index targets (padded with -100, which the
  cross-entropy ignores) and no layer that mixes rows (batch norm). Anything else compiles
  at its own size.

Each shape is looked up in the machine's compile cache (``workers.compile_cache``): loaded
when any worker compiled it before, else compiled here under a lock and saved. If the
ahead-of-time path fails, plain ``torch.compile`` (one code object per shape, so dynamo's
recompile limit never turns compilation off quietly), and if that fails, eager.

Steady state forbids recompiling: a loaded artifact checks its guards and refuses a call that
fails them, and a plain ``torch.compile`` call runs under the ``fail_on_recompile`` stance
after its first call. A refused call (an input whose strides the compiled code did not
expect, say) runs eagerly instead, is counted (``recompiles``, in ``stats()``) and logged with
the guard's reason, once per shape; compilation stays on for every other call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workers.compile_cache import CompileCache, aot_compile, closure_data

log = logging.getLogger("cohort.worker")

GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
MANY_SHAPES = 16
IGNORE_INDEX = -100  # what torch's cross_entropy skips: the targets of padded rows


@dataclass(frozen=True)
class Padding:
    """Where padding a batch to its bucket changes no real result."""

    buckets: list[int] | None  # None: powers of two; []: never pad
    infer: bool  # the model's outputs lead with the batch dim
    train: bool  # class-index cross-entropy and no batch-coupled layer

    def bucket(self, batch: int) -> int:
        if self.buckets is None:
            return 1 << max(0, (batch - 1).bit_length())
        return next((b for b in sorted(self.buckets) if b >= batch), batch)


def own_code(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn`` behind a wrapper whose code object is its own, so dynamo counts its compiles apart."""

    def call(*args: Any) -> Any:
        return fn(*args)

    name = "cohort_" + "".join(c if c.isalnum() else "_" for c in label)
    call.__code__ = call.__code__.replace(co_name=name, co_qualname=name)
    return call


class CompiledCalls:
    """One group's compiled fused calls on this worker."""

    def __init__(self, name: str, mode: str, device: torch.device, count: int, base: dict[str, Any],
                 padding: Padding, owner: Any, static: list[torch.Tensor], cache: CompileCache | None) -> None:
        self.name = name
        self.mode = mode
        self.device = device
        self.count = count  # models of the group in this worker's bank: what every call is brought to
        self.base = hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.padding = padding
        self.owner = owner  # what the eager functions close over (an artifact takes it from the loader)
        self.static = static  # the bank tensors: fixed addresses a CUDA graph may read in place
        self.cache = cache
        self.on_compile: Callable[[], None] = lambda: None
        self.fns: dict[str, Callable[..., Any]] = {}
        self.shapes: list[str] = []  # what was compiled or loaded, and how, for stats()
        self.loaded = 0
        self.compiled_here = 0
        self.compile_s = 0.0
        self.aot = cache is not None
        self.recompiles = 0  # calls that would have recompiled in steady state, run eagerly instead
        self._replayed: dict[str, torch.cuda.Event] = {}
        self._marked = False
        self._plain: set[str] = set()  # shapes made by plain torch.compile (not loaded or AOT-compiled)
        self._steady: set[str] = set()  # those past their first call: recompiles forbidden
        self._refused: set[str] = set()  # shapes whose refused recompile was logged

    @property
    def graphs(self) -> bool:
        return self.device.type == "cuda" and self.mode in GRAPH_MODES

    # ------------------------------------------------------------------ a call

    def call(self, kind: tuple[str, bool], eager: Callable[..., Any], slots: list[int], params: dict[str, torch.Tensor],
             buffers: dict[str, torch.Tensor], data: tuple[Any, ...]) -> Any:
        """``eager(params, buffers, select, *data)``'s result for ``slots``, through a compiled call."""
        n = len(slots)
        select = None if slots == list(range(self.count)) else self._index(slots)
        data, batch = self._pad(kind, data, n, select is not None)
        args = (params, buffers, select, *data)
        signature = _signature(kind, select is not None, data)
        fn = self.fns.get(signature)
        if fn is None:
            fn = self._make(kind, signature, eager, args)
        try:
            result = self._run(signature, fn, args)
        except RuntimeError as exc:
            if not is_recompile(exc):
                raise
            result = self._refuse(signature, exc, eager, args)
        return _cut(kind[0], result, n, batch if _leaf(data[0]).shape[0 if kind[1] else 1] != batch else None)

    def _run(self, signature: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if signature in self._steady:  # plain torch.compile past its first call (an artifact checks its own guards)
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._replay(signature, fn, args) if self.graphs else fn(*args)
        result = self._replay(signature, fn, args) if self.graphs else fn(*args)
        if signature in self._plain:
            self._steady.add(signature)
        return result

    def _refuse(self, signature: str, exc: RuntimeError, eager: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """A call the compiled code for its shape cannot take: eager this once, counted, said once."""
        self.recompiles += 1
        if signature not in self._refused:
            self._refused.add(signature)
            log.warning("group %s: a %s call would recompile (%s); recompiles are off in steady state, so such calls "
                        "run eagerly (counted in stats() as recompiles)", self.name, signature,
                        " ".join(str(exc).split())[:300])
        return eager(*args)

    def warm(self, kind: tuple[str, bool], eager: Callable[..., Any], slots: list[int], params: dict[str, torch.Tensor],
             buffers: dict[str, torch.Tensor], data: tuple[Any, ...]) -> None:
        """Make the compiled call for this call's shape now (compile or load), without running it."""
        select = None if slots == list(range(self.count)) else self._index(slots)
        data, _ = self._pad(kind, data, len(slots), select is not None)
        signature = _signature(kind, select is not None, data)
        if signature not in self.fns:
            self._make(kind, signature, eager, (params, buffers, select, *data))

    def _index(self, slots: list[int]) -> torch.Tensor:
        """The selection as a gather of ``count`` models, the real ones first (copied without a host sync)."""
        index = torch.tensor(slots + [slots[-1]] * (self.count - len(slots)), dtype=torch.int64)
        return index.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else index

    def _pad(self, kind: tuple[str, bool], data: tuple[Any, ...], n: int, gathered: bool) -> tuple[tuple[Any, ...], int]:
        """Stacked data padded to ``count`` models; the batch padded to its bucket where that is exact."""
        name, shared = kind
        batch_dim = 0 if shared else 1
        x = data[0]
        batch = _leaf(x).shape[batch_dim]
        want = self.padding.bucket(batch)
        if name == "forward" and not self.padding.infer:
            want = batch
        if name in ("train", "evaluate") and (not self.padding.train or data[1].is_floating_point()):
            want = batch
        padded = []
        for i, value in enumerate(data):
            fill = IGNORE_INDEX if i == 1 else 0
            value = _map(value, lambda t, fill=fill: _grow(t, batch_dim, want, fill))
            if not shared and gathered:
                value = _map(value, lambda t: _grow(t, 0, self.count, 0))
            padded.append(value)
        return tuple(padded), batch

    # ------------------------------------------------------------------ making a compiled call

    def _make(self, kind: tuple[str, bool], signature: str, eager: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        self.on_compile()  # before anything slow: importing the compiler alone takes seconds
        if len(self.fns) == MANY_SHAPES:
            log.warning("group %s: %d call shapes compiled; set batching.buckets to keep batch sizes steady",
                        self.name, MANY_SHAPES)
        self._mark_static()
        began = time.perf_counter()
        fn, how = None, "compiled"
        if self.aot and self.cache is not None:
            try:
                fn, loaded = self._from_cache(kind, signature, eager, args)
                how = "loaded" if loaded else "compiled"
            except Exception as exc:  # the AOT path is young: plain torch.compile still works
                self.aot = False
                log.warning("group %s: ahead-of-time compile unavailable (%s: %s); compiling in this worker only",
                            self.name, type(exc).__name__, exc)
        if fn is None:
            import torch._dynamo

            torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error we see, not a quiet eager run
            fn = torch.compile(own_code(eager, f"{self.name}_{signature}"), mode=self.mode, dynamic=False)
            self._plain.add(signature)
        seconds = time.perf_counter() - began
        self.compile_s += seconds
        if how == "loaded":
            self.loaded += 1
        else:
            self.compiled_here += 1
        self.shapes.append(f"{signature}: {how} in {seconds:.2f} s")
        log.info("group %s: %s %s in %.2f s", self.name, how, signature, seconds)
        self.fns[signature] = fn
        return fn

    def _parts(self, kind: tuple[str, bool], signature: str) -> dict[str, Any]:
        return {"base": self.base, "kind": list(kind), "signature": signature, "mode": self.mode,
                "grad": torch.is_grad_enabled()}

    def _from_cache(self, kind: tuple[str, bool], signature: str, eager: Callable[..., Any],
                    args: tuple[Any, ...]) -> tuple[Any, bool]:
        assert self.cache is not None
        with self._graph_config():
            return self.cache.get(self._parts(kind, signature), lambda: aot_compile(eager, args, self.mode),
                                  closure_data(eager, self.owner), waiting=self.on_compile)

    def preload(self, eager_for: Callable[[tuple[str, bool]], Callable[..., Any]]) -> int:
        """Load every call of this group the cache holds, before the first job asks: a replacement
        worker or a restart then serves compiled calls at once. How many were loaded."""
        if self.cache is None:
            return 0
        found = 0
        for marker in self.cache.markers():
            parts = marker.get("parts", {})
            if parts.get("base") != self.base or parts.get("mode") != self.mode or parts.get("signature") in self.fns:
                continue
            kind = (str(parts["kind"][0]), bool(parts["kind"][1]))
            eager = eager_for(kind)
            with self._graph_config(), torch.set_grad_enabled(bool(parts.get("grad", False))):
                fn = self.cache.load(parts, closure_data(eager, self.owner))
            if fn is not None:
                self.fns[parts["signature"]] = fn
                self.loaded += 1
                self.shapes.append(f"{parts['signature']}: loaded at start")
                found += 1
        return found

    def _graph_config(self) -> Any:
        """A loaded artifact takes CUDA graphs from the loading process's config, not from its mode."""
        import contextlib

        if not self.graphs:
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch({"triton.cudagraphs": True})

    def _mark_static(self) -> None:
        """The bank never moves and is updated in place: a graph's replay reads it where it is
        instead of copying K models' weights into the graph's own input buffers."""
        if self.graphs and not self._marked:
            import torch._dynamo

            for tensor in self.static:
                torch._dynamo.mark_static_address(tensor)
            self._marked = True

    def _replay(self, signature: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """One replay of a captured graph, ordered after the previous replay of the same graph.

        Jobs of different models run on different streams, and two replays of one graph
        share its static buffers: the second must wait for the first. Its outputs live in
        the graph's buffers until the next replay, so they are cloned before it may start."""
        stream = torch.cuda.current_stream(self.device)
        previous = self._replayed.get(signature)
        if previous is not None:
            stream.wait_event(previous)
        result = _map(fn(*args), torch.clone)
        done = torch.cuda.Event()
        done.record(stream)
        self._replayed[signature] = done
        return result


def is_recompile(exc: BaseException) -> bool:
    """Whether ``exc`` is a compiled call refusing inputs its guards reject (a loaded artifact's
    guard check, or dynamo under the ``fail_on_recompile`` stance)."""
    text = str(exc)
    return "GuardManager check failed" in text or "Detected recompile" in text


def _signature(kind: tuple[str, bool], gathered: bool, data: tuple[Any, ...]) -> str:
    """A call's shape as a stable string: what a compiled call is specialised to."""
    def shapes(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{shapes(v)}" for k, v in sorted(value.items())) + "}"
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"

    name, shared = kind
    return f"{name}-{'shared' if shared else 'stacked'}-{'gather' if gathered else 'all'}-" + "-".join(
        shapes(v) for v in data)


def _leaf(value: Any) -> torch.Tensor:
    return next(iter(value.values())) if isinstance(value, dict) else value


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _grow(t: torch.Tensor, dim: int, size: int, fill: int) -> torch.Tensor:
    """``t`` padded along ``dim`` to ``size`` with ``fill``."""
    if t.dim() <= dim or t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, fill)], dim)


def _cut(name: str, result: Any, n: int, batch: int | None) -> Any:
    """The real models' part of a padded call's result, and the real rows' when the batch was padded."""
    if name == "forward":
        return _map(result, lambda t: t[:n] if batch is None else t[:n, :batch])
    if name == "train":
        grads, losses = result
        return {k: g[:n] for k, g in grads.items()}, losses[:n]
    return result[:n]
