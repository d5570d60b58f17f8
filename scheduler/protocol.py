"""The wire format of cohort: every message, and the codec for tensors.

This module is the only place that knows how bytes on a socket look.

A message is one ZeroMQ frame when it is small, a multipart message when it is not:

    small:  [version u8][1 u8][header length u32][buffer count u16][buffer lengths u32 ...]
            [header][buffer bytes ...]
    large:  [version u8][0 u8][header]   then one frame per buffer (sent without a copy)

The header is a msgspec struct, MessagePack, tagged with its type name; buffers are raw
tensor bytes in the order of the header's ``TensorMeta`` entries. A version mismatch is
refused before decoding. Small messages travel as one frame because every extra frame
costs a system call and a wake-up on each hop, and ZeroMQ copies frames under 64 KiB
anyway.

Nothing is ever unpickled. Headers are decoded into the declared union of structs
(an unknown type or a wrong field is a ``ProtocolError``), and every size is checked
against the bound before anything is allocated. New fields are appended last, with
defaults, so that an older peer still decodes a newer message.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, Union

import msgspec
import numpy as np
import torch

from scheduler.errors import BadInput, ProtocolError

PROTOCOL_VERSION = 1
SPLIT_PREFIX = bytes([PROTOCOL_VERSION, 0])
PACKED_PREFIX = bytes([PROTOCOL_VERSION, 1])
PACKED_LIMIT = 64 * 1024
_PACKED_HEAD = struct.Struct("<IH")

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

Op = Literal["infer", "train_step", "ensemble", "train_round"]
JOB_OPS: tuple[str, ...] = ("infer", "train_step", "ensemble", "train_round")


# --------------------------------------------------------------------------- tensors


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    """Header of one tensor; its bytes are the next buffer frame."""

    dtype: str
    shape: tuple[int, ...]


class TensorTree(msgspec.Struct, array_like=True, frozen=True):
    """A tensor, a tuple of tensors, or a dict of named tensors (``layout``)."""

    layout: Literal["tensor", "tuple", "dict", "none"]
    metas: tuple[TensorMeta, ...] = ()
    keys: tuple[str, ...] = ()


NO_TENSORS = TensorTree("none")


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


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _meta(t: torch.Tensor) -> TensorMeta:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise BadInput(f"unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    return TensorMeta(name, tuple(t.shape))


def encode_tensors(value: Any) -> tuple[TensorTree, list[memoryview]]:
    """Split a tensor, tuple/list of tensors, or dict of tensors into header and buffers."""
    if value is None:
        return NO_TENSORS, []
    if isinstance(value, torch.Tensor):
        return TensorTree("tensor", (_meta(value),)), [_tensor_buffer(value)]
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
    return TensorTree(layout, tuple(_meta(t) for t in items), keys), [_tensor_buffer(t) for t in items]


def check_buffers(tree: TensorTree, buffers: list[Any], max_bytes: int) -> int:
    """Check buffer count and sizes against the header before anything is built; return total bytes."""
    if len(tree.metas) > MAX_TENSORS:
        raise BadInput(f"too many tensors in one message ({len(tree.metas)} > {MAX_TENSORS})")
    if len(buffers) != len(tree.metas):
        raise ProtocolError(f"header announces {len(tree.metas)} tensors but {len(buffers)} buffers followed")
    if tree.layout == "dict" and (len(tree.keys) != len(tree.metas) or len(set(tree.keys)) != len(tree.keys)):
        raise ProtocolError("dict layout needs one key per tensor, each key distinct")
    if tree.layout == "tensor" and len(tree.metas) != 1:
        raise ProtocolError("tensor layout needs exactly one tensor")
    total = 0
    for meta, buf in zip(tree.metas, buffers):
        need = tensor_nbytes(meta)
        if need != memoryview(buf).nbytes:
            raise ProtocolError(f"tensor {list(meta.shape)} {meta.dtype} needs {need} bytes, frame has {memoryview(buf).nbytes}")
        total += need
    if total > max_bytes:
        raise BadInput(f"tensors of {total} bytes exceed the message bound of {max_bytes} bytes")
    return total


def _decode_tensor(meta: TensorMeta, buf: Any) -> torch.Tensor:
    # Copy into a tensor we own: received frames are read-only and short-lived.
    out = torch.empty(meta.shape, dtype=DTYPES[meta.dtype])
    if out.numel():
        out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(buf, dtype=np.uint8)
    return out


def decode_tensors(tree: TensorTree, buffers: list[Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Rebuild what ``encode_tensors`` split: None, a Tensor, a tuple or a dict."""
    check_buffers(tree, buffers, max_bytes)
    tensors = [_decode_tensor(m, b) for m, b in zip(tree.metas, buffers)]
    if tree.layout == "none":
        return None
    if tree.layout == "tensor":
        return tensors[0]
    if tree.layout == "tuple":
        return tuple(tensors)
    return dict(zip(tree.keys, tensors))


# --------------------------------------------------------------------------- client -> coordinator


class ClientRequest(msgspec.Struct, tag=True, array_like=True):
    """Base of every request a client sends; ``req_id`` is echoed in the reply."""

    req_id: int


class Hello(ClientRequest):
    client_version: str = ""


class SubmitJob(ClientRequest):
    """A job; ``inputs``' buffers come first, then ``targets``'."""

    op: str
    target: str
    inputs: TensorTree
    targets: TensorTree = NO_TENSORS
    timeout_s: float | None = None


class BarrierRequest(ClientRequest):
    scope: list[str] | None = None
    timeout_s: float | None = None


class ListModels(ClientRequest):
    pass


class GetWeights(ClientRequest):
    model: str
    timeout_s: float | None = None


class SetWeights(ClientRequest):
    model: str
    weights: TensorTree
    timeout_s: float | None = None


class CopyWeights(ClientRequest):
    src: str
    dst: str
    timeout_s: float | None = None


class SnapshotRequest(ClientRequest):
    path: str
    timeout_s: float | None = None


class StatsRequest(ClientRequest):
    pass


class Requests(ClientRequest):
    """Several requests in one message (a client's queue, drained at once); buffers follow request by request."""

    requests: list[Union[Hello, SubmitJob, BarrierRequest, ListModels, GetWeights, SetWeights, CopyWeights,
                         SnapshotRequest, StatsRequest]]


ClientMessage = Union[
    Hello, SubmitJob, BarrierRequest, ListModels, GetWeights, SetWeights, CopyWeights, SnapshotRequest, StatsRequest,
    Requests,
]


# --------------------------------------------------------------------------- coordinator -> client


class ModelInfo(msgspec.Struct, frozen=True):
    """One model the coordinator serves."""

    id: str
    group: str
    index: int
    worker: int
    version: int
    device: str


class Reply(msgspec.Struct, tag=True, array_like=True):
    req_id: int


class HelloReply(Reply):
    protocol: int
    cohort_version: str
    max_message_bytes: int


class JobDone(Reply):
    """A finished job: output tensors (buffers follow) and, for training, the losses."""

    outputs: TensorTree = NO_TENSORS
    losses: list[float] | None = None


class ErrorReply(Reply):
    error: str
    message: str
    traceback: str = ""


class ModelsReply(Reply):
    models: list[ModelInfo]


class Ack(Reply):
    """Barrier, set/copy weights, snapshot: done; ``detail`` says what was done."""

    detail: dict[str, Any] = {}


class WeightsReply(Reply):
    weights: TensorTree


class StatsReply(Reply):
    stats: dict[str, Any]


class Replies(Reply):
    """Several replies to one client in one message; buffers follow reply by reply."""

    replies: list[Union[HelloReply, JobDone, ErrorReply, ModelsReply, Ack, WeightsReply, StatsReply]]


CoordinatorReply = Union[HelloReply, JobDone, ErrorReply, ModelsReply, Ack, WeightsReply, StatsReply, Replies]


# --------------------------------------------------------------------------- coordinator <-> worker


class EntrySpec(msgspec.Struct, array_like=True, frozen=True):
    """One per-model tensor of a bank: a parameter, a buffer or optimizer state."""

    name: str
    role: Literal["param", "buffer", "state"]
    shape: tuple[int, ...]
    dtype: str


class InputSpec(msgspec.Struct, array_like=True, frozen=True):
    """One model input; ``-1`` in ``shape`` is the batch dimension (or any size)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class BatchingSpec(msgspec.Struct, frozen=True):
    """A group's batching policy (the ``batching`` table of its config)."""

    fuse: bool = True  # ensemble, train_round and coalesced jobs as one vmap'd call over the bank
    max_jobs: int = 64  # at most this many waiting jobs joined into one call; 1 turns coalescing off
    max_wait_ms: float = 0.0  # how long a worker may hold a lone job for others to join it
    compile: str = ""  # torch.compile mode for fused calls ("default", "reduce-overhead", ...); "" = eager


class GroupSpec(msgspec.Struct, frozen=True):
    """A group's compiled definition as a worker receives it, for the models placed there."""

    name: str
    factory: str
    kwargs: dict[str, Any]
    inputs: list[InputSpec]
    single_input: bool
    entries: list[EntrySpec]
    loss: str
    optimizer: str
    hparams: dict[str, list[float]]
    indices: list[int]
    init_seed: int | None = None
    init_safetensors: str | None = None
    batching: BatchingSpec = BatchingSpec()


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


class BankHandle(msgspec.Struct, array_like=True, frozen=True):
    """How another process maps a worker's bank: a shared-memory name or a CUDA IPC handle."""

    group: str
    kind: Literal["shm", "cuda"]
    nbytes: int
    count: int
    shm_name: str = ""
    cuda: CudaIpcHandle | None = None


class ToWorker(msgspec.Struct, tag=True, array_like=True):
    pass


class InitWorker(ToWorker):
    worker_id: int
    device: str
    streams: int
    groups: list[GroupSpec]
    shm_prefix: str
    restore: bool = False


class RunJob(ToWorker):
    """Run ``op`` on the models at ``slots`` of ``group``'s bank; buffers: inputs, then targets."""

    job_id: int
    op: str
    group: str
    slots: list[int]
    inputs: TensorTree
    targets: TensorTree = NO_TENSORS
    # The job's deadline on time.monotonic(), which on Linux is one clock for every process
    # of the machine: coordinator and workers always share one machine.
    deadline: float | None = None


class RestoreWeights(ToWorker):
    """Nothing to run: the coordinator rewrote a bank and the worker must drop derived caches."""

    group: str


class Shutdown(ToWorker):
    pass


class RunJobs(ToWorker):
    """Several jobs in one message (fewer system calls under load); buffers follow job by job."""

    jobs: list[RunJob]


WorkerCommand = Union[InitWorker, RunJob, RunJobs, RestoreWeights, Shutdown]


def tensor_count(message: Any) -> int:
    """How many buffers belong to one message inside a bundle."""
    if isinstance(message, (RunJob, SubmitJob)):
        return len(message.inputs.metas) + len(message.targets.metas)
    if isinstance(message, (JobResult, JobDone)):
        return len(message.outputs.metas)
    if isinstance(message, SetWeights):
        return len(message.weights.metas)
    if isinstance(message, WeightsReply):
        return len(message.weights.metas)
    return 0


def unbundle(items: list[Any], buffers: list[Any]) -> list[tuple[Any, list[Any]]]:
    """Split a bundle's buffers among its items; ``ProtocolError`` if they do not add up."""
    out, at = [], 0
    for item in items:
        n = tensor_count(item)
        out.append((item, buffers[at:at + n]))
        at += n
    if at != len(buffers):
        raise ProtocolError(f"bundle of {len(items)} items announces {at} buffers, {len(buffers)} followed")
    return out


class FromWorker(msgspec.Struct, tag=True, array_like=True):
    worker_id: int


class WorkerHello(FromWorker):
    pid: int


class WorkerReady(FromWorker):
    device: str
    banks: list[BankHandle]


class JobResult(FromWorker):
    job_id: int
    outputs: TensorTree = NO_TENSORS
    losses: list[float] | None = None


class JobError(FromWorker):
    job_id: int
    error: str
    message: str
    traceback: str = ""


class Heartbeat(FromWorker):
    busy: bool = False
    calls: int = 0  # compute calls made since start
    joined_jobs: int = 0  # jobs that ran inside a call joined with other jobs
    quiet_s: float = 0.0  # the next call may keep the worker silent this long (it compiles)


class WorkerFailed(FromWorker):
    """Start-up failed; the worker exits after sending this."""

    error: str
    message: str
    traceback: str = ""


class JobResults(FromWorker):
    """Several finished jobs in one message; buffers follow result by result."""

    results: list[Union[JobResult, JobError]]


WorkerEvent = Union[WorkerHello, WorkerReady, JobResult, JobError, JobResults, Heartbeat, WorkerFailed]


# --------------------------------------------------------------------------- framing


class Codec:
    """Encodes and decodes one direction's messages to and from frames.

    Holds reusable msgspec encoder/decoder objects: building them per message
    costs more than encoding a small header.
    """

    def __init__(self, decode_type: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(decode_type)

    def encode(self, message: msgspec.Struct, buffers: list[Any] | None = None) -> list[Any]:
        header = self._encoder.encode(message)
        if not buffers:
            return [PACKED_PREFIX + _PACKED_HEAD.pack(len(header), 0) + header]
        sizes = [memoryview(b).nbytes for b in buffers]
        if sum(sizes) + len(header) > PACKED_LIMIT or len(buffers) > MAX_TENSORS * 2:
            return [SPLIT_PREFIX + header, *buffers]
        table = struct.pack(f"<{len(sizes)}I", *sizes)
        return [b"".join((PACKED_PREFIX, _PACKED_HEAD.pack(len(header), len(sizes)), table, header, *buffers))]

    def decode(self, frames: list[Any]) -> tuple[Any, list[Any]]:
        """Return ``(message, buffers)``; raise ``ProtocolError`` on anything malformed."""
        if not frames:
            raise ProtocolError("empty message")
        first = memoryview(frames[0])
        prefix = bytes(first[:2])
        if len(prefix) < 2 or prefix[0] != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {prefix[:1]!r} not supported; this peer speaks {PROTOCOL_VERSION}")
        if prefix == SPLIT_PREFIX:
            header, buffers = first[2:], list(frames[1:])
        elif prefix == PACKED_PREFIX and len(frames) == 1:
            header, buffers = _unpack(first)
        else:
            raise ProtocolError(f"unknown message layout {prefix!r} with {len(frames)} frames")
        try:
            message = self._decoder.decode(header)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed message: {exc}") from None
        except RecursionError:
            raise ProtocolError("malformed message: nested too deeply") from None
        return message, buffers


def _unpack(frame: memoryview) -> tuple[memoryview, list[memoryview]]:
    """Split a one-frame message into header and buffers, checking every length."""
    if frame.nbytes < 2 + _PACKED_HEAD.size:
        raise ProtocolError("truncated message")
    header_len, count = _PACKED_HEAD.unpack_from(frame, 2)
    at = 2 + _PACKED_HEAD.size
    if count > MAX_TENSORS * 2 or at + 4 * count > frame.nbytes:
        raise ProtocolError("truncated message: buffer table")
    sizes = struct.unpack_from(f"<{count}I", frame, at)
    at += 4 * count
    if at + header_len + sum(sizes) != frame.nbytes:
        raise ProtocolError(f"message of {frame.nbytes} bytes does not match its table")
    header = frame[at:at + header_len]
    at += header_len
    buffers = []
    for size in sizes:
        buffers.append(frame[at:at + size])
        at += size
    return header, buffers


def client_codec() -> Codec:
    """Codec of the client side: encodes requests, decodes replies."""
    return Codec(CoordinatorReply)


def coordinator_client_codec() -> Codec:
    """Codec of the coordinator's client socket: decodes requests, encodes replies."""
    return Codec(ClientMessage)


def coordinator_worker_codec() -> Codec:
    """Codec of the coordinator's worker sockets: decodes worker events."""
    return Codec(WorkerEvent)


def worker_codec() -> Codec:
    """Codec of a worker: decodes commands from the coordinator."""
    return Codec(WorkerCommand)
