"""The client library: ``Client`` (threads and futures) here, ``AsyncClient`` (asyncio) beside it.

Both declare their calls once (``client_api.BaseClient``) and speak the protocol through
one sans-I/O core (``client_core``); this module holds only ``Client``'s own I/O.

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

import heapq
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import zmq

from core.errors import BadInput, JobTimeout, ProtocolError
from core.tensors import DEFAULT_MAX_MESSAGE_BYTES
from scheduler.client_api import BaseClient, default_address
from scheduler.client_async import AsyncClient
from scheduler.client_core import DEFAULT_TIMEOUT_S, Call, ClientCore, Connection, Settled, job
from scheduler.link import Link, LocalLink
from scheduler.local_clients import local_name
from scheduler.security import CurveClient

__all__ = ["AsyncClient", "Client", "default_address"]

MAX_BUNDLE = 256  # requests the I/O thread sends as one message at most
# The I/O thread fails a future at its deadline; a caller blocked on one waits this much
# longer before giving up on the I/O thread itself (stalled, say, by a long GC pause).
IO_MARGIN_S = 5.0
LOCAL_RETRY_S = 1.0  # a thread on ZeroMQ looks for a local coordinator's Unix socket at most this often


class Client(BaseClient):
    """Submit jobs to a cohort coordinator from any number of threads.

    >>> with Client("tcp://127.0.0.1:5555") as c:
    ...     y = c.infer("mlp/3", x)
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, curve: CurveClient | None = None,
                 shm: bool | None = None, cuda_ipc: bool = False, local_link: bool = True) -> None:
        """``local_link``: with a coordinator on this host, blocking calls and ``map`` go over its Unix
        socket rather than ZeroMQ (a message costs a fraction as much; see the README); ``submit``
        stays on ZeroMQ."""
        super().__init__(address, timeout=timeout, max_message_bytes=max_message_bytes, curve=curve, shm=shm,
                         cuda_ipc=cuda_ipc)
        self._closed = False
        # the coordinator's Unix socket, if it is on this host (None: ZeroMQ only; with CURVE keys too)
        self._local_name = local_name(self.address) if local_link and self.curve is None else None
        self._context = zmq.Context()
        self._local = threading.local()
        self._direct_sockets: weakref.WeakSet[_DirectSocket] = weakref.WeakSet()
        self._direct_lock = threading.Lock()
        self._io = _IOThread(self._context, self.address, self.curve, self._core)

    def close(self) -> None:
        """Fail calls still waiting and stop the I/O thread."""
        if self._closed:
            return
        self._closed = True
        self._io.stop()
        with self._direct_lock:
            for direct in list(self._direct_sockets):
                direct.link.close()
            self._direct_sockets.clear()
        self._context.term()
        self._core.close()

    def map(self, op: str, target: str, inputs: Iterable[Any], targets: Iterable[Any] | None = None, *,
            depth: int = 4, timeout: float | None = None) -> Iterator[Any]:
        """Results of ``op`` on ``target`` for each item of ``inputs`` (and ``targets``), in order, with up to
        ``depth`` calls in flight: the coordinator and workers work on the next batches while this
        thread handles one. Stops early without leaving calls behind if the loop is left.

        The calls go out on this thread's own socket, several to a message, and their answers are
        read there, with no future and no hand-off to the I/O thread per call: a stream of small
        calls costs a fraction of as many ``submit`` calls. Iterate it on the thread that called
        ``map`` (the socket is that thread's). A thread with submitted calls still unanswered streams
        through ``submit`` instead, and a call submitted inside the loop is answered before the
        stream's next calls go out, so a thread's calls keep their order."""
        if depth < 1:
            raise BadInput(f"map needs depth >= 1, got {depth}")
        counts = self._counts()
        if counts[0] != counts[1]:
            return submitted_map(self, op, target, inputs, targets, depth=depth, timeout=timeout)
        pairs = zip(inputs, targets) if targets is not None else ((x, None) for x in inputs)
        return self._map_direct((job(op, target, x, t) for x, t in pairs), depth, self._timeout(timeout))

    def _map_direct(self, calls: Iterator[Call], depth: int, timeout: float) -> Iterator[Any]:
        stream = self._direct().stream(calls, depth, timeout, self._core, self._check_size, self._settle)
        try:
            for settled in stream:
                yield settled.result()
        finally:
            stream.close()  # the calls still out are forgotten now, not when the generator is collected

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the two roads

    def _call(self, call: Call, timeout: float | None) -> Any:
        t = self._timeout(timeout)
        self._check_size(call, t)
        return self._request(self._core.start(call, t), t)

    def _submit(self, call: Call, timeout: float | None) -> Future[Any]:
        t = self._timeout(timeout)
        self._check_size(call, t)
        future = self._send(self._core.start(call, t))
        counts = self._counts()
        counts[0] += 1
        future.add_done_callback(lambda _: counts.__setitem__(1, counts[1] + 1))
        return future

    def _check_size(self, call: Call, timeout: float) -> None:
        if self._core.needs_bound(call):
            self._core.greeted(self._request(self._core.start(self._core.hello(), timeout), timeout))
        self._core.check_size(call)

    def _request(self, call: Call, timeout: float) -> Any:
        """A blocking call: on this thread's own socket when that keeps order, else through the queue."""
        if self._closed:
            raise ProtocolError("the client is closed")
        counts = self._counts()
        if counts[0] != counts[1]:
            return self._wait(self._send(call), timeout)
        return self._direct().call(call, timeout)

    def _settle(self, deadline: float) -> None:
        """Wait until this thread's submitted calls are answered (a ``submit`` made inside a ``map`` loop):
        the stream's next calls must not overtake them. ``JobTimeout`` at ``deadline``."""
        counts = self._counts()
        while counts[0] != counts[1]:
            if time.monotonic() > deadline:
                raise JobTimeout("map: this thread's submitted calls were not answered before the stream's "
                                 "next calls timed out")
            time.sleep(0.0005)

    def _counts(self) -> list[int]:
        """This thread's futures: ``[submitted, answered]``; only this thread writes the first,
        only the I/O thread (through done callbacks) the second, so no lock is needed."""
        try:
            return self._local.counts
        except AttributeError:
            self._local.counts = [0, 0]
            return self._local.counts

    def _direct(self) -> _DirectSocket:
        """This thread's own connection: over the coordinator's Unix socket where it can be reached, else
        ZeroMQ (tried again now and then, with nothing out: the coordinator may have come up since).
        Opened on first use, and again once a Unix one has dropped (it does not reconnect by itself);
        closed when the thread ends or the client closes."""
        direct: _DirectSocket | None = getattr(self._local, "direct", None)
        if direct is None or direct.link.hung_up():
            direct = self._open(self._local_link() or Link(self._context, self.address, self.curve))
            self._local.direct = direct
        elif (isinstance(direct.link, Link) and self._local_name is not None and time.monotonic() > direct.retry_at
              and not len(direct.connection) and not direct.done):
            local = self._local_link()
            if local is None:
                direct.retry_at = time.monotonic() + LOCAL_RETRY_S
            else:  # the ZeroMQ one stays open for a map of this thread that may still use it
                direct = self._local.direct = self._open(local)
        return direct

    def _local_link(self) -> LocalLink | None:
        if self._local_name is None:
            return None
        try:
            return LocalLink(self._local_name)
        except OSError:  # no coordinator of this address on this host (yet), or an older one
            return None

    def _open(self, link: Link | LocalLink) -> _DirectSocket:
        direct = _DirectSocket(link, Connection(self.address, self._core))
        weakref.finalize(direct, link.close)
        with self._direct_lock:
            if self._closed:
                link.close()
                raise ProtocolError("the client is closed")
            self._direct_sockets.add(direct)
        return direct

    def _send(self, call: Call) -> Future[Any]:
        if self._closed:
            raise ProtocolError("the client is closed")
        call.future = Future()
        call.future.set_running_or_notify_cancel()
        self._io.put(call)
        return call.future

    def _wait(self, future: Future[Any], timeout: float) -> Any:
        try:
            return future.result(timeout=timeout + IO_MARGIN_S)
        except FutureTimeout:
            raise JobTimeout(f"no answer from {self.address} within {timeout} s") from None


def submitted_map(client: Any, op: str, target: str, inputs: Iterable[Any], targets: Iterable[Any] | None = None, *,
                  depth: int = 4, timeout: float | None = None) -> Iterator[Any]:
    """``map`` built on ``submit`` alone, for any client that has it (``ClusterClient`` too): up to
    ``depth`` futures out, results in order; those left when the caller stops are cancelled."""
    if depth < 1:
        raise BadInput(f"map needs depth >= 1, got {depth}")
    pairs = zip(inputs, targets) if targets is not None else ((x, None) for x in inputs)
    return _submitted(client, op, target, pairs, depth, timeout)


def _submitted(client: Any, op: str, target: str, pairs: Iterator[tuple[Any, Any]], depth: int,
               timeout: float | None) -> Iterator[Any]:
    in_flight: deque[Future[Any]] = deque()
    try:
        for x, t in pairs:
            in_flight.append(client.submit(op, target, x, t, timeout=timeout))
            if len(in_flight) >= depth:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        for future in in_flight:  # the caller stopped early: what is left is answered and dropped
            future.cancel()


class _DirectSocket:
    """A calling thread's own link; dropped with the thread's locals when the thread ends.

    Replies are read into ``done`` whoever reads them, so a blocking call made while a ``map``
    stream of the same thread has calls out takes only its own answer and leaves theirs. A drop
    of the connection is counted, so that every call sent before it learns of it."""

    __slots__ = ("__weakref__", "connection", "done", "drops", "link", "retry_at")

    def __init__(self, link: Link | LocalLink, connection: Connection) -> None:
        self.link = link
        self.connection = connection
        self.done: dict[int, Settled] = {}  # answers read, not yet taken by their caller
        self.drops = 0  # connection drops seen so far
        self.retry_at = time.monotonic() + LOCAL_RETRY_S  # on ZeroMQ: when to look for the Unix socket again

    def call(self, call: Call, timeout: float) -> Any:
        """Send ``call`` and wait for its reply on this socket, on the calling thread."""
        link, connection = self.link, self.connection
        self._note_drops()  # a drop before this call is no news to it
        connection.add(call)
        try:
            if not link.send(lambda: connection.frames([call]), call.deadline):
                raise connection.not_reached(call, timeout)
            connection.sent([call])
            return self._wait(call, timeout, self.drops).result()
        finally:
            connection.forget(call)
            self.done.pop(call.req_id, None)

    def stream(self, calls: Iterator[Call], depth: int, timeout: float, core: ClientCore,
               check_size: Callable[[Call, float], None], settle: Callable[[float], None]) -> Iterator[Settled]:
        """Each call's outcome, in order, with up to ``depth`` in flight on this socket; new calls go out
        together, as one message, before waiting for the next answer. The calls still out when the
        caller stops are forgotten (their late answers are dropped; their tensors in the arena stay
        the worker's until the arena reclaims them, since the jobs may still run). ``settle(deadline)``
        waits for this thread's submitted calls before a batch goes out, so they keep their order."""
        link, connection = self.link, self.connection
        pending: deque[tuple[Call, int]] = deque()  # each call, and the drops seen when it went out
        waiting: Call | None = None  # a call that must wait for the coordinator's bound (asked with nothing out)
        carried: Call | None = None  # a call started that did not fit into the last message
        bound = core.batch_bound()
        try:
            while True:
                batch: list[Call] = []
                # Answers come in bursts (a worker answers the jobs it ran together in one message).
                # While the next answer is already here, hand it over first and send nothing: the new
                # calls then go out together, in one message, which the coordinator and the worker
                # take together, instead of one call a message. A call still out is never kept waiting.
                room = depth - len(pending)
                if pending and pending[0][0].req_id in self.done and room < depth // 2:
                    room = 0
                try:
                    size = 0
                    while len(batch) < room:
                        if carried is not None:  # started, left for this message: it did not fit the last one
                            call, carried = carried, None
                        else:
                            call = waiting or next(calls, None)
                            waiting = None
                            if call is None:
                                break
                            if core.needs_bound(call) and (pending or batch):
                                waiting = call  # the bound is asked on this socket once nothing else is out
                                break
                            check_size(call, timeout)
                            core.start(call, timeout)
                            bound = core.batch_bound()  # the coordinator's, once a hello has told it
                        if batch and size + call.size > bound:  # one message stays within the socket's limit
                            carried = call
                            break
                        connection.add(call)
                        batch.append(call)
                        size += call.size
                    if batch:
                        settle(batch[0].deadline)
                        self._note_drops()  # a drop before these go out is no news to them
                        if not link.send(lambda batch=batch: connection.frames(batch), batch[0].deadline):
                            raise connection.not_reached(batch[0], timeout)
                except BaseException:  # the calls not sent are dropped, and their arena regions given back
                    for call in batch:
                        connection.forget(call)
                        core.finish(call)
                    raise
                if batch:
                    connection.sent(batch)
                    pending.extend((call, self.drops) for call in batch)
                if not pending:
                    return
                head, drops = pending[0]
                settled = self._wait(head, timeout, drops)
                pending.popleft()
                yield settled
        finally:
            for call, _ in pending:  # sent: the worker may still read their tensors, so no finish here
                connection.forget(call)
                self.done.pop(call.req_id, None)
            if carried is not None:
                core.finish(carried)  # started, never sent

    def _wait(self, call: Call, timeout: float, drops: int) -> Settled:
        """``call``'s answer; ``JobTimeout`` at its deadline, ``ProtocolError`` once the connection it went
        out on (``drops`` drops seen then) has dropped."""
        while (settled := self.done.pop(call.req_id, None)) is None:
            if self.drops != drops:
                raise self.connection.lost(call)
            remaining = call.deadline - time.monotonic()
            if remaining <= 0 or not self.link.wait(int(remaining * 1000) + 1):
                raise self.connection.no_answer(call, timeout)
            self._read_all()
            if call.req_id not in self.done:
                self._note_drops()
                self._read_all()  # it may have come just before the drop
        return settled

    def _note_drops(self) -> None:
        if self.link.dropped():
            self.drops += 1

    def _read_all(self) -> None:
        """Every reply waiting, into ``done``; a reply to no call still out (one that timed out) is dropped."""
        while (frames := self.link.receive()) is not None:
            for settled in self.connection.receive(frames):
                self.done[settled.call.req_id] = settled



class _IOThread:
    """The background thread behind ``submit``: one DEALER socket, its calls in flight,
    and the queue and wake-up pipe that other threads hand it calls through."""

    def __init__(self, context: zmq.Context[Any], address: str, curve: CurveClient | None, core: ClientCore) -> None:
        self._outbox: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._woken = False  # a wake-up byte is in the pipe and the I/O thread has not taken the queue since
        # Only the I/O thread touches what follows, once it runs.
        self._context, self._address, self._curve = context, address, curve
        self._link: Link
        self._connection = Connection(address, core)
        self._deadlines: list[tuple[float, int, Call]] = []  # heap of the pending calls' deadlines
        self._unsent: deque[Call] = deque()
        self._thread = threading.Thread(target=self._loop, name="cohort-client-io", daemon=True)
        self._thread.start()

    def put(self, call: Call) -> None:
        """Hand ``call`` (its ``future`` set) to the I/O thread; any thread."""
        self._outbox.put(call)
        if not self._woken:  # one wake-up covers every request queued before the I/O thread takes them
            self._woken = True
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        """Fail the calls still waiting and end the thread."""
        self._outbox.put(None)
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _loop(self) -> None:
        """Each pass: take new requests, send what a live connection will take, read replies,
        fail calls lost with a dropped connection, expire calls past their deadline."""
        link = self._link = Link(self._context, self._address, self._curve)
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        running = True
        try:
            while running:
                # Wait for the socket to take more only while something waits to go.
                poller.register(link.socket, zmq.POLLIN | (zmq.POLLOUT if self._unsent else 0))
                events = dict(poller.poll(self._next_deadline_ms()))
                if self._wake_r in events:
                    running = self._take_outbox()
                # A drop is dealt with before anything new is sent: its event must only ever
                # fail calls that went out on the connection that dropped.
                if link.monitor in events and link.dropped():
                    self._read_replies()  # answers that came just before the drop
                    _resolve(self._connection.dropped())
                if link.socket in events:
                    self._read_replies()
                self._send_unsent()
                self._expire()
        finally:
            _resolve(self._connection.close())
            link.close()

    def _take_outbox(self) -> bool:
        """Move new requests to the unsent; False once ``stop`` asked the loop to end."""
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
                call = self._outbox.get_nowait()
            except queue.Empty:
                return True
            if call is None:
                return False
            self._connection.add(call)
            heapq.heappush(self._deadlines, (call.deadline, call.req_id, call))
            self._unsent.append(call)

    def _send_unsent(self) -> None:
        """Send waiting requests, up to ``MAX_BUNDLE`` a message, while a live connection takes them.

        Nothing ever blocks here: with no connection the requests wait (and expire at
        their deadline), so the loop keeps reading replies and failing late calls.
        """
        connection, unsent = self._connection, self._unsent
        while unsent:
            batch: list[Call] = []
            while unsent and len(batch) < MAX_BUNDLE:
                call = unsent.popleft()
                if call in connection:  # not expired while it waited
                    batch.append(call)
            if not batch:
                return
            try:
                sent = self._link.try_send(connection.frames(batch))
            except Exception as exc:  # the calls fail; the I/O thread, serving every other call, goes on
                error = ProtocolError(f"could not send: {type(exc).__name__}: {exc}")
                _resolve([connection.fail(call, error) for call in batch])
                continue
            if not sent:
                unsent.extendleft(reversed(batch))
                return
            connection.sent(batch)

    def _read_replies(self) -> None:
        while (frames := self._link.receive()) is not None:
            _resolve(self._connection.receive(frames))

    def _next_deadline_ms(self) -> int:
        while self._deadlines and self._deadlines[0][2] not in self._connection:
            heapq.heappop(self._deadlines)  # answered already
        if not self._deadlines:
            return 1000
        return max(0, min(1000, int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            call = heapq.heappop(self._deadlines)[2]
            if call in self._connection:
                self._connection.expire(call).resolve()


def _resolve(settled: list[Settled]) -> None:
    for outcome in settled:
        outcome.resolve()
