"""The public calls of ``Client`` and ``AsyncClient``, each written once.

``BaseClient`` (httpx's pattern) holds what both flavours share: the address and
settings, the sans-I/O ``ClientCore``, and every public call, declared as the ``Call``
it makes. A flavour supplies only how a call is carried out:

- ``_call(call, timeout)``: the call's result (``Client``) or a coroutine of it
  (``AsyncClient``);
- ``_submit(call, timeout)``: a ``concurrent.futures.Future`` (``Client``), or as
  ``_call`` (``AsyncClient``).

A new call is one method here, marked ``@public_call``; ``@coroutine_calls`` turns
every marked method into a coroutine function of ``AsyncClient``.
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from core.errors import BadInput
from core.messages import (
    BarrierRequest,
    CopyWeights,
    GetHparams,
    GetWeights,
    ListModels,
    ModelInfo,
    ResetModel,
    SetHparams,
    SetWeights,
    SnapshotRequest,
    StatsRequest,
)
from core.tensors import DEFAULT_MAX_MESSAGE_BYTES, encode_tensors
from scheduler.client_core import (
    DEFAULT_TIMEOUT_S,
    Call,
    ClientCore,
    as_detail,
    as_models,
    as_none,
    as_stats,
    as_weights,
    job,
)
from scheduler.config import ADDRESS_ENV, DEFAULT_ADDRESS, is_private_address
from scheduler.security import CurveClient

F = TypeVar("F", bound=Callable[..., Any])
PUBLIC_CALLS: list[str] = []  # names of the methods marked @public_call, in order


def public_call(method: F) -> F:
    """Mark a ``BaseClient`` method as a public call that both flavours carry out."""
    PUBLIC_CALLS.append(method.__name__)
    return method


def default_address() -> str:
    """``$COHORT_ADDRESS`` if set, else the coordinator's default loopback address."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def check_address(address: str) -> str:
    """Refuse an address ZeroMQ cannot connect to, before any socket exists."""
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise BadInput(f"address {address!r} must look like tcp://host:port or ipc:///path/to/socket")
    return address


class BaseClient(abc.ABC):
    """Settings and public calls of both flavours; no I/O."""

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, curve: CurveClient | None = None,
                 shm: bool | None = None, cuda_ipc: bool = False) -> None:
        """``shm``: large tensors through shared memory with a coordinator on this machine (default: when
        the address is local). ``cuda_ipc``: a one-model job (``infer``, ``train_step``) whose tensors
        are all on the workers' GPU, 1 MiB or more, is mapped there in place by CUDA IPC instead of
        copied through host memory (off by default; see the README for what it asks of you)."""
        self.address = check_address(address or default_address())
        self.timeout = timeout
        self.curve = curve or CurveClient.from_env()
        # Large tensors through shared memory, when the coordinator is on this machine (None: decide by address).
        local = is_private_address(self.address)
        self._core = ClientCore(max_message_bytes, shm=local if shm is None else bool(shm) and local,
                                cuda_ipc=bool(cuda_ipc))

    @property
    def max_message_bytes(self) -> int:
        return self._core.max_message_bytes

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    @abc.abstractmethod
    def _call(self, call: Call, timeout: float | None) -> Any:
        """Carry out ``call`` and return its result (a flavour's own I/O)."""

    @abc.abstractmethod
    def _submit(self, call: Call, timeout: float | None) -> Any:
        """Start ``call`` and return what waits for its result (a future, or an awaitable)."""

    # ------------------------------------------------------------------ public API

    def shared(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An empty tensor in this client's shared memory, for large inputs you fill in place: a call
        that passes it (or a contiguous part of it) sends only where it lies, and the worker computes
        on it there, without a copy. Do not write into it while a call that passes it is still out.
        Its memory is reused once it is freed and no call that passes it is out. An ordinary tensor
        when the coordinator is on another machine (or ``shm=False``, or the arena is full). Inputs
        under 256 KB in all go through the socket anyway: a copy is cheaper at that size."""
        dims = tuple(int(n) for n in shape)
        if any(n < 0 for n in dims):
            raise BadInput(f"shared: a shape of sizes >= 0, not {list(dims)}")
        return self._core.shared(dims, dtype)

    @public_call
    def submit(self, op: str, target: str, inputs: Any, targets: Any = None, *, timeout: float | None = None) -> Future[Any]:
        """Queue a job (``infer``, ``train_step``, ``ensemble``, ``train_round``, ``evaluate``); a Future of its result."""
        return self._submit(job(op, target, inputs, targets), timeout)

    @public_call
    def infer(self, model: str, inputs: Any, *, timeout: float | None = None) -> Any:
        """Run model ``"group/index"`` on ``inputs``; its output, on the CPU."""
        return self._call(job("infer", model, inputs), timeout)

    @public_call
    def train_step(self, model: str, inputs: Any, targets: torch.Tensor, *, timeout: float | None = None) -> float:
        """One optimizer step of one model; returns the loss."""
        return self._call(job("train_step", model, inputs, targets), timeout)

    @public_call
    def ensemble(self, group: str, inputs: Any, *, timeout: float | None = None) -> Any:
        """The same inputs through every model of ``group``: outputs stacked ``[K, ...]``."""
        return self._call(job("ensemble", group, inputs), timeout)

    @public_call
    def train_round(self, group: str, inputs: Any, targets: torch.Tensor, *, timeout: float | None = None) -> list[float]:
        """One step for every model of ``group``; K losses. Inputs and targets are one batch shaped as
        one model's (every model trains on it; sent once), or stacked ``[K, B, ...]`` (a batch each)."""
        return self._call(job("train_round", group, inputs, targets), timeout)

    @public_call
    def evaluate(self, target: str, inputs: Any, targets: torch.Tensor, *,
                 timeout: float | None = None) -> float | list[float]:
        """The loss without a step (eval mode): one float for a model id, K floats for a group
        (inputs and targets shared or stacked ``[K, B, ...]``, as for ``train_round``)."""
        return self._call(job("evaluate", target, inputs, targets), timeout)

    @public_call
    def set_hparams(self, target: str, *, timeout: float | None = None, **values: float | list[float]) -> None:
        """New hyperparameters (``lr``, ``momentum``, ``weight_decay``, ``clip_grad_norm``, ...) from the
        next step on, ordered with the models' other jobs. For a group, each value is one for every
        model or a list of K. ``lr`` is the base that the group's schedule scales."""
        lists = {name: [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
                 for name, value in values.items()}
        return self._call(Call("set_hparams", SetHparams(0, target, lists), as_none), timeout)

    @public_call
    def get_hparams(self, model: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The model's current hyperparameters and its step count: ``{"lr": ..., ..., "step": 120}``."""
        return self._call(Call("get_hparams", GetHparams(0, model), as_detail), timeout)

    @public_call
    def reset(self, model: str, seed: int | None = None, *, timeout: float | None = None) -> None:
        """A new trial in the model's slot: weights as ``torch.manual_seed(seed); factory()`` makes them
        (default: the group's own rule), optimizer state and step count cleared, version bumped."""
        return self._call(Call("reset", ResetModel(0, model, seed), as_none), timeout)

    @public_call
    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model: id, group, index, worker, version, device."""
        return self._call(Call("models", ListModels(0), as_models), timeout)

    @public_call
    def barrier(self, scope: str | list[str] | None = None, *, timeout: float | None = None) -> None:
        """Return once every job accepted before it (within ``scope``: a group, model ids, or all) has finished."""
        items = [scope] if isinstance(scope, str) else scope
        return self._call(Call("barrier", BarrierRequest(0, items), as_none), timeout)

    @public_call
    def get_weights(self, model: str, *, optimizer_state: bool = False,
                    timeout: float | None = None) -> dict[str, torch.Tensor]:
        """A consistent copy of one model's parameters and buffers (after every job on it accepted
        before), with its optimizer's entries (``optim.<kind>.<param>``) too if ``optimizer_state``."""
        return self._call(Call("get_weights", GetWeights(0, model, optimizer_state=optimizer_state), as_weights),
                          timeout)

    @public_call
    def set_weights(self, model: str, weights: dict[str, torch.Tensor], *, optimizer_state: bool = False,
                    timeout: float | None = None) -> None:
        """Replace one model's parameters and buffers and reset its optimizer state; with
        ``optimizer_state``, ``weights`` holds every entry ``get_weights(optimizer_state=True)`` gives,
        and the optimizer state is set from it instead."""
        tree, buffers = encode_tensors(dict(weights))
        request = SetWeights(0, model, tree, optimizer_state=optimizer_state)
        return self._call(Call("set_weights", request, as_none, buffers), timeout)

    @public_call
    def copy_weights(self, src: str, dst: str, *, timeout: float | None = None) -> None:
        """Copy ``src``'s weights and optimizer state onto ``dst`` (same group), on the device."""
        return self._call(Call("copy_weights", CopyWeights(0, src, dst), as_none), timeout)

    @public_call
    def snapshot(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> dict[str, Any]:
        """Write every model to ``path/<group>/<index>.safetensors`` at a barrier; path as seen from here."""
        full = os.path.abspath(os.fspath(path))
        return self._call(Call("snapshot", SnapshotRequest(0, full), as_detail), timeout)

    @public_call
    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Workers, queues, jobs/s, latency percentiles, MPS state."""
        return self._call(Call("stats", StatsRequest(0), as_stats), timeout)


C = TypeVar("C", bound=type[BaseClient])


def coroutine_calls(cls: C) -> C:
    """Make every public call of ``cls`` (whose ``_call`` is a coroutine function) a coroutine function.

    A call method's body already returns a coroutine then; wrapped in ``async def`` it
    also builds its request only when awaited (bad inputs raise there, as from any
    coroutine), and ``inspect.iscoroutinefunction`` says what it is."""
    for name in PUBLIC_CALLS:
        setattr(cls, name, _coroutine(getattr(BaseClient, name)))
    return cls


def _coroutine(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await method(self, *args, **kwargs)

    return call
