"""CUDA IPC: device memory of one process mapped by another on the same machine.

PyTorch has no public API for that: this module is the one place that calls
``UntypedStorage._share_cuda_`` and ``UntypedStorage._new_shared_cuda`` (as
``torch/multiprocessing/reductions.py`` does), so a torch upgrade that changes them breaks
here, loudly, under a GPU test. Two users: a worker's weight banks (``core.bank``), and a
local client's CUDA tensors sent to a worker in place (``CudaRef``).

The exporting process must keep the memory alive while anyone maps it. torch helps on the
way out: a storage exported with ``_share_cuda_`` is not reused by its caching allocator
until every process that opened it has let it go (the "ref counter" fields).
"""

from __future__ import annotations

import msgspec
import torch


class CudaIpcHandle(msgspec.Struct, array_like=True, frozen=True):
    """The fields ``UntypedStorage._share_cuda_()`` gives, as plain values."""

    device: int
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class CudaRef(msgspec.Struct, array_like=True, frozen=True):
    """Where one tensor of a local client lies on a GPU: its storage's IPC handle, the GPU's UUID
    (device indices differ between processes that see different ``CUDA_VISIBLE_DEVICES``) and the
    tensor's byte offset in the storage."""

    handle: CudaIpcHandle
    gpu: str
    offset: int


def export_cuda(raw: torch.Tensor) -> CudaIpcHandle:
    """The IPC fields of ``raw``'s storage; the caller keeps ``raw`` alive while anyone maps it.

    The caching allocator may place the storage inside a larger block: the handle names
    the block and ``storage_offset`` says where the storage starts in it.
    """
    storage = raw.untyped_storage()
    (device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = storage._share_cuda_()
    return CudaIpcHandle(
        device=int(device),
        handle=bytes(handle),
        storage_size=int(size),
        storage_offset=int(offset),
        ref_counter_handle=bytes(ref_handle),
        ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle) if event_handle else b"",
        event_sync_required=bool(event_sync),
    )


def open_cuda(h: CudaIpcHandle, nbytes: int) -> torch.Tensor:
    """Map an exported storage as a uint8 tensor of its first ``nbytes`` on device ``h.device`` of
    this process."""
    if h.storage_size < nbytes:
        raise ValueError(f"CUDA IPC storage of {h.storage_size} bytes is smaller than the {nbytes} bytes asked")
    torch.cuda.init()
    storage = torch.UntypedStorage._new_shared_cuda(
        h.device,
        h.handle,
        h.storage_size,
        h.storage_offset,
        h.ref_counter_handle,
        h.ref_counter_offset,
        h.event_handle,  # bytes, always: torch checks PyBytes here
        h.event_sync_required,
    )
    raw = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", h.device))
    raw.set_(storage, 0, (storage.nbytes(),), (1,))
    return raw[:nbytes]


def normal_uuid(uuid: str) -> str:
    """A GPU UUID as torch and NVML both can write it (NVML prefixes ``GPU-``): lower case, no prefix."""
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


def gpu_uuid(index: int) -> str:
    """The UUID of this process's GPU ``index``: the same for every process that sees that GPU."""
    return normal_uuid(str(torch.cuda.get_device_properties(index).uuid))


def export_tensor(t: torch.Tensor) -> tuple[CudaRef, torch.Tensor]:
    """A CUDA tensor's reference for another process, and the tensor the caller keeps alive until that
    process is done with it (``t`` itself when contiguous, else a contiguous copy). Waits for the
    current stream first, as ``.cpu()`` would: the other process reads what is written by then."""
    if t.requires_grad:
        t = t.detach()
    t = t.contiguous()
    if not t.numel():
        raise ValueError("an empty tensor has no device memory to share")
    torch.cuda.current_stream(t.device).synchronize()
    handle = export_cuda(t)
    return CudaRef(handle, gpu_uuid(t.device.index), t.storage_offset() * t.element_size()), t


def open_bytes(ref: CudaRef, nbytes: int, devices: dict[str, int]) -> torch.Tensor:
    """A client's tensor's ``nbytes`` bytes as a uint8 tensor mapped in place on this process's index of
    its GPU. ``devices``: GPU UUID to index here (``visible_gpus``); ``ValueError`` when that GPU is not
    visible to this process, ``RuntimeError`` (torch's) when the handle cannot be opened."""
    index = devices.get(normal_uuid(ref.gpu))
    if index is None:
        raise ValueError(f"the client's GPU {ref.gpu} is not visible to this process")
    handle = msgspec.structs.replace(ref.handle, device=index)
    return open_cuda(handle, ref.offset + nbytes)[ref.offset:]


def release_unopened(ref: CudaRef, device: int) -> None:
    """Give back the share a reference counts on its client's memory without mapping it: each export
    counts one reader, which frees its count when its mapping goes; until then torch keeps the client's
    memory out of reuse, for good if nobody ever maps it."""
    torch.UntypedStorage._release_ipc_counter(ref.handle.ref_counter_handle, ref.handle.ref_counter_offset,
                                              device=device)


def visible_gpus() -> dict[str, int]:
    """GPU UUID to device index, for the GPUs this process sees."""
    return {gpu_uuid(i): i for i in range(torch.cuda.device_count())}
