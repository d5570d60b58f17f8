"""``AsyncClient``: the calls of ``Client`` as coroutines, on one asyncio socket.

Its calls are declared once with ``Client``'s (``client_api.BaseClient``) and speak the
protocol through the same sans-I/O core (``client_core``); this module holds only the
asyncio I/O. Each call sends its request itself, once a live connection takes it
(``IMMEDIATE``), and awaits a future; one reader task resolves futures as replies
arrive and fails the calls in flight when the connection drops.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from core.errors import BadInput
from core.tensors import DEFAULT_MAX_MESSAGE_BYTES
from scheduler.client_api import BaseClient, coroutine_calls
from scheduler.client_core import DEFAULT_TIMEOUT_S, Call, Connection
from scheduler.link import DROPPED, close_monitored, dealer, try_send
from scheduler.security import CurveClient


@coroutine_calls
class AsyncClient(BaseClient):
    """The asyncio flavour of ``Client``: the same calls, as coroutines.

    >>> async with AsyncClient() as c:
    ...     y = await c.infer("mlp/3", x)
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, curve: CurveClient | None = None,
                 shm: bool | None = None, cuda_ipc: bool = False) -> None:
        super().__init__(address, timeout=timeout, max_message_bytes=max_message_bytes, curve=curve, shm=shm,
                         cuda_ipc=cuda_ipc)
        self._context = zmq.asyncio.Context()
        self._socket = dealer(self._context, self.curve)  # see scheduler/link.py for its settings
        self._monitor = self._socket.get_monitor_socket(DROPPED)
        self._socket.connect(self.address)
        self._connection = Connection(self.address, self._core)
        self._reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for settled in self._connection.close():
            settled.resolve()
        close_monitored(self._socket, self._monitor)
        self._context.term()
        self._core.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def map(self, op: str, target: str, inputs: Iterable[Any], targets: Iterable[Any] | None = None, *,
                  depth: int = 4, timeout: float | None = None) -> AsyncIterator[Any]:
        """Results of ``op`` on ``target`` for each item of ``inputs`` (and ``targets``), in order, with up to
        ``depth`` calls in flight (``async for y in c.map("infer", "mlp/3", batches): ...``)."""
        if depth < 1:
            raise BadInput(f"map needs depth >= 1, got {depth}")
        pairs = zip(inputs, targets) if targets is not None else ((x, None) for x in inputs)
        in_flight: deque[asyncio.Task[Any]] = deque()
        try:
            for x, t in pairs:
                in_flight.append(asyncio.ensure_future(self.submit(op, target, x, t, timeout=timeout)))
                if len(in_flight) >= depth:
                    yield await in_flight.popleft()
            while in_flight:
                yield await in_flight.popleft()
        finally:
            for task in in_flight:
                task.cancel()

    async def _call(self, call: Call, timeout: float | None) -> Any:
        t = self._timeout(timeout)
        if self._core.needs_bound(call):
            self._core.greeted(await self._request(self._core.start(self._core.hello(), t), t))
        self._core.check_size(call)
        return await self._request(self._core.start(call, t), t)

    _submit = _call  # awaiting a submitted job is awaiting its result

    async def _request(self, call: Call, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read_replies())
        call.future = loop.create_future()
        connection = self._connection
        connection.add(call)
        try:
            await self._check_drop()  # a drop seen now fails only calls sent before it, never this one
            if not await self._send_when_connected(call):
                raise connection.not_reached(call, timeout)
            connection.sent([call])
            await self._take_replies_seen_by_send()
            try:
                return await asyncio.wait_for(call.future, max(0.0, call.deadline - time.monotonic()))
            except TimeoutError:
                raise connection.no_answer(call, timeout) from None
        finally:
            connection.forget(call)

    async def _send_when_connected(self, call: Call) -> bool:
        """Send once a live connection takes it (IMMEDIATE), with the time it has left; False at the deadline."""
        while True:
            if try_send(self._socket, self._connection.frames([call])):
                return True
            remaining = call.deadline - time.monotonic()
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
        for settled in self._connection.dropped():
            settled.resolve()

    async def _dropped(self) -> bool:
        dropped = False
        while True:
            try:
                event = await recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped = dropped or event["event"] == DROPPED

    async def _take_replies_seen_by_send(self) -> None:
        """A send processes the socket's pending events, replies included, and so can consume
        the edge its file descriptor signals them with: the reader would then sleep on replies
        already waiting. Take them here when the socket says some wait."""
        if self._socket.get(zmq.EVENTS) & zmq.POLLIN:
            await self._take_replies()

    async def _take_replies(self) -> None:
        while True:
            try:
                frames = await self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            for settled in self._connection.receive([f.buffer for f in frames]):
                settled.resolve()
