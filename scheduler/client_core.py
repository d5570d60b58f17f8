"""The client's side of the protocol, without I/O: requests become frames, frames become results.

Like h11's ``Connection``, nothing here owns a socket, sends, waits or starts a thread:
``Client`` (threads) and ``AsyncClient`` (asyncio) do their own I/O and hand this module
the frames they receive. Three pieces:

- ``Call``: one call as a public method declares it (the op, its request message, the
  tensor buffers that follow it, how its reply becomes what the API returns), and its
  state on the way (deadline, whether it went out, the flavour's future).
- ``ClientCore``: what all of a client's sockets share: request ids, the timeout stamped
  on each request, and the size check against the message bound.
- ``Connection``: the calls in flight on one socket. It encodes them (one alone, or
  several bundled, each with the time it has left), decodes replies (``Replies``
  bundles too), matches each reply to its call and turns it into a result or a
  ``CohortError``, and fails calls at their deadline or when their connection drops.
  Its results come out as ``Settled`` values, which the flavour hands to its waiters.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import torch

from core.arena import Arena, ArenaReader, shm_identity
from core.codec import client_codec, unbundle
from core.cuda_ipc import gpu_uuid, normal_uuid
from core.errors import BadInput, CohortError, JobTimeout, ProtocolError, error_from_wire
from core.messages import (
    JOB_OPS,
    Ack,
    ErrorReply,
    Hello,
    HelloReply,
    JobDone,
    ModelInfo,
    ModelsReply,
    Replies,
    Requests,
    SetWeights,
    StatsReply,
    SubmitJob,
    WeightsReply,
)
from core.tensors import (
    DEFAULT_MAX_MESSAGE_BYTES,
    decode_tensors,
    describe_tensors,
    tensor_bytes,
    tensor_nbytes,
    to_arena,
    to_cuda_refs,
)
from scheduler import __version__

DEFAULT_TIMEOUT_S = 60.0
# Messages up to this size are always answered by the coordinator (its socket limit is its
# bound plus 1 MiB); a larger one is checked against the coordinator's bound first.
ALWAYS_ANSWERED_BYTES = 1 << 20
# A request sent at the very end of its call's time still carries a positive timeout.
MIN_TIME_LEFT_S = 0.001
# Calls with at least this many tensor bytes go through shared memory when the coordinator is local:
# below it the sockets cost less than the extra bookkeeping.
SHM_MIN_BYTES = 256 * 1024
# With cuda_ipc on, a job whose tensors are all on the workers' GPU, with at least this many bytes, reaches
# them by CUDA IPC: below it, copies through host memory cost less than opening a handle.
CUDA_IPC_MIN_BYTES = 1 << 20
# Jobs that run on one model, hence on one worker: each reference is mapped by one reader, as torch counts.
CUDA_IPC_OPS = ("infer", "train_step")
ARENA_BYTES = 256 << 20  # address space: pages are allocated as regions are first written (an idle ring restarts at 0)

Returns = Callable[[Any, list[Any]], Any]


# --------------------------------------------------------------------------- replies -> results
# Each takes a reply that is not an ErrorReply, and its buffers.


def _expect(reply: Any, kind: type[msgspec.Struct]) -> Any:
    if not isinstance(reply, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(reply).__name__}")
    return reply


def as_outputs(reply: Any, buffers: list[Any]) -> Any:
    return decode_tensors(_expect(reply, JobDone).outputs, buffers)


def as_loss(reply: Any, buffers: list[Any]) -> float:
    losses = _expect(reply, JobDone).losses
    return float(losses[0]) if losses else float("nan")


def as_losses(reply: Any, buffers: list[Any]) -> list[float]:
    return list(_expect(reply, JobDone).losses or [])


def as_weights(reply: Any, buffers: list[Any]) -> dict[str, Any]:
    return decode_tensors(_expect(reply, WeightsReply).weights, buffers)


def as_models(reply: Any, buffers: list[Any]) -> list[ModelInfo]:
    return list(_expect(reply, ModelsReply).models)


def as_stats(reply: Any, buffers: list[Any]) -> dict[str, Any]:
    return _expect(reply, StatsReply).stats


def as_detail(reply: Any, buffers: list[Any]) -> dict[str, Any]:
    return _expect(reply, Ack).detail


def as_none(reply: Any, buffers: list[Any]) -> None:
    _expect(reply, Ack)


def as_greeting(reply: Any, buffers: list[Any]) -> HelloReply:
    return _expect(reply, HelloReply)


JOB_RESULTS: dict[str, Returns] = {
    "infer": as_outputs,
    "ensemble": as_outputs,
    "train_step": as_loss,
    "train_round": as_losses,
    "evaluate": as_losses,  # of a group; of one model, as_loss (see ``job``)
}
TARGETED_OPS = ("train_step", "train_round", "evaluate")


def is_model_id(target: str) -> bool:
    """``"group/index"`` names one model; a group's name has no ``/``."""
    return "/" in target.rstrip("/")


# --------------------------------------------------------------------------- calls


class Call:
    """One call: its request, how its reply becomes the result, and where it stands.

    A public method makes the request message with ``req_id`` 0 and no ``timeout_s``;
    ``ClientCore.start`` stamps the call's own id, timeout and deadline.
    """

    __slots__ = ("_buffers", "deadline", "future", "gpu", "kept", "message", "op", "regions", "returns", "sent", "size")

    def __init__(self, op: str, message: msgspec.Struct, returns: Returns, buffers: list[Any] | None = None) -> None:
        self.op = op
        self.message: Any = message
        self.returns = returns
        self.buffers = buffers or []
        self.deadline = 0.0
        self.sent = False  # on a connection: lost with it if that connection drops
        self.future: Any = None  # the flavour's waiter, when it has one
        self.regions: list[int] = []  # its tensors' places in the client's arena, given back on the reply
        self.gpu: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # CUDA inputs, targets: not copied yet
        self.kept: list[torch.Tensor] = []  # tensors a worker maps by CUDA IPC, alive until the reply

    @property
    def req_id(self) -> int:
        return self.message.req_id

    @property
    def buffers(self) -> list[Any]:
        """The tensor bytes that travel with the request (``size``: their total)."""
        return self._buffers

    @buffers.setter
    def buffers(self, buffers: list[Any]) -> None:
        self._buffers = buffers
        self.size = sum(memoryview(b).nbytes for b in buffers)

    def __repr__(self) -> str:
        return f"Call({self.op!r}, req_id={self.req_id})"


def job(op: str, target: str, inputs: Any, targets: Any = None) -> Call:
    """The call of a job (one of ``JOB_OPS``) on a model or group; ``BadInput`` if it cannot be one."""
    if op not in JOB_OPS:
        raise BadInput(f"unknown op {op!r}; ops: {', '.join(JOB_OPS)}")
    if op in TARGETED_OPS and targets is None:
        raise BadInput(f"{op} needs targets")
    tree_in, in_tensors = describe_tensors(inputs)
    tree_t, t_tensors = describe_tensors(targets)
    returns = as_loss if op == "evaluate" and is_model_id(target) else JOB_RESULTS[op]
    message = SubmitJob(0, op, target, tree_in, tree_t)
    tensors = in_tensors + t_tensors
    if tensors and tensors[0].is_cuda and all(t.is_cuda for t in tensors):  # how they travel: see start
        call = Call(op, message, returns)
        call.gpu = (in_tensors, t_tensors)
        call.size = sum(tensor_nbytes(m) for m in (*tree_in.metas, *tree_t.metas))
        return call
    return Call(op, message, returns, [tensor_bytes(t) for t in tensors])


class Settled(NamedTuple):
    """A call's outcome: its result, or the error it raises."""

    call: Call
    value: Any = None
    error: CohortError | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def resolve(self) -> None:
        """Hand the outcome to the call's future (``concurrent`` or ``asyncio``), unless it is done."""
        future = self.call.future
        if future is None or future.done():
            return
        if self.error is None:
            future.set_result(self.value)
        else:
            future.set_exception(self.error)


class ClientCore:
    """What all of one client's sockets share: request ids and the message bound.

    Safe to share between threads: ``next`` on a counter is atomic, and the bound is
    written once with a value every writer agrees on.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, shm: bool = False,
                 cuda_ipc: bool = False) -> None:
        self.max_message_bytes = max_message_bytes
        self.server_bound: int | None = None  # the coordinator's, once a Hello has told it
        self.shm = shm  # large tensors through shared memory (a coordinator on this machine)
        self.shm_ok: bool | None = None  # whether the coordinator sees this client's shared memory (from the Hello)
        self.cuda_ipc = cuda_ipc  # CUDA tensors by CUDA IPC (opt-in), to workers on a GPU of this machine
        self.cuda_gpu = ""  # that GPU's UUID (normalised), from the Hello: "" while CUDA IPC is off
        self.identity = shm_identity() if shm else ""  # the shared memory and pids this client sees
        self._ids = itertools.count(1)
        self._arena: Arena | None = None
        self._arena_lock = threading.Lock()
        self._closed = False

    def start(self, call: Call, timeout: float, now: float | None = None) -> Call:
        """Give ``call`` its id, timeout and deadline; it is then ready to go on a connection.
        Its large tensors go into this client's arena when the coordinator is on this machine."""
        call.message.req_id = next(self._ids)
        if hasattr(call.message, "timeout_s"):
            call.message.timeout_s = timeout
        call.deadline = (time.monotonic() if now is None else now) + timeout
        if call.gpu is not None:
            self._from_gpu(call)
        if self.identity:
            if isinstance(call.message, SubmitJob):  # the coordinator says yes when it sees what we see
                call.message.shm_results = True
                call.message.client_pid = os.getpid()  # a worker holds a result region for it
                call.message.shm_identity = self.identity
            if self.shm_ok and call.size >= SHM_MIN_BYTES and call.buffers:
                self._place(call)
        return call

    def _from_gpu(self, call: Call) -> None:
        """A job whose tensors are all on a GPU: with ``cuda_ipc``, a one-model job of 1 MiB or more whose
        tensors are all on the workers' GPU is mapped in place by the worker (CUDA IPC); any other is
        copied to host memory here, as any tensor sent."""
        in_tensors, t_tensors = call.gpu or ([], [])
        call.gpu = None
        message = call.message
        if self.cuda_gpu and call.op in CUDA_IPC_OPS and call.size >= CUDA_IPC_MIN_BYTES \
                and self._on_workers_gpu(in_tensors + t_tensors):
            try:
                inputs, kept = to_cuda_refs(message.inputs, in_tensors)
                targets, kept_t = to_cuda_refs(message.targets, t_tensors) if t_tensors else (message.targets, [])
            except Exception:  # noqa: BLE001 - memory torch cannot export (an allocator without IPC): the host
                pass
            else:
                message.inputs, message.targets, call.kept = inputs, targets, kept + kept_t
                return
        call.buffers = [tensor_bytes(t) for t in in_tensors + t_tensors]

    def _on_workers_gpu(self, tensors: list[torch.Tensor]) -> bool:
        return all(t.numel() and gpu_uuid(t.device.index) == self.cuda_gpu for t in tensors)

    def _place(self, call: Call) -> None:
        """Move a call's tensors into the arena: only where they are crosses the sockets."""
        message = call.message
        trees = ["inputs", "targets"] if isinstance(message, SubmitJob) else ["weights"] if isinstance(
            message, SetWeights) else []
        if not trees:
            return
        with self._arena_lock:
            arena = self._own_arena()
            rest, at = [], 0
            for name in trees:
                tree = getattr(message, name)
                own = call.buffers[at:at + tree.frames]
                at += tree.frames
                placed, left, regions = to_arena(tree, own, arena, deadline=call.deadline)
                setattr(message, name, placed)
                rest += left
                call.regions += regions
            call.buffers = rest

    def _own_arena(self) -> Arena:
        """This client's arena, made on first use (hold ``_arena_lock``)."""
        if self._closed:  # a new arena now would outlive the client, with no worker to remove it
            raise ProtocolError("the client is closed")
        if self._arena is None:
            self._arena = Arena(f"cohort-{os.getpid()}-{uuid.uuid4().hex[:8]}-arena", ARENA_BYTES)
        return self._arena

    def shared(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor in this client's arena when the coordinator is on this machine and there is
        room, else an ordinary one (``BaseClient.shared``)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.shm and self.shm_ok is not False and nbytes:
            with self._arena_lock:
                raw = self._own_arena().lend(nbytes)
            if raw is not None:
                return raw.view(dtype).view(shape)
        return torch.empty(shape, dtype=dtype)

    def finish(self, call: Call) -> None:
        """A reply has come: the worker is done with the call's tensors in the arena or on the GPU."""
        call.kept = []
        if call.regions and self._arena is not None:
            with self._arena_lock:
                for offset in call.regions:
                    self._arena.give_back(offset)
            call.regions = []

    def close(self) -> None:
        with self._arena_lock:
            self._closed = True
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def batch_bound(self) -> int:
        """The most tensor bytes one message of several calls may carry: this client's bound, and the
        coordinator's once a hello has told it (each call was checked against them on its own; the
        sockets limit each frame, and a large tensor is a frame of its own)."""
        if self.server_bound is None:
            return self.max_message_bytes
        return min(self.max_message_bytes, self.server_bound)

    def needs_bound(self, call: Call) -> bool:
        """Whether the coordinator must be greeted first (``hello``): ``call`` is large enough that its
        bound must be known, or it would go through shared memory, which the coordinator must see too."""
        return self.server_bound is None and (call.size > ALWAYS_ANSWERED_BYTES or self.shm and call.size >= SHM_MIN_BYTES)

    @staticmethod
    def hello() -> Call:
        """The call that asks the coordinator for its bound and what shared memory it sees (``greeted``)."""
        return Call("hello", Hello(0, __version__), as_greeting)

    def greeted(self, reply: HelloReply) -> None:
        """What the coordinator said to ``hello``: its bound, and whether it shares this client's
        ``/dev/shm`` and pids (else large tensors go through the sockets)."""
        self.server_bound = reply.max_message_bytes
        self.shm_ok = self.shm and bool(self.identity) and reply.shm_identity == self.identity
        on_gpu = self.cuda_ipc and self.shm_ok and reply.device.startswith("cuda") and reply.gpu
        self.cuda_gpu = normal_uuid(reply.gpu) if on_gpu else ""

    def check_size(self, call: Call) -> None:
        """Refuse a message over the bound here, rather than have the coordinator's socket drop it."""
        size = call.size
        if size <= ALWAYS_ANSWERED_BYTES:
            return
        if self.server_bound is None:
            raise RuntimeError("check_size before the coordinator's bound is known; ask it with hello() first")
        bound = min(self.max_message_bytes, self.server_bound)
        if size > bound:
            raise BadInput(f"tensors of {size} bytes exceed the message bound of {bound} bytes")


class Connection:
    """The calls in flight on one socket: frames out, replies matched to calls in.

    One per socket, used by one thread at a time (its codec keeps buffers between uses).
    """

    def __init__(self, address: str, core: ClientCore | None = None) -> None:
        self.address = address
        self.core = core
        self._codec = client_codec()
        self._pending: dict[int, Call] = {}
        self._arenas = ArenaReader()  # workers' arenas, where large results may come

    def __contains__(self, call: Call) -> bool:
        return self._pending.get(call.req_id) is call

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, call: Call) -> None:
        """Wait for ``call``'s reply on this connection."""
        call.sent = False
        self._pending[call.req_id] = call

    def forget(self, call: Call) -> None:
        """Stop waiting for ``call``; a reply that still comes for it is ignored."""
        if call in self:
            del self._pending[call.req_id]

    def frames(self, calls: list[Call], now: float | None = None) -> list[Any]:
        """The frames that carry ``calls``: one message, bundled if several.

        Each request carries the time its call has left: one that waited for a
        connection must not run longer than its caller waits (the coordinator counts a
        job's deadline from receipt)."""
        now = time.monotonic() if now is None else now
        for call in calls:
            if getattr(call.message, "timeout_s", None) is not None:
                call.message.timeout_s = max(MIN_TIME_LEFT_S, call.deadline - now)
        if len(calls) == 1:
            return self._codec.encode(calls[0].message, calls[0].buffers)
        bundle = Requests(0, [c.message for c in calls])
        return self._codec.encode(bundle, [b for c in calls for b in c.buffers])

    def sent(self, calls: list[Call]) -> None:
        for call in calls:
            call.sent = True

    def receive(self, frames: list[Any]) -> list[Settled]:
        """Settle the calls whose replies ``frames`` (one message) carries.

        A message that cannot be read is dropped: it cannot be matched to a call either,
        and that call fails at its deadline. A reply to no pending call is a late answer to
        a call that timed out, and is dropped too."""
        try:
            reply, buffers = self._codec.decode(frames)
            replies = unbundle(reply.replies, buffers) if isinstance(reply, Replies) else [(reply, buffers)]
        except ProtocolError:
            return []
        settled = []
        for reply, reply_buffers in replies:
            call = self._pending.pop(reply.req_id, None)
            if call is None:  # a late answer: a worker holds its results for this process until released
                self._release(reply)
                continue
            if self.core is not None:
                self.core.finish(call)
            settled.append(self._settle(call, reply, reply_buffers))
        return settled

    def _release(self, reply: Any) -> None:
        """Give back the regions of a reply's results that nobody will read."""
        tree = getattr(reply, "outputs", None)
        for ref in tree.shm if tree is not None else ():
            try:
                self._arenas.release(ref)  # only if the region is still the one it names
            except (OSError, ValueError):
                pass  # the worker's arena is gone: nothing is held

    def _settle(self, call: Call, reply: Any, buffers: list[Any]) -> Settled:
        """A reply's outcome. Outputs that lie in a worker's arena come back as tensors over that
        memory, without a copy: the worker holds the region until the last of them is freed."""
        tree = getattr(reply, "outputs", None)
        if tree is None or not tree.shm:
            return _outcome(call, reply, buffers)
        try:
            if not all(self._arenas.current(ref) for ref in tree.shm):
                self._release(reply)
                return Settled(call, error=ProtocolError(
                    "the worker reused the result's shared memory before it was read (did it restart?)"))
            held = [self._arenas.hold(ref, tensor_nbytes(meta)) for ref, meta in zip(tree.shm, tree.metas)]
        except (OSError, ValueError) as exc:
            self._release(reply)  # the tensors held so far go back when freed, the others now
            return Settled(call, error=ProtocolError(f"the result in shared memory cannot be read: {exc}"))
        return _outcome(call, msgspec.structs.replace(reply, outputs=msgspec.structs.replace(tree, shm=())), held)

    def fail(self, call: Call, error: CohortError) -> Settled:
        self.forget(call)
        return Settled(call, error=error)

    def dropped(self) -> list[Settled]:
        """The connection dropped: fail every call that went out on it (not those still to go)."""
        lost = [call for call in self._pending.values() if call.sent]
        return [self.fail(call, self.lost(call)) for call in lost]

    def expire(self, call: Call) -> Settled:
        """``call`` passed its deadline."""
        what = "no answer from" if call.sent else "could not reach the coordinator at"
        return self.fail(call, JobTimeout(f"{call.op}: {what} {self.address} within the timeout"))

    def close(self) -> list[Settled]:
        """Fail every call still waiting: the client is closing."""
        self._arenas.close()
        calls = list(self._pending.values())
        return [self.fail(call, ProtocolError("the client was closed before the answer came")) for call in calls]

    # The errors a flavour raises itself, worded the same in both.

    def lost(self, call: Call) -> ProtocolError:
        return ProtocolError(f"{call.op}: the connection to the coordinator at {self.address} dropped while the call "
                             "was in flight (did it stop or restart?); the job may or may not have run")

    def not_reached(self, call: Call, timeout: float) -> JobTimeout:
        return JobTimeout(f"{call.op}: could not reach the coordinator at {self.address} within {timeout} s; "
                          "is it running?")

    def no_answer(self, call: Call, timeout: float) -> JobTimeout:
        return JobTimeout(f"{call.op}: no answer from {self.address} within {timeout} s")


def _outcome(call: Call, reply: Any, buffers: list[Any]) -> Settled:
    """A reply as what the API returns, or the error it raises."""
    try:
        if isinstance(reply, ErrorReply):
            raise error_from_wire(reply.error, reply.message, reply.traceback)
        return Settled(call, call.returns(reply, buffers))
    except CohortError as exc:
        return Settled(call, error=exc)
    except Exception as exc:  # an unreadable reply fails its call, never the reader
        return Settled(call, error=ProtocolError(f"bad reply: {type(exc).__name__}: {exc}"))
