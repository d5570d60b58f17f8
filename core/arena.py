"""Shared-memory arenas: bulk tensors between processes of one machine without the sockets.

A local client puts large inputs into its arena and sends only where they are (``ShmRef``);
the worker reads them there. A worker puts large results into its own arena the same way,
and the client copies them out. Only descriptors cross the sockets: the bytes are copied
once into shared memory and once out of it.

An arena is a named shared-memory file (``/dev/shm/cohort-...``, mode 0600) used as a
ring: regions are taken at the head and given back in any order; the tail moves past
given-back regions. A region the writer cannot place (the ring is full) is simply not
used: the tensors go through the socket as before. Each region starts with a header
(a state and a sequence number) so that a reader of a result can say it is done
(``released``) and can tell when the writer reclaimed the region before it finished
reading (a reader that died, or took longer than ``reclaim_after_s``); reclaiming never
waits for a reader.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
from collections import deque
from dataclasses import dataclass

from core.bank import shm_dir, unlink_shm
from core.tensors import ShmRef

HEADER = struct.Struct("<QQ")  # state (1 live, 0 released), sequence number
ALIGN = 64
NAME = re.compile(r"^cohort-[0-9A-Za-z-]+-(arena|out)[0-9a-f]*$")


@dataclass
class _Region:
    start: int
    end: int
    sequence: int
    taken: float
    released: bool = False


class Arena:
    """The writer's side: a ring of regions in a shared-memory file it owns."""

    def __init__(self, name: str, size: int, reclaim_after_s: float = 120.0) -> None:
        if not NAME.match(name):
            raise ValueError(f"not an arena name: {name!r}")
        self.name = name
        self.size = size
        self.reclaim_after_s = reclaim_after_s
        path = shm_dir() / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: pages are allocated when first written
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self.map)
        self._regions: deque[_Region] = deque()
        self._head = 0
        self._sequence = 0

    def take(self, nbytes: int) -> tuple[int, int] | None:
        """A region of ``nbytes`` (its data offset and sequence number), or None when the ring is full."""
        self._reclaim()
        need = _round(HEADER.size + nbytes)
        start = self._place(need)
        if start is None:
            return None
        self._sequence += 1
        self._regions.append(_Region(start, start + need, self._sequence, time.monotonic()))
        HEADER.pack_into(self.view, start, 1, self._sequence)
        self._head = start + need
        return start + HEADER.size, self._sequence

    def give_back(self, offset: int) -> None:
        """The writer's own release (inputs, once the job's reply has come)."""
        for region in self._regions:
            if region.start + HEADER.size == offset:
                region.released = True
                break
        self._reclaim()

    def write(self, offset: int, data: memoryview) -> None:
        self.view[offset:offset + data.nbytes] = data.cast("B")

    def _place(self, need: int) -> int | None:
        if need > self.size:
            return None
        if not self._regions:
            self._head = 0
            return 0
        tail = self._regions[0].start
        if self._head >= tail:  # free space is [head, size) and [0, tail)
            if self.size - self._head >= need:
                return self._head
            return 0 if tail >= need else None
        return self._head if tail - self._head >= need else None

    def _reclaim(self) -> None:
        now = time.monotonic()
        while self._regions:
            region = self._regions[0]
            state, _ = HEADER.unpack_from(self.view, region.start)
            if region.released or state == 0 or now - region.taken > self.reclaim_after_s:
                self._regions.popleft()
                HEADER.pack_into(self.view, region.start, 0, 0)  # a late reader sees it is gone
            else:
                break

    def close(self) -> None:
        unlink_shm(self.name)
        _unmap(self.map, self.view)


class ArenaReader:
    """The reader's side: other processes' arenas, mapped by name on first use and kept."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}

    def _view(self, name: str) -> memoryview:
        found = self._maps.get(name)
        if found is None:
            if not NAME.match(name):
                raise ValueError(f"not an arena name: {name!r}")
            fd = os.open(shm_dir() / name, os.O_RDWR)
            try:
                info = os.fstat(fd)
                if info.st_uid != os.getuid():  # only a process of this user may hand us memory
                    raise PermissionError(f"arena {name!r} belongs to another user")
                mapping = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            found = self._maps[name] = (mapping, memoryview(mapping))
        return found[1]

    def read(self, ref: ShmRef, nbytes: int) -> memoryview:
        """The bytes of one tensor, in place (valid while the writer keeps the region)."""
        view = self._view(ref.arena)
        if ref.offset < HEADER.size or ref.offset + nbytes > view.nbytes:
            raise ValueError(f"arena {ref.arena!r}: bytes {ref.offset}..{ref.offset + nbytes} outside its "
                             f"{view.nbytes} bytes")
        return view[ref.offset:ref.offset + nbytes]

    def current(self, ref: ShmRef) -> bool:
        """Whether the region is still the one ``ref`` names (the writer has not reclaimed it)."""
        state, sequence = HEADER.unpack_from(self._view(ref.arena), ref.offset - HEADER.size)
        return state == 1 and sequence == ref.sequence

    def release(self, ref: ShmRef) -> None:
        """Tell the writer a result region is read: it may reuse it."""
        view = self._view(ref.arena)
        state, sequence = HEADER.unpack_from(view, ref.offset - HEADER.size)
        if state == 1 and sequence == ref.sequence:
            HEADER.pack_into(view, ref.offset - HEADER.size, 0, sequence)

    def forget(self, name: str) -> None:
        found = self._maps.pop(name, None)
        if found is not None:
            _unmap(*found)

    def close(self) -> None:
        for name in list(self._maps):
            self.forget(name)


def _unmap(mapping: mmap.mmap, view: memoryview) -> None:
    """Unmap now, or, while tensors still use the memory, when the last of them goes."""
    try:
        view.release()
        mapping.close()
    except BufferError:
        pass


def _round(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
