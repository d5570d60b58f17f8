"""Tensors on the wire: a header per tensor (dtype, shape) and its raw bytes as a buffer.

This module and ``core.codec`` are the only places that know how tensor bytes travel.
A ``TensorTree`` describes a tensor, a tuple of tensors or a dict of named tensors;
``encode_tensors`` splits a value into that header and zero-copy buffers (or, for a local
client's large tensors, references into shared memory or CUDA IPC: ``to_arena``, ``to_cuda_refs``),
``decode_tensors`` rebuilds it (in page-locked memory for a GPU) after checking every size against the
header, and ``slice_rows``/``join_rows`` cut and join stacked tensors as bytes, so the
coordinator never decodes a tensor it only forwards.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import msgspec
import numpy as np
import torch

from core.cuda_ipc import CudaRef, export_tensor
from core.errors import BadInput, ProtocolError

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 1024
MAX_NDIM = 8
MAX_DIM = 1 << 40

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Dtypes numpy holds as they are: their bytes are taken with one numpy() call (bfloat16 is viewed as bytes first).
NUMPY_DTYPES = frozenset(DTYPES.values()) - {torch.bfloat16}
NUMPY_OF: dict[str, np.dtype[Any]] = {name: torch.empty(0, dtype=dtype).numpy().dtype for name, dtype in DTYPES.items()
                                      if dtype in NUMPY_DTYPES}
SMALL_BYTES = 64 * 1024  # received tensors up to this size are copied out in one step (bytearray)

class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    """Header of one tensor; its bytes are the next buffer frame."""

    dtype: str
    shape: tuple[int, ...]


class ShmRef(msgspec.Struct, array_like=True, frozen=True):
    """Where one tensor's bytes are in a shared-memory arena (``core.arena``) instead of a frame."""

    arena: str
    offset: int
    sequence: int = 0  # the region's: a reader can tell the writer reclaimed it


class TensorTree(msgspec.Struct, array_like=True, frozen=True):
    """A tensor, a tuple of tensors, or a dict of named tensors (``layout``); the bytes follow as
    frames, or (``shm``, one reference per tensor) lie in a shared-memory arena of this machine, or
    (``cuda``, one reference per tensor) on a GPU of this machine, mapped through CUDA IPC."""

    layout: Literal["tensor", "tuple", "dict", "none"]
    metas: tuple[TensorMeta, ...] = ()
    keys: tuple[str, ...] = ()
    shm: tuple[ShmRef, ...] = ()
    cuda: tuple[CudaRef, ...] = ()

    @property
    def frames(self) -> int:
        """How many buffer frames follow the message for this tree."""
        return 0 if self.shm or self.cuda else len(self.metas)


NO_TENSORS = TensorTree("none")


@functools.lru_cache(maxsize=4096)  # a stream of calls repeats a few headers: each is checked once
def tensor_nbytes(meta: TensorMeta) -> int:
    """Bytes that a tensor of this header occupies, validating the header first."""
    dtype = DTYPES.get(meta.dtype)
    if dtype is None:
        raise BadInput(f"unsupported dtype {meta.dtype!r}; supported: {', '.join(DTYPES)}")
    if len(meta.shape) > MAX_NDIM or any(d < 0 or d > MAX_DIM for d in meta.shape):
        raise BadInput(f"invalid tensor shape {list(meta.shape)}")
    numel = extent = 1
    for d in meta.shape:
        numel *= d
        extent *= max(d, 1)  # an empty tensor still needs strides torch can represent
    if extent > MAX_DIM:
        raise BadInput(f"invalid tensor shape {list(meta.shape)}: too large")
    return numel * dtype.itemsize


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    try:  # the common case (contiguous, on the CPU, a dtype numpy holds) in two calls: this runs for every tensor sent
        return memoryview(t.numpy()).cast("B")
    except (RuntimeError, TypeError):  # grad, another device, bfloat16, conj bit (numpy()), strided (cast)
        pass
    t = t.detach().cpu().contiguous()  # each step leaves the tensor as it is where it has nothing to do
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in NUMPY_DTYPES:
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _meta(t: torch.Tensor) -> TensorMeta:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise BadInput(f"unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    return TensorMeta(name, tuple(t.shape))


def encode_tensors(value: Any) -> tuple[TensorTree, list[memoryview]]:
    """Split a tensor, tuple/list of tensors, or dict of tensors into header and buffers."""
    if isinstance(value, torch.Tensor):  # the common case first: this runs for every call
        return TensorTree("tensor", (_meta(value),)), [tensor_bytes(value)]
    tree, tensors = describe_tensors(value)
    return tree, [tensor_bytes(t) for t in tensors]


def describe_tensors(value: Any) -> tuple[TensorTree, list[torch.Tensor]]:
    """The header of a tensor, tuple/list of tensors, or dict of tensors, and its tensors in order
    (where they are: nothing is copied)."""
    if value is None:
        return NO_TENSORS, []
    if isinstance(value, torch.Tensor):
        return TensorTree("tensor", (_meta(value),)), [value]
    if isinstance(value, (tuple, list)):
        items = list(value)
        layout: Literal["tuple", "dict"] = "tuple"
        keys: tuple[str, ...] = ()
    elif isinstance(value, dict):
        keys = tuple(value)
        if not all(isinstance(k, str) for k in keys):
            raise BadInput("dict inputs must have string keys")
        items = [value[k] for k in keys]
        layout = "dict"
    else:
        raise BadInput(f"expected a Tensor, a tuple of Tensors or a dict of Tensors, got {type(value).__name__}")
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise BadInput("every element of the input must be a torch.Tensor")
    return TensorTree(layout, tuple(_meta(t) for t in items), keys), items


def to_cuda_refs(tree: TensorTree, tensors: list[torch.Tensor]) -> tuple[TensorTree, list[torch.Tensor]]:
    """The same CUDA tensors as CUDA IPC references (``core.cuda_ipc``): the tree with no buffers,
    and the tensors the caller keeps alive until the reader is done with them."""
    refs, kept = [], []
    for t in tensors:
        ref, keep = export_tensor(t)
        refs.append(ref)
        kept.append(keep)
    return msgspec.structs.replace(tree, cuda=tuple(refs)), kept


def to_arena(tree: TensorTree, buffers: list[memoryview], arena: Any, reader: int = 0,
             deadline: float | None = None) -> tuple[TensorTree, list[Any], list[int]]:
    """The same tensors in ``arena`` (``core.arena.Arena``): the tree with references and no buffers,
    and the regions used (give each back when the call is done); as they were if the arena has no
    room. A tensor already in a lent region of the arena is sent where it lies; the others are copied
    in. ``reader``: the pid of the process the new regions are held for (results), 0 for none;
    ``deadline``: that of the call that sends them (``Arena.take``)."""
    refs: list[ShmRef] = []
    used: list[int] = []
    for buf in buffers:
        found = arena.locate(buf, deadline)
        if found is not None:
            offset, sequence, region = found
        else:
            taken = arena.take(buf.nbytes, reader, deadline)
            if taken is None:
                for region in used:
                    arena.give_back(region)
                return tree, buffers, []
            offset, sequence = taken
            region = offset
            arena.write(offset, buf)
        refs.append(ShmRef(arena.name, offset, sequence))
        used.append(region)
    return msgspec.structs.replace(tree, shm=tuple(refs)), [], used


def check_buffers(tree: TensorTree, buffers: list[Any], max_bytes: int) -> int:
    """Check buffer count and sizes against the header before anything is built; return total bytes."""
    if not tree.metas and tree.layout == "none" and not buffers and not tree.shm and not tree.cuda:  # no tensors
        return 0
    if len(tree.metas) > MAX_TENSORS:
        raise BadInput(f"too many tensors in one message ({len(tree.metas)} > {MAX_TENSORS})")
    if tree.shm and len(tree.shm) != len(tree.metas):
        raise ProtocolError(f"header announces {len(tree.metas)} tensors but {len(tree.shm)} shared-memory places")
    if tree.cuda and (len(tree.cuda) != len(tree.metas) or tree.shm):
        raise ProtocolError(f"header announces {len(tree.metas)} tensors but {len(tree.cuda)} CUDA places")
    if len(buffers) != tree.frames:
        raise ProtocolError(f"header announces {tree.frames} tensors but {len(buffers)} buffers followed")
    if tree.layout == "dict" and (len(tree.keys) != len(tree.metas) or len(set(tree.keys)) != len(tree.keys)):
        raise ProtocolError("dict layout needs one key per tensor, each key distinct")
    if tree.layout == "tensor" and len(tree.metas) != 1:
        raise ProtocolError("tensor layout needs exactly one tensor")
    total = 0
    if tree.shm or tree.cuda:
        return _total(tree, max_bytes)
    for meta, buf in zip(tree.metas, buffers):
        need = tensor_nbytes(meta)
        have = buf.numel() if isinstance(buf, torch.Tensor) else memoryview(buf).nbytes
        if need != have:
            raise ProtocolError(f"tensor {list(meta.shape)} {meta.dtype} needs {need} bytes, frame has {have}")
        total += need
    if total > max_bytes:
        raise BadInput(f"tensors of {total} bytes exceed the message bound of {max_bytes} bytes")
    return total


def _total(tree: TensorTree, max_bytes: int) -> int:
    total = sum(tensor_nbytes(meta) for meta in tree.metas)
    if total > max_bytes:
        raise BadInput(f"tensors of {total} bytes exceed the message bound of {max_bytes} bytes")
    return total


def _decode_tensor(meta: TensorMeta, buf: Any, pinned: bool) -> torch.Tensor:
    if isinstance(buf, torch.Tensor) and (not pinned or buf.is_cuda):  # bytes in memory that stays ours: as they are
        return _in_place_tensor(meta, buf)
    if isinstance(buf, torch.Tensor):
        out = torch.empty(meta.shape, dtype=DTYPES[meta.dtype], pin_memory=True)
        out.reshape(-1).view(torch.uint8).copy_(buf)
        return out
    # Copy into a tensor we own: received frames are read-only and short-lived.
    nbytes = memoryview(buf).nbytes
    if not pinned and 0 < nbytes <= SMALL_BYTES:  # one copy into memory the tensor owns, in three calls
        as_numpy = NUMPY_OF.get(meta.dtype)
        if as_numpy is not None:  # numpy builds the shaped array in one call: half of torch's frombuffer and view
            return torch.from_numpy(np.ndarray(meta.shape, as_numpy, bytearray(buf)))
        return torch.frombuffer(bytearray(buf), dtype=DTYPES[meta.dtype]).view(meta.shape)
    out = torch.empty(meta.shape, dtype=DTYPES[meta.dtype], pin_memory=pinned)
    if out.numel():
        out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(buf, dtype=np.uint8)
    return out


def decode_tensors(tree: TensorTree, buffers: list[Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   pinned: bool = False, arenas: Any = None, copy: bool = True) -> Any:
    """Rebuild what ``encode_tensors`` split: None, a Tensor, a tuple or a dict; in page-locked
    memory with ``pinned`` (tensors headed for a GPU). Bytes in an arena are read through
    ``arenas`` (``core.arena.ArenaReader``): copied out, or with ``copy=False`` used in place
    (valid only while the writer keeps the region)."""
    check_buffers(tree, buffers, max_bytes)
    if tree.layout == "none":
        return None
    if tree.cuda:  # a worker maps a client's GPU tensors before this (``core.cuda_ipc.open_bytes``)
        raise BadInput("the client's tensors on its GPU could not be mapped by the worker (the worker's log says "
                       "why); a client made with shm=False sends them through the host")
    if tree.shm:
        if arenas is None:
            raise ProtocolError("tensors in shared memory, but this peer does not read arenas")
        try:
            views = [arenas.read(ref, tensor_nbytes(meta)) for ref, meta in zip(tree.shm, tree.metas)]
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"tensors in shared memory cannot be read: {exc}") from None
        if copy:
            tensors = [_decode_tensor(m, v, pinned) for m, v in zip(tree.metas, views)]
        else:
            tensors = [_in_place(m, v) for m, v in zip(tree.metas, views)]
    else:
        tensors = [_decode_tensor(m, b, pinned) for m, b in zip(tree.metas, buffers)]
    if tree.layout == "none":
        return None
    if tree.layout == "tensor":
        return tensors[0]
    if tree.layout == "tuple":
        return tuple(tensors)
    return dict(zip(tree.keys, tensors))


def _in_place(meta: TensorMeta, view: memoryview) -> torch.Tensor:
    if not view.nbytes:
        return torch.empty(meta.shape, dtype=DTYPES[meta.dtype])
    return torch.frombuffer(view, dtype=DTYPES[meta.dtype]).view(meta.shape)


def _in_place_tensor(meta: TensorMeta, raw: torch.Tensor) -> torch.Tensor:
    """A tensor over ``raw``'s bytes (uint8), without a copy."""
    if not raw.numel():
        return torch.empty(meta.shape, dtype=DTYPES[meta.dtype])
    return raw.view(DTYPES[meta.dtype]).view(meta.shape)


def byte_tensor(view: memoryview) -> torch.Tensor:
    """Bytes in shared memory as a uint8 tensor: a buffer ``decode_tensors`` uses without a copy."""
    return torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)


def slice_rows(tree: TensorTree, buffers: list[Any], lo: int, hi: int) -> tuple[TensorTree, list[Any]]:
    """Rows ``lo:hi`` of dim 0 of every tensor, as zero-copy views of the frames (or arena offsets)."""
    metas, out, refs, gpu_refs = [], [], [], []
    for i, meta in enumerate(tree.metas):
        rows = meta.shape[0]
        row_bytes = tensor_nbytes(meta) // rows if rows else 0
        metas.append(TensorMeta(meta.dtype, (hi - lo, *meta.shape[1:])))
        if tree.shm:
            ref = tree.shm[i]
            refs.append(ShmRef(ref.arena, ref.offset + lo * row_bytes, ref.sequence))
        elif tree.cuda:
            cuda = tree.cuda[i]
            gpu_refs.append(msgspec.structs.replace(cuda, offset=cuda.offset + lo * row_bytes))
        else:
            out.append(memoryview(buffers[i])[lo * row_bytes : hi * row_bytes])
    return TensorTree(tree.layout, tuple(metas), tree.keys, tuple(refs), tuple(gpu_refs)), out


def join_rows(pieces: list[tuple[TensorTree, list[Any]]]) -> tuple[TensorTree, list[Any]]:
    """Concatenate stacked results along dim 0, in the order given."""
    first = pieces[0][0]
    metas, out = [], []
    for i, meta in enumerate(first.metas):
        rows = sum(tree.metas[i].shape[0] for tree, _ in pieces)
        metas.append(TensorMeta(meta.dtype, (rows, *meta.shape[1:])))
        out.append(b"".join(bytes(bufs[i]) for _, bufs in pieces))
    return TensorTree(first.layout, tuple(metas), first.keys), out
