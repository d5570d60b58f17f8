"""Weight banks: one contiguous buffer per group per worker, shared with the coordinator.

Each per-model entry ``name`` of shape ``S`` (parameters, buffers, optimizer state)
is one tensor ``[K, *S]`` inside the buffer, so model ``k``'s parameter is the
contiguous view ``bank[name][k]``: per-model calls take the views, fused calls take
the whole stacked tensors, and nothing is copied.

On the CPU the buffer is a named shared-memory file (``/dev/shm``), opened by name.
On a GPU it is device memory exported through CUDA IPC (``core.cuda_ipc``).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import torch

from core.cuda_ipc import CudaIpcHandle, export_cuda, open_cuda
from core.spec import EntrySpec
from core.tensors import DTYPES

ALIGN = 256  # bytes; keeps every entry aligned for vectorised CPU and CUDA kernels


def shm_dir() -> Path:
    """Where named CPU banks live: ``/dev/shm`` on Linux, else the temp dir."""
    path = Path("/dev/shm")
    return path if path.is_dir() else Path(tempfile.gettempdir())


class BankHandle(msgspec.Struct, array_like=True, frozen=True):
    """How another process maps a worker's bank: a shared-memory name or a CUDA IPC handle."""

    group: str
    kind: Literal["shm", "cuda"]
    nbytes: int
    count: int
    shm_name: str = ""
    cuda: CudaIpcHandle | None = None


@dataclass(frozen=True)
class Slot:
    entry: EntrySpec
    offset: int
    nbytes: int  # for all K models


@dataclass(frozen=True)
class BankLayout:
    """Where each entry sits in the buffer for ``count`` models."""

    count: int
    slots: dict[str, Slot]
    nbytes: int


def bank_layout(entries: list[EntrySpec], count: int) -> BankLayout:
    """The one layout both the worker and the coordinator derive from the definition."""
    slots: dict[str, Slot] = {}
    offset = 0
    for entry in entries:
        numel = 1
        for d in entry.shape:
            numel *= d
        nbytes = count * numel * DTYPES[entry.dtype].itemsize
        slots[entry.name] = Slot(entry, offset, nbytes)
        offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    return BankLayout(count, slots, max(offset, ALIGN))


class Bank:
    """The stacked tensors of one group's models on one worker, over one shared buffer."""

    def __init__(self, handle: BankHandle, layout: BankLayout, raw: torch.Tensor, owner: bool) -> None:
        self.handle = handle
        self.layout = layout
        self.owner = owner
        self._raw = raw
        self.tensors: dict[str, torch.Tensor] = {}
        for name, slot in layout.slots.items():
            dtype = DTYPES[slot.entry.dtype]
            flat = raw[slot.offset : slot.offset + slot.nbytes].view(dtype)
            self.tensors[name] = flat.view((layout.count, *slot.entry.shape))

    @property
    def device(self) -> torch.device:
        return self._raw.device

    @property
    def raw(self) -> torch.Tensor:
        """The whole buffer as bytes: what a bulk copy between a bank and its host copy moves."""
        return self._raw

    def entries(self, everything: bool) -> list[str]:
        """Parameters and buffers (what ``get_weights`` returns), or every entry (optimizer state too)."""
        roles = ("param", "buffer", "state") if everything else ("param", "buffer")
        return [n for n, s in self.layout.slots.items() if s.entry.role in roles]

    def role(self, role: str) -> dict[str, torch.Tensor]:
        """The entries of one role (``param``, ``buffer``, ``state``), in definition order."""
        return {n: self.tensors[n] for n, s in self.layout.slots.items() if s.entry.role == role}

    def model_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Model ``slot``'s parameters and buffers as views (what ``get_weights`` returns)."""
        return {
            n: self.tensors[n][slot] for n, s in self.layout.slots.items() if s.entry.role in ("param", "buffer")
        }

    def reset_optimizer_state(self, slot: int) -> None:
        for name in self.role("state"):
            self.tensors[name][slot].zero_()

    @classmethod
    def create(cls, group: str, entries: list[EntrySpec], count: int, device: torch.device, shm_name: str) -> Bank:
        """Allocate a zeroed bank on ``device`` and make it shareable."""
        layout = bank_layout(entries, count)
        if device.type == "cuda":
            raw = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
            handle = BankHandle(group, "cuda", layout.nbytes, count, cuda=export_cuda(raw))
        else:
            raw = _create_shm(shm_name, layout.nbytes)
            handle = BankHandle(group, "shm", layout.nbytes, count, shm_name=shm_name)
        return cls(handle, layout, raw, owner=True)

    @classmethod
    def open(cls, handle: BankHandle, entries: list[EntrySpec]) -> Bank:
        """Map another process's bank; the exporting process must outlive this mapping."""
        layout = bank_layout(entries, handle.count)
        if layout.nbytes != handle.nbytes:
            raise ValueError(f"bank {handle.group!r}: layout needs {layout.nbytes} bytes, handle says {handle.nbytes}")
        if handle.kind == "cuda":
            assert handle.cuda is not None
            raw = open_cuda(handle.cuda, handle.nbytes)
        else:
            raw = _open_shm(handle.shm_name, handle.nbytes)
        return cls(handle, layout, raw, owner=False)

    def close(self) -> None:
        """Drop this process's views; the owner also removes the shared-memory name."""
        self.tensors = {}
        self._raw = torch.empty(0, dtype=torch.uint8)
        if self.owner and self.handle.kind == "shm":
            unlink_shm(self.handle.shm_name)


# --------------------------------------------------------------------------- CPU: named shared memory


def _map(fd: int, nbytes: int) -> torch.Tensor:
    mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # The tensor keeps the mapping alive; the file descriptor is not needed after mmap.
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _create_shm(name: str, nbytes: int) -> torch.Tensor:
    path = shm_dir() / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return _map(fd, nbytes)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _open_shm(name: str, nbytes: int) -> torch.Tensor:
    if "/" in name or not name:
        raise ValueError(f"invalid shared-memory name {name!r}")
    fd = os.open(shm_dir() / name, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < nbytes:
            raise ValueError(f"shared memory {name!r} is smaller than {nbytes} bytes")
        return _map(fd, nbytes)
    finally:
        os.close(fd)


def unlink_shm(name: str) -> None:
    try:
        os.unlink(shm_dir() / name)
    except FileNotFoundError:
        pass


def leftover_shm(prefix: str) -> list[str]:
    """Shared-memory names that start with ``prefix`` (what a clean shutdown must leave: none)."""
    if not prefix.startswith("cohort-"):  # never a pattern that could match another program's memory
        raise ValueError(f"not a cohort shared-memory prefix: {prefix!r}")
    return sorted(p.name for p in shm_dir().glob(f"{prefix}*"))


