"""The client library: ``Client`` (threads and futures) and ``AsyncClient`` (asyncio).

A ``Client`` serves two kinds of call. ``submit`` returns a ``concurrent.futures.Future``:
the request goes through a queue and a wake-up pipe to a background I/O thread that
owns one ZeroMQ DEALER socket and resolves futures as replies arrive. Blocking calls
(``infer``, ``models``, ...) take a shorter road when they can: each calling thread has
its own socket and waits on it itself, which saves two thread hand-offs per call. A
thread whose submitted futures are not all answered yet takes the queue instead, so a
thread's requests always reach the coordinator in the order it made them.
Every call takes ``timeout=``; none can hang forever.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgspec
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from core.codec import client_codec, unbundle
from core.errors import BadInput, CohortError, JobTimeout, ProtocolError, error_from_wire
from core.messages import (
    Ack,
    BarrierRequest,
    CopyWeights,
    ErrorReply,
    GetWeights,
    Hello,
    HelloReply,
    JobDone,
    ListModels,
    ModelInfo,
    ModelsReply,
    Replies,
    Requests,
    SetWeights,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
    SubmitJob,
    WeightsReply,
)
from core.tensors import DEFAULT_MAX_MESSAGE_BYTES, decode_tensors, encode_tensors
from scheduler import __version__
from scheduler.config import ADDRESS_ENV, DEFAULT_ADDRESS
from scheduler.link import DROPPED, Link, close_monitored, dealer, try_send
from scheduler.security import CurveClient

DEFAULT_TIMEOUT_S = 60.0
MAX_BUNDLE = 256  # requests the I/O thread sends as one message at most
# Messages up to this size are always answered by the coordinator (its socket limit is its
# bound plus 1 MiB); a larger one is checked against the coordinator's bound first.
ALWAYS_ANSWERED_BYTES = 1 << 20
JOB_OPS = ("infer", "train_step", "ensemble", "train_round")


def default_address() -> str:
    """``$COHORT_ADDRESS`` if set, else the coordinator's default loopback address."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def _job_request(req_id: int, op: str, target: str, inputs: Any, targets: Any,
                 timeout: float | None) -> tuple[SubmitJob, list[Any]]:
    if op not in JOB_OPS:
        raise BadInput(f"unknown op {op!r}; ops: {', '.join(JOB_OPS)}")
    if op in ("train_step", "train_round") and targets is None:
        raise BadInput(f"{op} needs targets")
    tree_in, buf_in = encode_tensors(inputs)
    tree_t, buf_t = encode_tensors(targets)
    return SubmitJob(req_id, op, target, tree_in, tree_t, timeout), [*buf_in, *buf_t]


def _check_size(buffers: list[Any], bound: int) -> None:
    size = sum(memoryview(b).nbytes for b in buffers)
    if size > bound:
        raise BadInput(f"tensors of {size} bytes exceed the message bound of {bound} bytes")


def _result(op: str, reply: Any, buffers: list[Any]) -> Any:
    """Turn a reply into what the API returns, or raise its error."""
    if isinstance(reply, ErrorReply):
        raise error_from_wire(reply.error, reply.message, reply.traceback)
    if isinstance(reply, JobDone):
        if op == "train_step":
            return float(reply.losses[0]) if reply.losses else float("nan")
        if op == "train_round":
            return list(reply.losses or [])
        return decode_tensors(reply.outputs, buffers)
    if isinstance(reply, ModelsReply):
        return list(reply.models)
    if isinstance(reply, WeightsReply):
        return decode_tensors(reply.weights, buffers)
    if isinstance(reply, StatsReply):
        return reply.stats
    if isinstance(reply, Ack):
        return reply.detail
    if isinstance(reply, HelloReply):
        return reply
    raise ProtocolError(f"unexpected reply {type(reply).__name__}")


def _time_left(message: msgspec.Struct, deadline: float) -> msgspec.Struct:
    """``message`` with the time its call has left: a request that waited for a connection must
    not run longer than its caller waits (the coordinator counts a job's deadline from receipt)."""
    if getattr(message, "timeout_s", None) is not None:
        message.timeout_s = max(0.001, deadline - time.monotonic())  # type: ignore[attr-defined]
    return message


def _replies(reply: Any, buffers: list[Any]) -> list[tuple[Any, list[Any]]]:
    """A message's replies with their buffers: one, or each of a ``Replies`` bundle."""
    if isinstance(reply, Replies):
        return unbundle(reply.replies, buffers)
    return [(reply, buffers)]


class _DirectSocket:
    """A calling thread's own link; dropped with the thread's locals when the thread ends."""

    __slots__ = ("__weakref__", "codec", "link", "poller")

    def __init__(self, link: Link, codec: Any) -> None:
        self.link = link
        self.codec = codec
        self.poller = zmq.Poller()
        self.poller.register(link.socket, zmq.POLLIN)
        self.poller.register(link.monitor, zmq.POLLIN)


def check_address(address: str) -> str:
    """Refuse an address ZeroMQ cannot connect to, before any socket exists."""
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise BadInput(f"address {address!r} must look like tcp://host:port or ipc:///path/to/socket")
    return address


class _Pending:
    __slots__ = ("deadline", "future", "op", "sent")

    def __init__(self, future: Future[Any], op: str, deadline: float) -> None:
        self.future = future
        self.op = op
        self.deadline = deadline
        self.sent = False  # on a connection: lost with it if that connection drops


class Client:
    """Submit jobs to a cohort coordinator from any number of threads.

    >>> with Client("tcp://127.0.0.1:5555") as c:
    ...     y = c.infer("mlp/3", x)
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, curve: CurveClient | None = None) -> None:
        self.address = check_address(address or default_address())
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.curve = curve or CurveClient.from_env()
        self._codec = client_codec()
        self._ids = itertools.count(1)
        self._outbox: queue.SimpleQueue[tuple[int, msgspec.Struct, list[Any], _Pending] | None] = queue.SimpleQueue()
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, req_id) of pending calls
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending: dict[int, _Pending] = {}
        self._woken = False  # a wake-up byte is in the pipe and the I/O thread has not taken the queue since
        self._closed = False
        self._server_bound: int | None = None
        self._context = zmq.Context()
        self._local = threading.local()
        self._direct_sockets: weakref.WeakSet[_DirectSocket] = weakref.WeakSet()
        self._direct_lock = threading.Lock()
        self._thread = threading.Thread(target=self._io_loop, name="cohort-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def submit(self, op: str, target: str, inputs: Any, targets: Any = None, *, timeout: float | None = None) -> Future[Any]:
        """Queue a job (``infer``, ``train_step``, ``ensemble``, ``train_round``); a Future of its result."""
        t = self.timeout if timeout is None else timeout
        req_id = next(self._ids)
        message, buffers = _job_request(req_id, op, target, inputs, targets, t)
        self._check_size(buffers, t)
        future = self._send(req_id, message, buffers, op, t)
        counts = self._counts()
        counts[0] += 1
        future.add_done_callback(lambda _: counts.__setitem__(1, counts[1] + 1))
        return future

    def _job(self, op: str, target: str, inputs: Any, targets: Any, timeout: float | None) -> Any:
        t = self.timeout if timeout is None else timeout
        req_id = next(self._ids)
        message, buffers = _job_request(req_id, op, target, inputs, targets, t)
        self._check_size(buffers, t)
        return self._request(req_id, message, buffers, op, t)

    def _check_size(self, buffers: list[Any], timeout: float) -> None:
        """Refuse a message over the bound here, rather than have the coordinator's socket drop it."""
        size = sum(memoryview(b).nbytes for b in buffers)
        if size <= ALWAYS_ANSWERED_BYTES:
            return
        if self._server_bound is None:
            req_id = next(self._ids)
            hello = self._request(req_id, Hello(req_id, __version__), [], "hello", timeout)
            self._server_bound = hello.max_message_bytes
        _check_size(buffers, min(self.max_message_bytes, self._server_bound))

    def infer(self, model: str, inputs: Any, *, timeout: float | None = None) -> Any:
        """Run model ``"group/index"`` on ``inputs``; its output, on the CPU."""
        return self._job("infer", model, inputs, None, timeout)

    def train_step(self, model: str, inputs: Any, targets: torch.Tensor, *, timeout: float | None = None) -> float:
        """One optimizer step of one model; returns the loss."""
        return self._job("train_step", model, inputs, targets, timeout)

    def ensemble(self, group: str, inputs: Any, *, timeout: float | None = None) -> Any:
        """The same inputs through every model of ``group``: outputs stacked ``[K, ...]``."""
        return self._job("ensemble", group, inputs, None, timeout)

    def train_round(self, group: str, inputs: Any, targets: torch.Tensor, *, timeout: float | None = None) -> list[float]:
        """One step for every model of ``group``; inputs and targets stacked ``[K, B, ...]``; K losses."""
        return self._job("train_round", group, inputs, targets, timeout)

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model: id, group, index, worker, version, device."""
        return self._call(lambda r, t: ListModels(r), "models", timeout)

    def barrier(self, scope: str | list[str] | None = None, *, timeout: float | None = None) -> None:
        """Return once every job accepted before it (within ``scope``: a group, model ids, or all) has finished."""
        items = [scope] if isinstance(scope, str) else scope
        self._call(lambda r, t: BarrierRequest(r, items, t), "barrier", timeout)

    def get_weights(self, model: str, *, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """A consistent copy of one model's parameters and buffers, taken at a barrier of that model."""
        return self._call(lambda r, t: GetWeights(r, model, t), "get_weights", timeout)

    def set_weights(self, model: str, weights: dict[str, torch.Tensor], *, timeout: float | None = None) -> None:
        """Replace one model's parameters and buffers, and reset its optimizer state."""
        tree, buffers = encode_tensors(dict(weights))
        self._check_size(buffers, self.timeout if timeout is None else timeout)
        self._call(lambda r, t: SetWeights(r, model, tree, t), "set_weights", timeout, buffers)

    def copy_weights(self, src: str, dst: str, *, timeout: float | None = None) -> None:
        """Copy ``src``'s weights and optimizer state onto ``dst`` (same group), on the device."""
        self._call(lambda r, t: CopyWeights(r, src, dst, t), "copy_weights", timeout)

    def snapshot(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> dict[str, Any]:
        """Write every model to ``path/<group>/<index>.safetensors`` at a barrier; path as seen from here."""
        full = os.path.abspath(os.fspath(path))
        return self._call(lambda r, t: SnapshotRequest(r, full, t), "snapshot", timeout)

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Workers, queues, jobs/s, latency percentiles, MPS state."""
        return self._call(lambda r, t: StatsRequest(r), "stats", timeout)

    def close(self) -> None:
        """Fail calls still waiting and stop the I/O thread."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(None)
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._direct_lock:
            for direct in list(self._direct_sockets):
                direct.link.close()
            self._direct_sockets.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(self, build: Callable[[int, float], Any], op: str, timeout: float | None, buffers: list[Any] | None = None) -> Any:
        t = self.timeout if timeout is None else timeout
        req_id = next(self._ids)
        return self._request(req_id, build(req_id, t), buffers or [], op, t)

    def _request(self, req_id: int, message: msgspec.Struct, buffers: list[Any], op: str, timeout: float) -> Any:
        """A blocking call: on this thread's own socket when that keeps order, else through the queue."""
        if self._closed:
            raise ProtocolError("the client is closed")
        counts = self._counts()
        if counts[0] != counts[1]:
            return self._wait(self._send(req_id, message, buffers, op, timeout), timeout)
        direct = self._direct()
        link, codec = direct.link, direct.codec
        deadline = time.monotonic() + timeout
        link.dropped()  # a drop before this call is no news to it
        if not link.send(lambda: codec.encode(_time_left(message, deadline), buffers), deadline):
            raise JobTimeout(f"{op}: could not reach the coordinator at {self.address} within {timeout} s; is it running?")
        while True:
            remaining = deadline - time.monotonic()
            events = dict(direct.poller.poll(int(remaining * 1000) + 1)) if remaining > 0 else {}
            if not events:
                raise JobTimeout(f"{op}: no answer from {self.address} within {timeout} s")
            found, result = self._take_reply(link.socket, codec, req_id, op)
            if found:
                return result
            if link.monitor in events and link.dropped():
                found, result = self._take_reply(link.socket, codec, req_id, op)  # it may have come just before
                if found:
                    return result
                raise ProtocolError(f"{op}: the connection to the coordinator at {self.address} dropped while the "
                                    "call was in flight (did it stop or restart?); the job may or may not have run")

    @staticmethod
    def _take_reply(socket: zmq.Socket[Any], codec: Any, req_id: int, op: str) -> tuple[bool, Any]:
        """Read every reply waiting; ``(True, result)`` once the one for ``req_id`` is among them."""
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False, None
            try:
                replies = _replies(*codec.decode([f.buffer for f in frames]))
            except ProtocolError:
                continue
            for reply, reply_buffers in replies:
                if reply.req_id == req_id:  # anything else is a late answer to a call that timed out
                    return True, _result(op, reply, reply_buffers)

    def _counts(self) -> list[int]:
        """This thread's futures: ``[submitted, answered]``; only this thread writes the first,
        only the I/O thread (through done callbacks) the second, so no lock is needed."""
        try:
            return self._local.counts
        except AttributeError:
            self._local.counts = [0, 0]
            return self._local.counts

    def _direct(self) -> _DirectSocket:
        """This thread's own socket; closed when the thread ends or the client closes."""
        direct = getattr(self._local, "direct", None)
        if direct is None:
            link = Link(self._context, self.address, self.curve)
            direct = _DirectSocket(link, client_codec())
            weakref.finalize(direct, link.close)
            with self._direct_lock:
                if self._closed:
                    link.close()
                    raise ProtocolError("the client is closed")
                self._direct_sockets.add(direct)
            self._local.direct = direct
        return direct

    def _send(self, req_id: int, message: msgspec.Struct, buffers: list[Any], op: str, timeout: float) -> Future[Any]:
        if self._closed:
            raise ProtocolError("the client is closed")
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        pending = _Pending(future, op, time.monotonic() + timeout)
        self._outbox.put((req_id, message, buffers, pending))
        if not self._woken:  # one wake-up covers every request queued before the I/O thread takes them
            self._woken = True
            os.write(self._wake_w, b"x")
        return future

    def _wait(self, future: Future[Any], timeout: float | None) -> Any:
        t = self.timeout if timeout is None else timeout
        try:
            # The I/O thread fails the future at its deadline; the margin covers a stalled thread.
            return future.result(timeout=t + 5.0)
        except FutureTimeout:
            raise JobTimeout(f"no answer from {self.address} within {t} s") from None

    def _io_loop(self) -> None:
        """Each pass: take new requests, send what a live connection will take, read replies,
        fail calls lost with a dropped connection, expire calls past their deadline."""
        link = Link(self._context, self.address, self.curve)
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        unsent: deque[tuple[int, msgspec.Struct, list[Any]]] = deque()
        running = True
        try:
            while running:
                # Wait for the socket to take more only while something waits to go.
                poller.register(link.socket, zmq.POLLIN | (zmq.POLLOUT if unsent else 0))
                events = dict(poller.poll(self._next_deadline_ms()))
                if self._wake_r in events:
                    running = self._take_outbox(unsent)
                # A drop is dealt with before anything new is sent: its event must only ever
                # fail calls that went out on the connection that dropped.
                if link.monitor in events and link.dropped():
                    self._drain_replies(link.socket)  # answers that came just before the drop
                    self._fail_sent("the connection to the coordinator at {} dropped while the call was in flight "
                                    "(did it stop or restart?); the job may or may not have run")
                if link.socket in events:
                    self._drain_replies(link.socket)
                self._send_unsent(link, unsent)
                self._expire()
        finally:
            for p in self._pending.values():
                if not p.future.done():
                    p.future.set_exception(ProtocolError("the client was closed before the answer came"))
            self._pending.clear()
            link.close()

    def _take_outbox(self, unsent: deque[tuple[int, msgspec.Struct, list[Any]]]) -> bool:
        """Move new requests to ``unsent``; False once ``close`` asked the loop to end."""
        # The pipe is emptied first, then the flag cleared, then the queue read: a request
        # queued after the clear writes a new byte, which stays for the next pass; one queued
        # before it is read below. (Clearing before emptying the pipe could swallow the byte
        # of a request made in between and leave the flag set with nothing to wake us.)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            req_id, message, buffers, pending = item
            self._pending[req_id] = pending
            heapq.heappush(self._deadlines, (pending.deadline, req_id))
            unsent.append((req_id, message, buffers))

    def _send_unsent(self, link: Link, unsent: deque[tuple[int, msgspec.Struct, list[Any]]]) -> None:
        """Send waiting requests, up to ``MAX_BUNDLE`` a message, while a live connection takes them.

        Nothing ever blocks here: with no connection the requests wait (and expire at
        their deadline), so the loop keeps reading replies and failing late calls.
        """
        while unsent:
            batch: list[tuple[int, msgspec.Struct, list[Any]]] = []
            while unsent and len(batch) < MAX_BUNDLE:
                item = unsent.popleft()
                if item[0] in self._pending:  # not expired while it waited
                    batch.append(item)
            if not batch:
                return
            try:
                for req_id, message, _ in batch:
                    _time_left(message, self._pending[req_id].deadline)
                if len(batch) == 1:
                    frames = self._codec.encode(batch[0][1], batch[0][2])
                else:  # everything waiting, as one message
                    bundle = Requests(0, [m for _, m, _ in batch])
                    frames = self._codec.encode(bundle, [b for _, _, own in batch for b in own])
                sent = link.try_send(frames)
            except Exception as exc:  # the calls fail; the I/O thread, serving every other call, goes on
                for req_id, _, _ in batch:
                    pending = self._pending.pop(req_id, None)
                    if pending is not None:
                        pending.future.set_exception(ProtocolError(f"could not send: {type(exc).__name__}: {exc}"))
                continue
            if not sent:
                unsent.extendleft(reversed(batch))
                return
            for req_id, _, _ in batch:
                self._pending[req_id].sent = True

    def _fail_sent(self, text: str) -> None:
        for req_id in [r for r, p in self._pending.items() if p.sent]:
            pending = self._pending.pop(req_id)
            pending.future.set_exception(ProtocolError(f"{pending.op}: {text.format(self.address)}"))

    def _drain_replies(self, socket: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                replies = _replies(*self._codec.decode([f.buffer for f in frames]))
            except ProtocolError:
                continue  # a reply we cannot read cannot be matched to a call either
            for reply, buffers in replies:
                pending = self._pending.pop(reply.req_id, None)
                if pending is None:
                    continue  # the call already timed out
                try:
                    pending.future.set_result(_result(pending.op, reply, buffers))
                except CohortError as exc:
                    pending.future.set_exception(exc)
                except Exception as exc:
                    pending.future.set_exception(ProtocolError(f"bad reply: {type(exc).__name__}: {exc}"))

    def _next_deadline_ms(self) -> int:
        while self._deadlines and self._deadlines[0][1] not in self._pending:
            heapq.heappop(self._deadlines)  # answered already
        if not self._deadlines:
            return 1000
        return max(0, min(1000, int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, req_id = heapq.heappop(self._deadlines)
            pending = self._pending.pop(req_id, None)
            if pending is not None:
                what = "no answer from" if pending.sent else "could not reach the coordinator at"
                pending.future.set_exception(JobTimeout(f"{pending.op}: {what} {self.address} within the timeout"))


class AsyncClient:
    """The asyncio flavour of ``Client``: the same calls, as coroutines.

    >>> async with AsyncClient() as c:
    ...     y = await c.infer("mlp/3", x)
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, curve: CurveClient | None = None) -> None:
        self.address = check_address(address or default_address())
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.curve = curve or CurveClient.from_env()
        self._codec = client_codec()
        self._ids = itertools.count(1)
        self._context = zmq.asyncio.Context()
        self._socket = dealer(self._context, self.curve)  # see scheduler/link.py for its settings
        self._monitor = self._socket.get_monitor_socket(DROPPED)
        self._socket.connect(self.address)
        self._pending: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._sent: set[int] = set()  # requests on the connection: lost with it if it drops
        self._server_bound: int | None = None
        self._reader: asyncio.Task[None] | None = None

    async def submit(self, op: str, target: str, inputs: Any, targets: Any = None, *, timeout: float | None = None) -> Any:
        t = self.timeout if timeout is None else timeout
        req_id = next(self._ids)
        message, buffers = _job_request(req_id, op, target, inputs, targets, t)
        await self._check_size(buffers, t)
        return await self._request(req_id, message, buffers, op, t)

    async def _check_size(self, buffers: list[Any], timeout: float) -> None:
        size = sum(memoryview(b).nbytes for b in buffers)
        if size <= ALWAYS_ANSWERED_BYTES:
            return
        if self._server_bound is None:
            req_id = next(self._ids)
            hello = await self._request(req_id, Hello(req_id, __version__), [], "hello", timeout)
            self._server_bound = hello.max_message_bytes
        _check_size(buffers, min(self.max_message_bytes, self._server_bound))

    async def infer(self, model: str, inputs: Any, *, timeout: float | None = None) -> Any:
        return await self.submit("infer", model, inputs, timeout=timeout)

    async def train_step(self, model: str, inputs: Any, targets: torch.Tensor, *, timeout: float | None = None) -> float:
        return await self.submit("train_step", model, inputs, targets, timeout=timeout)

    async def ensemble(self, group: str, inputs: Any, *, timeout: float | None = None) -> Any:
        return await self.submit("ensemble", group, inputs, timeout=timeout)

    async def train_round(self, group: str, inputs: Any, targets: torch.Tensor, *, timeout: float | None = None) -> list[float]:
        return await self.submit("train_round", group, inputs, targets, timeout=timeout)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return await self._call(lambda r, t: ListModels(r), "models", timeout)

    async def barrier(self, scope: str | list[str] | None = None, *, timeout: float | None = None) -> None:
        items = [scope] if isinstance(scope, str) else scope
        await self._call(lambda r, t: BarrierRequest(r, items, t), "barrier", timeout)

    async def get_weights(self, model: str, *, timeout: float | None = None) -> dict[str, torch.Tensor]:
        return await self._call(lambda r, t: GetWeights(r, model, t), "get_weights", timeout)

    async def set_weights(self, model: str, weights: dict[str, torch.Tensor], *, timeout: float | None = None) -> None:
        tree, buffers = encode_tensors(dict(weights))
        await self._check_size(buffers, self.timeout if timeout is None else timeout)
        await self._call(lambda r, t: SetWeights(r, model, tree, t), "set_weights", timeout, buffers)

    async def copy_weights(self, src: str, dst: str, *, timeout: float | None = None) -> None:
        await self._call(lambda r, t: CopyWeights(r, src, dst, t), "copy_weights", timeout)

    async def snapshot(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> dict[str, Any]:
        full = os.path.abspath(os.fspath(path))
        return await self._call(lambda r, t: SnapshotRequest(r, full, t), "snapshot", timeout)

    async def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        return await self._call(lambda r, t: StatsRequest(r), "stats", timeout)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(ProtocolError("the client was closed before the answer came"))
        self._pending.clear()
        close_monitored(self._socket, self._monitor)
        self._context.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, build: Callable[[int, float], Any], op: str, timeout: float | None,
                    buffers: list[Any] | None = None) -> Any:
        t = self.timeout if timeout is None else timeout
        req_id = next(self._ids)
        return await self._request(req_id, build(req_id, t), buffers or [], op, t)

    async def _request(self, req_id: int, message: msgspec.Struct, buffers: list[Any], op: str, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read_replies())
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[req_id] = (future, op)
        deadline = time.monotonic() + timeout
        try:
            await self._check_drop()  # a drop seen now fails only calls sent before it, never this one
            if not await self._send_when_connected(message, buffers, deadline):
                raise JobTimeout(f"{op}: could not reach the coordinator at {self.address} within {timeout} s; "
                                 "is it running?")
            self._sent.add(req_id)
            try:
                return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise JobTimeout(f"{op}: no answer from {self.address} within {timeout} s") from None
        finally:
            self._pending.pop(req_id, None)
            self._sent.discard(req_id)

    async def _send_when_connected(self, message: msgspec.Struct, buffers: list[Any], deadline: float) -> bool:
        """Send once a live connection takes it (IMMEDIATE), with the time it has left; False at the deadline."""
        while True:
            if try_send(self._socket, self._codec.encode(_time_left(message, deadline), buffers)):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._socket.poll(int(remaining * 1000) + 1, zmq.POLLOUT):
                return False

    async def _read_replies(self) -> None:
        """Resolve futures as replies arrive; fail the ones in flight when the connection drops."""
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            events = dict(await poller.poll())
            if self._monitor in events:
                await self._check_drop()
            if self._socket in events:
                await self._take_replies()

    async def _check_drop(self) -> None:
        """If the connection dropped: take the answers that came before, fail the calls still in flight."""
        if not await self._dropped():
            return
        await self._take_replies()
        for req_id in list(self._sent):
            future, op = self._pending.get(req_id, (None, ""))
            if future is not None and not future.done():
                future.set_exception(ProtocolError(
                    f"{op}: the connection to the coordinator at {self.address} dropped while the call was in "
                    "flight (did it stop or restart?); the job may or may not have run"))

    async def _dropped(self) -> bool:
        dropped = False
        while True:
            try:
                event = await recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped = dropped or event["event"] == DROPPED

    async def _take_replies(self) -> None:
        while True:
            try:
                frames = await self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                replies = _replies(*self._codec.decode([f.buffer for f in frames]))
            except ProtocolError:
                continue
            for reply, buffers in replies:
                entry = self._pending.get(reply.req_id)
                if entry is None or entry[0].done():
                    continue
                future, op = entry
                try:
                    future.set_result(_result(op, reply, buffers))
                except CohortError as exc:
                    future.set_exception(exc)
                except Exception as exc:  # an unreadable reply fails its call, never this reader
                    future.set_exception(ProtocolError(f"bad reply: {type(exc).__name__}: {exc}"))
