"""What the coordinator's loop waits on: one poll object over the client socket's descriptor, the
live worker links and the local clients, made again only when those change (not every turn).

A link whose socket could not take a whole message keeps the rest (``core.unix_link``); it is
polled for writing too until it has sent it, so a large message moves as fast as its reader
takes it, whatever the kernel's socket buffer (208 KiB by default), and an idle loop still sleeps.
"""

from __future__ import annotations

import select
import time
from typing import Any

from scheduler.local_clients import LocalClients
from scheduler.workerpool import WorkerHandle, flush_links, writing

SHUTDOWN_FLUSH_S = 1.0  # at shutdown, how long the workers' kept messages (their Shutdown) may take to go


class LoopPoll:
    def __init__(self, frontend_fd: int, workers: list[WorkerHandle], local: LocalClients | None) -> None:
        self.frontend_fd = frontend_fd
        self.workers = workers
        self.local = local
        self._poll = select.poll()
        self._polled: tuple[Any, ...] = ()
        self._writing: set[int] = set()
        self._notices: tuple[int, ...] = ()  # the workers' notice sockets, polled while something awaits them
        self._awaiting = False

    def wait(self, timeout_ms: int, awaiting: bool = False) -> dict[int, int]:
        """Wait up to ``timeout_ms``; the ready descriptors and their events. The workers' notices wake it
        only while ``awaiting`` (something waits for a job to finish)."""
        links = tuple(w.link for w in self.workers if w.link is not None and not w.link.closed)
        polled = (links, self.local.version if self.local is not None else 0)
        if polled != self._polled:
            self._polled = polled
            self._poll = select.poll()
            for fd in (self.frontend_fd, *(link.fileno() for link in links),
                       *(self.local.fds() if self.local is not None else ())):
                if fd >= 0:  # the client socket before it is bound
                    self._poll.register(fd, select.POLLIN)
            self._writing = set()
            self._notices = tuple(w.notices.fileno() for w in self.workers if w.notices is not None
                                  and not w.notices.closed and w.link in links)
            for fd in self._notices:
                self._poll.register(fd, select.POLLIN if awaiting else 0)
            self._awaiting = awaiting
        elif awaiting != self._awaiting:
            self._awaiting = awaiting
            for fd in self._notices:
                self._poll.modify(fd, select.POLLIN if awaiting else 0)
        if self._writing or writing(self.workers) or self.local is not None and self.local.writing():
            self._poll_writes(links)
        return dict(self._poll.poll(timeout_ms))

    def flush(self) -> None:
        """Send, in order, what a worker's or a local client's socket could not take before."""
        if self.local is not None:
            self.local.flush()
        flush_links(self.workers)

    def drain(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
        """At shutdown: send what the workers' links keep (each its ``Shutdown`` last) while they read."""
        deadline = time.monotonic() + timeout_s
        while writing(self.workers) and (left := deadline - time.monotonic()) > 0:
            flush_links(self.workers)
            writable = select.poll()  # for writing alone: what waits to be read would wake it at once
            for w in self.workers:
                if w.link is not None and w.link.wants_write and not w.link.closed:
                    writable.register(w.link.fileno(), select.POLLOUT)
            writable.poll(min(10, int(left * 1000) + 1))

    def _poll_writes(self, links: tuple[Any, ...]) -> None:
        wanted = {link.fileno() for link in links if link.wants_write}
        if self.local is not None:
            wanted |= self.local.writing_fds()
        for fd in self._writing - wanted:
            self._poll.modify(fd, select.POLLIN)
        for fd in wanted - self._writing:
            self._poll.modify(fd, select.POLLIN | select.POLLOUT)
        self._writing = wanted
