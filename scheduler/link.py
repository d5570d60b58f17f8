"""A client's connection to the coordinator: one DEALER socket that says when it drops, or, for
a coordinator on the client's own host, its Unix socket (``LocalLink``).

Two socket settings make a client dependable when the coordinator goes away:

- ``IMMEDIATE``: a request is queued only on a live connection. Without it ZeroMQ
  queues requests for a coordinator that is down (up to the send limit, and then every
  send blocks), and a coordinator started later runs requests whose callers gave up
  long ago: a stale ``train_step`` would change weights nobody asked to change.
- A socket monitor for ``EVENT_DISCONNECTED``: the connection to a coordinator that
  dies or restarts drops, and the calls in flight on it fail at once with a
  ``ProtocolError`` instead of waiting for their deadline.

ZeroMQ reconnects by itself; the next call goes to whichever coordinator answers at
the address. A ``LocalLink`` does not: once its coordinator has gone it is ``gone``, and the
client opens a new connection for the next call.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from core.codec import zero_copy
from core.errors import ProtocolError
from core.frames_io import NOBLOCK, SNDMORE, readable, recv_frames
from core.unix_link import RECORD_BYTES, LinkClosed, UnixLink
from scheduler.security import CurveClient

DROPPED = zmq.EVENT_DISCONNECTED


def dealer(context: zmq.Context[Any], curve: CurveClient | None) -> zmq.Socket[Any]:
    """A DEALER socket with the settings every client socket shares; not yet connected."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None:
        curve.apply(socket)
    return socket


class Link:
    """A connected DEALER socket and its monitor, for code that polls (threads, not asyncio)."""

    def __init__(self, context: zmq.Context[Any], address: str, curve: CurveClient | None) -> None:
        self.socket = dealer(context, curve)
        self.monitor = self.socket.get_monitor_socket(DROPPED)
        self.socket.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)

    gone = False  # ZeroMQ reconnects by itself

    def hung_up(self) -> bool:
        return False

    def wait(self, timeout_ms: int) -> bool:
        """Wait until a reply or a drop can be read; False on timeout."""
        return bool(self._poller.poll(timeout_ms))

    def dropped(self) -> bool:
        """Read the monitor's events; whether the connection dropped since the last look."""
        dropped = False
        while readable(self.monitor):  # asked before every call: a look, not a receive that raises
            event = recv_monitor_message(self.monitor, NOBLOCK)
            dropped = dropped or event["event"] == DROPPED
        return dropped

    def send(self, encode: Callable[[], list[Any]], deadline: float) -> bool:
        """Send once there is a live connection; False if none came before ``deadline``.

        ``encode`` makes the frames at the moment of sending, so a request that waited
        for the connection carries only the time it has left."""
        while True:
            if self.try_send(encode()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000) + 1, zmq.POLLOUT):
                return False

    def try_send(self, frames: list[Any]) -> bool:
        return try_send(self.socket, frames)

    def receive(self) -> list[Any] | None:
        """The frames of one message waiting, as buffers; None if none waits."""
        if not readable(self.socket):  # a look: a receive that finds none raises, which costs twice as much
            return None
        return [f.buffer for f in recv_frames(self.socket, NOBLOCK)]

    def close(self) -> None:
        close_monitored(self.socket, self.monitor)


class LocalLink:
    """A connection to a coordinator on this host over its Unix socket (``scheduler.local_clients``):
    what ``Link`` does, without ZeroMQ's I/O threads on either side.

    The coordinator may pass it a socket per worker (``scheduler.local_clients`` says why) on
    which that worker answers this connection's jobs directly: replies are read from all of them,
    in whatever order they come (each names its request)."""

    def __init__(self, name: str) -> None:
        self.link = UnixLink.connect(name, blocking=False, takes_sockets=True)
        self.link.copy_unsent = False  # send() returns once all of a message is out
        self.gone = False
        self._dropped = False
        self._from_workers: dict[int, UnixLink] = {}  # the workers' sockets, by descriptor
        self._ready: list[int] = []  # the descriptors the last wait found readable, not yet read empty
        self._readable = select.poll()
        self._readable.register(self.link.fileno(), select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self.link.fileno(), select.POLLOUT)
        self._hangup = select.poll()  # reports the other end's close alone, not replies waiting
        self._hangup.register(self.link.fileno(), select.POLLRDHUP)

    def wait(self, timeout_ms: int) -> bool:
        if self.gone:
            return True
        self._ready = [fd for fd, _ in self._readable.poll(timeout_ms)]
        return bool(self._ready)

    def dropped(self) -> bool:
        dropped, self._dropped = self._dropped, False
        return dropped

    def hung_up(self) -> bool:
        """Whether the coordinator has closed its end (it stopped, or died, since the last call):
        the link is given up then, and the client opens a new one, to whichever coordinator is
        there now. A look, without waiting."""
        if not self.gone and self._hangup.poll(0):
            self._lose()
        return self.gone

    def send(self, encode: Callable[[], list[Any]], deadline: float) -> bool:
        """Send now, waiting for the coordinator's socket to take it up to ``deadline``; False (and the
        link given up: a part of the message may be out) if it did not."""
        if self.gone:
            raise ProtocolError("the connection to the coordinator dropped")
        try:
            self.link.send(encode())
            while self.link.wants_write:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._writable.poll(int(remaining * 1000) + 1):
                    self._lose()
                    return False
                self.link.flush()
        except LinkClosed:
            self._lose()
            raise ProtocolError("the connection to the coordinator dropped while the request was being sent") from None
        return True

    def receive(self) -> list[Any] | None:
        """The next message waiting on a socket that the last ``wait`` found readable (the coordinator's
        or a worker's); None once they are read empty. Only those are read: a look at each of the others
        would cost a system call, and what comes there later wakes the next ``wait``."""
        while self._ready and not self.gone:
            fd = self._ready[-1]
            frames = self._from_coordinator() if fd == self.link.fileno() else self._from_worker(fd)
            if frames is not None:
                return frames
            self._ready.pop()
        return None

    def _from_coordinator(self) -> list[Any] | None:
        try:
            frames = self.link.recv()
        except LinkClosed:  # the coordinator has gone: the calls out on this link learn it from dropped()
            self._lose()
            return None
        if passed := self.link.take_sockets():
            self._add_workers(passed)
        return frames

    def _from_worker(self, fd: int) -> list[Any] | None:
        link = self._from_workers.get(fd)
        if link is None:
            return None
        try:
            return link.recv()
        except LinkClosed:  # that worker has gone (or restarted): its jobs are answered by the coordinator
            self._remove_worker(fd)
            return None

    def close(self) -> None:
        """Closed with the client: a call still waiting on it fails as dropped, now."""
        self._dropped = True
        self.gone = True
        self.link.close()
        for fd in list(self._from_workers):
            self._remove_worker(fd)

    def _add_workers(self, passed: list[tuple[int, socket.socket]]) -> None:
        # By descriptor, not worker: a restarted worker's new socket comes while the old one may still
        # hold answers to read; the old one goes once read to its end.
        for _, sock in passed:
            # A worker answers here in one record: anything longer breaks the rule and closes the link.
            link = UnixLink(sock, blocking=False, max_message_bytes=RECORD_BYTES)
            self._from_workers[link.fileno()] = link
            self._readable.register(link.fileno(), select.POLLIN)

    def _remove_worker(self, fd: int) -> None:
        self._readable.unregister(fd)
        self._from_workers.pop(fd).close()

    def _lose(self) -> None:
        self.close()


def try_send(socket: zmq.Socket[Any], frames: list[Any]) -> bool:
    """Send if a connection can take it now; False (nothing queued) if not. Never waits,
    also on an asyncio socket.

    Frame by frame: if the connection drops after the first frame, ZeroMQ discards the
    rest of the message only once all of it has been handed over, so the rest is handed
    over anyway (and dropped), and the request fails as lost."""
    send = zmq.Socket.send  # the plain, synchronous send, whatever flavour ``socket`` is
    last = len(frames) - 1
    copy = not zero_copy(frames)
    try:
        send(socket, frames[0], NOBLOCK | (SNDMORE if last else 0), copy=copy)
    except zmq.Again:
        return False
    broken = False
    for index in range(1, last + 1):
        try:
            send(socket, frames[index], NOBLOCK | (SNDMORE if index < last else 0), copy=copy)
        except zmq.Again:
            broken = True
    if broken:
        raise ProtocolError("the connection to the coordinator dropped while the request was being sent")
    return True


def close_monitored(socket: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    """Close a socket and its monitor (the monitor first, or ZeroMQ keeps it waiting)."""
    try:
        socket.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
    socket.close(linger=0)
