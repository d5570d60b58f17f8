"""Messages of frames over a Unix ``SOCK_SEQPACKET`` socket: cohort's link between two processes
of one host (the coordinator and each worker; a local client and the coordinator).

Why not ZeroMQ here: ZeroMQ hands every message to an I/O thread on each side, so a hop wakes
four threads where a plain socket wakes two. Three Python processes relaying a small message
and back (client, relay, echo) take 0.09 ms over these sockets against 0.26 ms over ZeroMQ
``ipc://`` on a 2-core machine (``tools/bench_relay.py``; the README has the run). A ``SOCK_SEQPACKET`` socket keeps each record whole and in order and says when the
peer has gone (end of file), which is all a link between two local processes needs.

On the wire a message is ``<payload bytes: Q><frames: I><one Q length per frame><frames...>``,
cut into records of at most ``RECORD_BYTES``; one writer per socket, so the records of one
message come in order and unbroken. A link is used by one thread at a time.

Between messages, a link may pass a socket to the other end (``send_socket``): one record of
its header alone, whose frame count is ``PASSED_SOCKET`` and whose payload length is a tag
the two ends agree on, with the descriptor attached (``SCM_RIGHTS``). Only an end made with
``takes_sockets`` keeps such a socket (``take_sockets``); any other end's kernel closes it.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

RECORD_BYTES = 64 * 1024  # a record must fit the socket's send buffer (208 KiB by default on Linux)
SOCKET_BUFFER_BYTES = 4 << 20  # asked for; the kernel caps it at net.core.wmem_max / rmem_max
_HEAD = struct.Struct("<QI")
PASSED_SOCKET = 0xFFFFFFFF  # a header's frame count that marks a passed socket: no message has so many frames
_FDS_SPACE = socket.CMSG_SPACE(4 * 4)  # room for a few descriptors: more than one is a broken rule
# Plain ints: the socket module's flags are enum members, and combining those costs a call each time.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_PEER = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
_LENGTHS: dict[int, struct.Struct] = {}


class LinkClosed(ConnectionError):
    """The process at the other end has closed the link or gone, or broke its rules (a message
    over the bound, or one that does not add up): the link is closed either way."""


def peer(sock: socket.socket) -> tuple[int, int]:
    """The pid and user id of the process at the other end of a connected Unix socket."""
    pid, uid, _ = _PEER.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER.size))
    return pid, uid


def _lengths(count: int) -> struct.Struct:
    packer = _LENGTHS.get(count)
    if packer is None:
        packer = struct.Struct(f"<{count}Q")
        if count <= 64:  # the common counts, kept; a peer cannot grow the cache without bound
            _LENGTHS[count] = packer
    return packer


def _message(frames: Sequence[Any]) -> tuple[bytes, list[memoryview], int]:
    """A message's header, its frames as byte views, and its length on the wire."""
    views = [memoryview(f).cast("B") for f in frames]
    sizes = [v.nbytes for v in views]
    payload = sum(sizes)
    head = _HEAD.pack(payload, len(sizes)) + _lengths(len(sizes)).pack(*sizes)
    return head, views, len(head) + payload


def _records(parts: list[memoryview], limit: int) -> Iterator[list[memoryview]]:
    """``parts`` cut into records of at most ``limit`` bytes (the last may be shorter)."""
    record: list[memoryview] = []
    room = limit
    for part in parts:
        while part.nbytes:
            piece = part[:room]
            record.append(piece)
            room -= piece.nbytes
            part = part[piece.nbytes:]
            if not room:
                yield record
                record, room = [], limit
    if record:
        yield record


class UnixLink:
    """One end of a link. ``blocking`` ends wait in ``send`` until the socket takes the message;
    the others never wait: what the socket cannot take now is kept, in order, until ``flush``
    (call it when the socket is writable: ``wants_write``)."""

    def __init__(self, sock: socket.socket, blocking: bool, max_message_bytes: int | None = None,
                 takes_sockets: bool = False) -> None:
        self.sock = sock
        self.max_message_bytes = max_message_bytes  # a longer message closes the link (None: no bound)
        self.blocking = blocking
        sock.setblocking(blocking)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:
                pass  # the default buffer still holds a record
        self.closed = False
        # What the socket cannot take now is copied, as the caller may reuse its buffers once
        # ``send`` returns; an owner that flushes everything before it lets go of them sets False.
        self.copy_unsent = True
        self._fd = sock.fileno()
        self._scratch = bytearray(RECORD_BYTES)
        self._scratch_view = memoryview(self._scratch)
        self._unsent: deque[list[bytes]] = deque()
        self._partial: memoryview | None = None  # a message whose records are still coming
        self._filled = 0
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self.takes_sockets = takes_sockets
        self._taken: list[tuple[int, socket.socket]] = []  # passed sockets not yet taken, with their tags

    @classmethod
    def pair(cls, blocking: bool) -> tuple[UnixLink, socket.socket]:
        """A link end here and the other end's socket, to hand to a child process (``pass_fds``)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(mine, blocking), theirs

    @classmethod
    def connect(cls, path: str, blocking: bool, timeout_s: float = 5.0, takes_sockets: bool = False) -> UnixLink:
        """A link to the listener at ``path``, refused (``PermissionError``) unless a process of this
        user listens there: an abstract name has no permissions, so anyone could have taken it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
            pid, uid = peer(sock)
            if uid != os.geteuid():
                raise PermissionError(f"{path!r} is held by another user's process (pid {pid}, uid {uid})")
        except OSError:
            sock.close()
            raise
        return cls(sock, blocking, takes_sockets=takes_sockets)

    def fileno(self) -> int:
        return self._fd

    @property
    def wants_write(self) -> bool:
        """Whether messages wait for the socket to take them."""
        return bool(self._unsent)

    # ------------------------------------------------------------------ out

    def send(self, frames: Sequence[Any]) -> None:
        """Send one message of ``frames`` (any buffers), or keep it to send in order; raises
        ``LinkClosed`` when the other end has gone."""
        if self.closed:
            raise LinkClosed("link closed")
        head, views, total = _message(frames)
        if total <= RECORD_BYTES:
            records: Any = ([memoryview(head), *views],)
        else:
            records = _records([memoryview(head), *views], RECORD_BYTES)
        for record in records:
            if self._unsent or not self._send_record(record):
                self._unsent.append([bytes(piece) for piece in record] if self.copy_unsent else record)

    def send_now(self, frames: Sequence[Any]) -> bool:
        """Send one message that fits one record, if the socket takes it now; False (nothing sent, nothing
        kept) if it does not fit, or messages wait to go, or the socket is full. Raises ``LinkClosed``."""
        if self.closed:
            raise LinkClosed("link closed")
        if self._unsent:
            return False
        head, views, total = _message(frames)
        return total <= RECORD_BYTES and self._send_record([head, *views])

    def flush(self) -> bool:
        """Send what was kept while the socket takes it; True when nothing is left."""
        while self._unsent:
            if not self._send_record(self._unsent[0]):
                return False
            self._unsent.popleft()
        return True

    def send_socket(self, sock: socket.socket, tag: int) -> bool:
        """Pass ``sock`` (a duplicate of its descriptor) to the other end, with ``tag``; only now, between
        messages: False, and nothing passed, if messages wait to go or the socket cannot take it now."""
        if self.closed:
            raise LinkClosed("link closed")
        if self._unsent:
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))]
        try:
            self.sock.sendmsg([_HEAD.pack(tag, PASSED_SOCKET)], rights, _DONTWAIT)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.closed = True
            raise LinkClosed(str(exc)) from exc

    def take_sockets(self) -> list[tuple[int, socket.socket]]:
        """The sockets passed to this end so far (``takes_sockets``), each with its tag; the caller owns them."""
        taken, self._taken = self._taken, []
        return taken

    def _send_record(self, record: list[Any]) -> bool:
        try:
            self.sock.sendmsg(record)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # EPIPE, ECONNRESET: the other end has gone
            self.closed = True
            raise LinkClosed(str(exc)) from exc

    # ------------------------------------------------------------------ in

    def recv(self) -> list[memoryview] | None:
        """The frames of the next whole message, or None when none has come whole yet (without
        waiting on a non-blocking link). Raises ``LinkClosed`` when the other end has gone."""
        while True:
            if self._partial is None:
                count = self._recv_into(self._scratch_view)
                if count is None:
                    return None
                if count == _HEAD.size and _HEAD.unpack_from(self._scratch)[1] == PASSED_SOCKET:
                    continue  # a passed socket's record: its descriptor is kept by _recv_into
                total = self._check_head(count)
                if count == total:
                    return self._frames(self._scratch[:count])
                # Not bytearray(total): zeroing a fresh 16 MB costs milliseconds (a page fault per page,
                # then the fill) before the records overwrite it anyway.
                self._partial = memoryview(np.empty(total, np.uint8)).cast("B")
                self._partial[:count] = self._scratch_view[:count]
                self._filled = count
                continue
            view = self._partial[self._filled:]
            count = self._recv_into(view[:RECORD_BYTES])
            if count is None:
                return None
            self._filled += count
            if self._filled == len(self._partial):
                message, self._partial = self._partial, None
                return self._frames(message)

    def _recv_into(self, view: memoryview) -> int | None:
        if self.closed:
            raise LinkClosed("link closed")
        flags = 0 if self.blocking and self._partial is not None else _DONTWAIT
        try:
            try:
                count = self._receive(view, flags)
            except ConnectionResetError:  # the peer went with our messages unread: said once, and what it
                count = self._receive(view, flags)  # sent before it went is still there to read
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self.closed = True
            raise LinkClosed(str(exc)) from exc
        if count == 0:  # no record is empty: this is the end
            self.closed = True
            raise LinkClosed("the other end closed the link")
        return count

    def _receive(self, view: memoryview, flags: int) -> int:
        if not self.takes_sockets:  # the kernel closes any descriptor passed to it
            return self.sock.recv_into(view, 0, flags)
        count, ancillary, _, _ = self.sock.recvmsg_into([view], _FDS_SPACE, flags | _CLOEXEC)
        if ancillary:
            self._keep_passed(view, count, ancillary)
        return count

    def _keep_passed(self, view: memoryview, count: int, ancillary: list[tuple[int, int, bytes]]) -> None:
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        socks = [socket.socket(fileno=fd) for fd in fds]
        head = _HEAD.unpack_from(view) if count == _HEAD.size else None
        if head is None or head[1] != PASSED_SOCKET or len(socks) != 1:
            for sock in socks:
                sock.close()
            if head is not None and head[1] == PASSED_SOCKET:
                self._broken(f"a passed socket's record with {len(socks)} descriptors")
            return  # descriptors on a message's record: not asked for, closed
        self._taken.append((head[0], socks[0]))

    def _check_head(self, count: int) -> int:
        """The length of the message whose first record (``count`` bytes) is in the scratch buffer."""
        if count < _HEAD.size:
            self._broken(f"a record of {count} bytes cannot start a message")
        payload, nframes = _HEAD.unpack_from(self._scratch)
        total = _HEAD.size + 8 * nframes + payload
        if self.max_message_bytes is not None and total > self.max_message_bytes:
            self._broken(f"a message of {total} bytes, over the bound of {self.max_message_bytes}")
        if count > total:
            self._broken(f"a first record of {count} bytes for a message of {total}")
        return total

    def _broken(self, what: str) -> None:
        self.closed = True
        self.sock.close()
        raise LinkClosed(f"the other end broke the link's rules: {what}")

    def _frames(self, message: bytearray | memoryview) -> list[memoryview]:
        nframes = _HEAD.unpack_from(message)[1]
        sizes = _lengths(nframes).unpack_from(message, _HEAD.size)
        if sum(sizes) != len(message) - _HEAD.size - 8 * nframes:
            self._broken("frame lengths that do not add up to the message")
        view = memoryview(message)
        frames = []
        at = _HEAD.size + 8 * nframes
        for size in sizes:
            frames.append(view[at:at + size])
            at += size
        return frames

    def wait(self, timeout_ms: int | None) -> bool:
        """Wait until a record can be read (or the link has ended); False on timeout."""
        return bool(self._poller.poll(timeout_ms))

    def close(self) -> None:
        """Close this end; a thread waiting on it in ``wait`` wakes (a plain close would leave it asleep)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected, or already shut
        self.sock.close()
        for _, passed in self.take_sockets():  # passed here and never taken: nobody else holds them
            passed.close()
