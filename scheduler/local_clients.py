"""Clients on the coordinator's own host, over a Unix socket beside ZeroMQ's.

A coordinator on a private address (``ipc://`` or loopback) also listens on a Unix socket in
the abstract namespace whose name follows from that address (``local_name``): a client of
the same address on the same host connects there and sends its blocking calls and ``map``
streams over it instead of through ZeroMQ: the same messages, without ZeroMQ's I/O threads
on either side (``core.unix_link`` says what that saves). Nothing to find out first, so no
extra round trip; where the connect fails (another host, another network namespace, an older
coordinator) the client stays on ZeroMQ. An abstract name leaves no file behind, whatever
ends the coordinator. Only processes of the coordinator's own user are accepted.

Each connection gets a client key of its own, so the coordinator answers it as it answers a
ZeroMQ client, by key. A client that goes away is seen at once (end of file) and forgotten;
what was queued for it is dropped, as ZeroMQ drops replies to a gone peer.

Workers answer a local client's jobs themselves (``answer_socket``): the first time a job of a
connection goes to a worker, the coordinator makes a socket pair and passes one end to each of
them; the worker sends the reply there and tells the coordinator only that the job is done. A
call then crosses the coordinator once instead of twice, and the reply does not wait for the
coordinator's turn.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from core.unix_link import LinkClosed, UnixLink, peer

LISTEN_BACKLOG = 128
MESSAGES_PER_TURN = 1000  # from one client per loop turn, so the others and the workers are served between
KEY_PREFIX = b"\x00local:"  # a ZeroMQ peer may name itself so too: the coordinator ignores such a peer

log = logging.getLogger("cohort")


def local_name(address: str) -> str | None:
    """The abstract Unix socket name of the coordinator at ``address`` (ZeroMQ's form), the same
    in the coordinator and its clients; None for an address other hosts can reach."""
    if address.startswith("ipc://"):
        where = "ipc:" + os.path.abspath(address[len("ipc://"):])
    elif address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        if not (host.startswith("127.") or host == "::1"):
            return None
        where = f"tcp:{host}:{port}"
    else:
        return None
    return "\0cohort-" + hashlib.sha256(where.encode()).hexdigest()[:32]


class LocalClients:
    """The listening socket and the connections of local clients, served by the coordinator's loop."""

    def __init__(self, name: str, max_message_bytes: int) -> None:
        self.name = name
        self.max_message_bytes = max_message_bytes  # a client over it is disconnected, as ZeroMQ's MAXMSGSIZE does
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind(name)
            self._listener.listen(LISTEN_BACKLOG)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.listener_fd = self._listener.fileno()
        self._links: dict[bytes, UnixLink] = {}
        self._by_fd: dict[int, bytes] = {}
        self._writing: dict[bytes, UnixLink] = {}  # those whose socket holds back replies
        # Each client's connection number, and the workers it has an answer socket with.
        self._answered_by: dict[bytes, tuple[int, set[int]]] = {}
        self._next = 0
        self.version = 0  # changes whenever a client comes or goes: the loop polls their descriptors anew

    @classmethod
    def open(cls, address: str, max_message_bytes: int) -> LocalClients | None:
        """Listening for local clients of ``address``; None (every client on ZeroMQ) for an address
        other hosts can reach, or where the name is taken (another coordinator on that address)."""
        name = local_name(address)
        if name is None:
            return None
        try:
            return cls(name, max_message_bytes)
        except OSError as exc:
            log.warning("local clients of %s use ZeroMQ: no Unix socket for them (%s)", address, exc)
            return None

    def fds(self) -> list[int]:
        """To poll for reading: the listener and every client."""
        return [self.listener_fd, *self._by_fd] if self.listener_fd >= 0 else list(self._by_fd)

    def writing(self) -> bool:
        """Whether some client's socket holds back replies (``flush`` sends them as it takes them)."""
        return bool(self._writing)

    def writing_fds(self) -> set[int]:
        return {link.fileno() for link in self._writing.values()}

    def receive(self, ready: dict[int, int], on_message: Callable[[bytes, list[Any]], None]) -> None:
        """Accept new clients and hand every message waiting on a ready client to ``on_message``."""
        if self.listener_fd in ready:
            self._accept()
        for fd in [fd for fd in ready if fd in self._by_fd]:
            key = self._by_fd[fd]
            link = self._links[key]
            for _ in range(MESSAGES_PER_TURN):
                try:
                    frames = link.recv()
                except LinkClosed:
                    self._drop(key)
                    break
                if frames is None:
                    break
                on_message(key, frames)

    def owns(self, client: bytes) -> bool:
        return client.startswith(KEY_PREFIX)

    def send(self, client: bytes, frames: list[Any]) -> None:
        """Send (or queue, in order) a reply to a local client; dropped if the client has gone."""
        link = self._links.get(client)
        if link is None:
            return
        try:
            link.send(frames)
        except LinkClosed:
            self._drop(client)
            return
        if link.wants_write:
            self._writing[client] = link

    def key(self, number: int) -> bytes:
        """The client key of connection ``number``."""
        return KEY_PREFIX + str(number).encode()

    def answer_socket(self, client: bytes, worker: int, worker_link: UnixLink) -> int:
        """The tag (``client``'s connection number) of the socket on which ``worker`` answers ``client``
        itself, passed to both now if they have none yet; 0 (the coordinator answers) where none can
        be made or passed at once."""
        answered_by = self._answered_by.get(client)
        if answered_by is None:  # not a local client, or gone
            return 0
        number, workers = answered_by
        if worker in workers:
            return number
        link = self._links[client]
        if link.wants_write or worker_link.wants_write or link.closed or worker_link.closed:
            return 0  # a socket passes only between messages, and these wait to go
        try:
            ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:  # out of descriptors: the coordinator answers
            return 0
        try:
            # The worker's end first: if the client's cannot go, the worker's writes fail (no reader)
            # and it falls back to the coordinator; the other way round, the client would wait on
            # a socket nobody writes to (harmless too, but it holds a descriptor).
            if not worker_link.send_socket(ends[0], number) or not link.send_socket(ends[1], worker):
                return 0
        except LinkClosed:
            return 0  # the worker or the client has gone: each is dropped where that is seen
        finally:
            for end in ends:  # passed ends are duplicates held by the kernel until taken
                end.close()
        workers.add(worker)
        return number

    def forget_worker(self, worker: int) -> None:
        """A worker (re)starts: its clients' answer sockets went with the process before it."""
        for _, workers in self._answered_by.values():
            workers.discard(worker)

    def flush(self) -> None:
        """Send what clients' sockets could not take before, as they take it."""
        for key, link in list(self._writing.items()):
            try:
                if link.flush():
                    del self._writing[key]
            except LinkClosed:
                self._drop(key)

    def close(self) -> None:
        for key in list(self._links):
            self._drop(key)
        self._stop_listening()

    def _stop_listening(self) -> None:
        """Clients waiting to be accepted see their connection end, and go to ZeroMQ."""
        self._listener.close()
        self.listener_fd = -1  # poll skips it
        self.version += 1

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: stop listening, rather than fail every turn
                log.error("local clients use ZeroMQ from now on: a connection could not be accepted (%s)", exc)
                self._stop_listening()
                return
            try:
                pid, uid = peer(sock)
            except OSError as exc:  # the client went between connect and accept
                log.warning("a local client could not be accepted: %s", exc)
                sock.close()
                continue
            if uid != os.geteuid():  # the address may be loopback TCP, open to all; this socket is not
                log.warning("refused a local client of another user (pid %d, uid %d)", pid, uid)
                sock.close()
                continue
            self._next += 1
            key = self.key(self._next)
            link = UnixLink(sock, blocking=False, max_message_bytes=self.max_message_bytes)
            self._links[key] = link
            self._answered_by[key] = (self._next, set())
            self._by_fd[link.fileno()] = key
            self.version += 1

    def _drop(self, key: bytes) -> None:
        link = self._links.pop(key, None)
        self._writing.pop(key, None)
        self._answered_by.pop(key, None)  # each worker closes its end once it sees the client's closed
        if link is not None:
            self._by_fd.pop(link.fileno(), None)
            link.close()
            self.version += 1
