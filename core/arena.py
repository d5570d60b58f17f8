"""Shared-memory arenas: bulk tensors between processes of one machine without the sockets.

A local client puts large inputs into its arena and sends only where they are (``ShmRef``);
the worker reads them there. A worker puts large results into its own arena the same way,
and the client hands them to the caller as tensors over that memory, without a copy: the
bytes are copied once into shared memory by the writer, never by the reader.

An arena is a named shared-memory file (``/dev/shm/cohort-...``, mode 0600). Regions are
taken in the first gap that fits and given back in any order, so one region held for long
never blocks the rest. Its pages are reserved when first used (``posix_fallocate``): a
full ``/dev/shm`` means the region is not used and the tensors go through the socket as
before, never a SIGBUS on the first write.

Each region starts with a header (a state and a sequence number) so that a reader can say
it is done (``released``) and can tell when the writer reclaimed a region before it read it.
A result region names its reader's process: it is held until the reader releases it (its
last tensor over the region is freed) or the reader's process is gone, however long that
takes, since the reader computes on that memory. A region without a reader (a client's
inputs) is given back by its writer when the reply comes, or reclaimed once its call's
deadline is ``reclaim_after_s`` past (a call abandoned while its job may still read it: a
job is never started after its deadline).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from core.bank import shm_dir, unlink_shm
from core.tensors import ShmRef

HEADER = struct.Struct("<QQ")  # state (1 live, 0 released), sequence number
ALIGN = 64
NAME = re.compile(r"^cohort-[0-9A-Za-z-]+-(arena|out)[0-9a-f]*$")
WRITER = re.compile(r"^cohort-(\d+)-")
TORCH_COPY_BYTES = 1 << 20  # tensors this large are copied in with torch
READER_CHECK_S = 1.0  # how often a held region's reader is checked for being alive


@dataclass
class _Region:
    start: int
    end: int
    sequence: int
    until: float  # without a reader: reclaimed by time only after this (its calls' deadlines, and a margin)
    reader: int = 0  # the pid of the process that holds it (0: none; reclaimed by time)
    released: bool = False
    lent: bool = False  # a tensor of the writer's own process (``Arena.lend``)
    uses: int = 0  # lent: calls out that send it


def _freed(region: _Region) -> None:
    """A lent region's tensor is gone (a finalizer, on any thread: it only sets a flag)."""
    region.released = True


class Arena:
    """The writer's side: regions of a shared-memory file it owns."""

    def __init__(self, name: str, size: int, reclaim_after_s: float = 120.0) -> None:
        if not NAME.match(name):
            raise ValueError(f"not an arena name: {name!r}")
        self.name = name
        self.size = size
        self.reclaim_after_s = reclaim_after_s
        path = shm_dir() / name
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self._fd, size)  # sparse: pages are reserved as regions are taken
            self.map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            os.unlink(path)
            raise
        self.view = memoryview(self.map)
        self._bytes = torch.from_numpy(np.frombuffer(self.map, dtype=np.uint8))
        self._base = self._bytes.data_ptr()
        self._lent = 0  # lent regions among the regions
        self._regions: list[_Region] = []  # in address order
        self._reserved = 0  # pages below this are reserved in /dev/shm (they stay: nothing punches holes)
        self._sequence = 0
        self._readers: dict[int, tuple[float, bool]] = {}  # pid -> (when checked, alive)

    def take(self, nbytes: int, reader: int = 0, deadline: float | None = None) -> tuple[int, int] | None:
        """A region of ``nbytes`` (its data offset and sequence number), or None when there is no room.
        ``reader``: the pid of the process the region is for (it is held until that one releases it or is
        gone). ``deadline`` (monotonic): that of the call that sends it, if it is not given back."""
        self._reclaim()
        need = _round(HEADER.size + nbytes)
        at = self._place(need)
        if at is None:
            return None
        index, start = at
        if start + need > self._reserved:
            try:
                os.posix_fallocate(self._fd, self._reserved, start + need - self._reserved)
            except OSError:  # /dev/shm is full: writing would raise SIGBUS
                return None
            self._reserved = start + need
        self._sequence += 1
        self._regions.insert(index, _Region(start, start + need, self._sequence, self._until(deadline), reader))
        HEADER.pack_into(self.view, start, 1, self._sequence)
        return start + HEADER.size, self._sequence

    def give_back(self, offset: int) -> None:
        """The writer's own release (inputs, once the job's reply has come)."""
        for region in self._regions:
            if region.start + HEADER.size == offset:
                if region.lent:
                    region.uses -= 1
                else:
                    region.released = True
                break
        self._reclaim()

    def lend(self, nbytes: int) -> torch.Tensor | None:
        """A region as a uint8 tensor of this process for the caller to fill, or None when there is no
        room. A call that sends it, or a contiguous part of it, sends where it lies (``locate``) instead
        of a copy. The region is reclaimed once the tensor is freed and no call that sends it is out."""
        taken = self.take(nbytes)
        if taken is None:
            return None
        offset, _ = taken
        region = next(r for r in self._regions if r.start + HEADER.size == offset)
        region.lent = True
        self._lent += 1
        owner = np.frombuffer(self.view[offset:offset + nbytes], dtype=np.uint8)  # kept by the tensor's storage
        weakref.finalize(owner, _freed, region)
        return torch.from_numpy(owner)

    def locate(self, data: memoryview, deadline: float | None = None) -> tuple[int, int, int] | None:
        """Where ``data`` lies when it is in a lent region: its offset, the region's sequence number and
        the region's own offset (``give_back`` it when the call is done); None when it lies elsewhere.
        ``deadline``: that of the call that sends it (the region is kept at least that long)."""
        if not self._lent or not data.nbytes:
            return None
        offset = np.frombuffer(data, dtype=np.uint8).ctypes.data - self._base
        if not 0 <= offset < self.size:
            return None
        for region in self._regions:
            if region.lent and region.start + HEADER.size <= offset and offset + data.nbytes <= region.end:
                region.uses += 1
                region.until = max(region.until, self._until(deadline))
                return offset, region.sequence, region.start + HEADER.size
        return None

    def write(self, offset: int, data: memoryview) -> None:
        data = data.cast("B")
        if data.readonly or data.nbytes < TORCH_COPY_BYTES:
            self.view[offset:offset + data.nbytes] = data
        else:  # torch copies with the intra-op threads: faster than one memcpy for large tensors
            self._bytes[offset:offset + data.nbytes].copy_(torch.frombuffer(data, dtype=torch.uint8))

    def held(self) -> int:
        """Regions not yet given back or released."""
        return len(self._regions)

    def _place(self, need: int) -> tuple[int, int] | None:
        """Where a region of ``need`` bytes fits: its index among the regions and its start. The first
        gap that fits, so the memory in use stays low in the file, few pages, and warm."""
        at = 0
        for index, region in enumerate(self._regions):
            if region.start - at >= need:
                return index, at
            at = region.end
        return (len(self._regions), at) if self.size - at >= need else None

    def _until(self, deadline: float | None) -> float:
        return (time.monotonic() if deadline is None else deadline) + self.reclaim_after_s

    def _reclaim(self) -> None:
        now = time.monotonic()
        kept = []
        for region in self._regions:
            state, _ = HEADER.unpack_from(self.view, region.start)
            if region.lent:
                gone = region.released and (region.uses <= 0 or now > region.until)
            else:
                gone = region.released or state == 0 or self._abandoned(region, now)
            if gone:
                HEADER.pack_into(self.view, region.start, 0, 0)  # a late reader sees it is gone
            else:
                kept.append(region)
        self._regions = kept
        self._lent = sum(region.lent for region in kept)
        if len(self._readers) > len(kept):
            readers = {region.reader for region in kept}
            self._readers = {pid: seen for pid, seen in self._readers.items() if pid in readers}

    def _abandoned(self, region: _Region, now: float) -> bool:
        if not region.reader:
            return now > region.until
        checked, alive = self._readers.get(region.reader, (-READER_CHECK_S, True))
        if now - checked >= READER_CHECK_S:
            alive = _alive(region.reader)
            self._readers[region.reader] = (now, alive)
        return not alive

    def close(self) -> None:
        unlink_shm(self.name)
        os.close(self._fd)
        del self._bytes  # its hold on the map
        _unmap(self.map, self.view)


class ArenaReader:
    """The reader's side: other processes' arenas, mapped by name on first use and kept while
    their file is there (``prune``)."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
        self._inodes: dict[str, int] = {}  # which file each map is of: a name may be made again

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
            self.prune()  # a new arena (a new client, a worker's replacement): drop the maps of gone ones
            found = self._maps[name] = (mapping, memoryview(mapping))
            self._inodes[name] = info.st_ino
        return found[1]

    def prune(self, remove_dead: bool = False) -> None:
        """Forget the arenas whose file is gone (closed by their writer, or removed after it died): the
        memory is freed once no tensor over it is left. ``remove_dead``: first remove the arenas of
        clients whose process is gone (one that died without closing it leaves its file behind)."""
        for name in list(self._maps):
            if remove_dead and name.endswith("-arena") and not _alive(_writer_pid(name)):
                unlink_shm(name)
            try:
                gone = os.stat(shm_dir() / name).st_ino != self._inodes[name]
            except OSError:
                gone = True
            if gone:
                self.forget(name)

    def read(self, ref: ShmRef, nbytes: int) -> memoryview:
        """The bytes of one tensor, in place (valid while the writer keeps the region)."""
        view = self._view(ref.arena)
        if ref.offset < HEADER.size or ref.offset + nbytes > view.nbytes:
            raise ValueError(f"arena {ref.arena!r}: bytes {ref.offset}..{ref.offset + nbytes} outside its "
                             f"{view.nbytes} bytes")
        return view[ref.offset:ref.offset + nbytes]

    def hold(self, ref: ShmRef, nbytes: int) -> torch.Tensor:
        """The bytes of one result as a uint8 tensor over the region, without a copy: the region
        is released to its writer when the last tensor over these bytes is freed."""
        region = self.read(ref, nbytes)
        if not nbytes:  # nothing to hold: the region goes back now
            self.release(ref)
            return torch.empty(0, dtype=torch.uint8)
        owner = np.frombuffer(region, dtype=np.uint8)  # the tensor's storage keeps this array alive
        # The map: it outlives a forget. The pid: a forked child's copy of the tensor is not the region's.
        weakref.finalize(owner, _release, self._maps[ref.arena][0], ref, os.getpid())
        return torch.from_numpy(owner)

    def current(self, ref: ShmRef) -> bool:
        """Whether the region is still the one ``ref`` names (the writer has not reclaimed it)."""
        state, sequence = HEADER.unpack_from(self._view(ref.arena), ref.offset - HEADER.size)
        return state == 1 and sequence == ref.sequence

    def release(self, ref: ShmRef) -> None:
        """Tell the writer a result region is read: it may reuse it."""
        self._view(ref.arena)
        _release(self._maps[ref.arena][0], ref)

    def mapped(self) -> list[str]:
        return sorted(self._maps)

    def forget(self, name: str) -> None:
        self._inodes.pop(name, None)
        found = self._maps.pop(name, None)
        if found is not None:
            _unmap(*found)

    def close(self) -> None:
        for name in list(self._maps):
            self.forget(name)


def shm_identity() -> str:
    """Which shared memory and which processes this process sees: the ``/dev/shm`` file system
    and the pid namespace. Two processes may use each other's arenas only when these agree
    (a client in another container may reach the coordinator over loopback and still see
    another ``/dev/shm``, or other pids). Empty where it cannot be told."""
    try:
        shm = os.stat(shm_dir())
        pids = os.stat("/proc/self/ns/pid")
        with open("/proc/sys/kernel/random/boot_id") as f:  # two hosts' /dev/shm and pid inodes may agree
            boot = f.read().strip()
    except OSError:
        return ""
    return f"{boot}:{shm.st_dev}:{shm.st_ino}:{pids.st_ino}:{os.geteuid()}"  # the user: arenas are 0600


def _release(mapping: mmap.mmap, ref: ShmRef, pid: int = 0) -> None:
    if mapping.closed or pid and pid != os.getpid():  # a finalizer a forked child inherited: not its region
        return
    state, sequence = HEADER.unpack_from(mapping, ref.offset - HEADER.size)
    if state == 1 and sequence == ref.sequence:  # still ours: a reclaimed region is someone else's now
        HEADER.pack_into(mapping, ref.offset - HEADER.size, 0, sequence)


def _writer_pid(name: str) -> int:
    """The pid in an arena's name (``cohort-<pid>-...``): its client's, or its coordinator's; 0
    (which ``_alive`` takes for alive) for a name without one."""
    match = WRITER.match(name)
    return int(match.group(1)) if match else 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return pid == 0  # 0: no pid to check (kept); a negative one names no process
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process of that pid: alive as far as we can tell
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """Whether ``pid`` is a process that has exited but was not yet waited for (a zombie): it still
    answers ``kill(pid, 0)``, and would hold its regions until its parent reaps it, or for ever."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]  # the name before it may hold anything
        # A main thread that exited while others run shows as a zombie too: the process lives on.
        return state in (b"Z", b"X") and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (OSError, IndexError):
        return False  # no /proc here, or it went between the two looks (then the next look says so)


def _unmap(mapping: mmap.mmap, view: memoryview) -> None:
    """Unmap now, or, while tensors still use the memory, when the last of them goes."""
    try:
        view.release()
        mapping.close()
    except BufferError:
        pass


def _round(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
