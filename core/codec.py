"""The wire format of cohort: how a message and its tensor buffers become ZeroMQ frames.

A message is one ZeroMQ frame when it is small, a multipart message when it is not:

    small:  [version u8][1 u8][header length u32][buffer count u16][buffer lengths u32 ...]
            [header][buffer bytes ...]
    large:  [version u8][0 u8][header]   then one frame per buffer (sent without a copy)

The header is a msgspec struct (``core.messages``), MessagePack, tagged with its type
name; buffers are raw tensor bytes in the order of the header's ``TensorMeta`` entries
(``core.tensors``). A version mismatch is refused before decoding. Small messages travel
as one frame because every extra frame costs a system call and a wake-up on each hop,
and ZeroMQ copies frames under 64 KiB anyway.

Nothing is ever unpickled. Headers are decoded into the declared union of structs
(an unknown type or a wrong field is a ``ProtocolError``), and every size is checked
against the bound before anything is allocated.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from core.errors import ProtocolError
from core.messages import (
    ClientMessage,
    CoordinatorReply,
    JobDone,
    JobResult,
    PassOn,
    Replies,
    RunJob,
    SetWeights,
    SubmitJob,
    WeightsReply,
    WorkerCommand,
    WorkerEvent,
)
from core.tensors import MAX_TENSORS

PROTOCOL_VERSION = 1
SPLIT_PREFIX = bytes([PROTOCOL_VERSION, 0])
PACKED_PREFIX = bytes([PROTOCOL_VERSION, 1])
PACKED_LIMIT = 64 * 1024
_PACKED_HEAD = struct.Struct("<IH")


def tensor_count(message: Any) -> int:
    """How many buffers belong to one message inside a bundle (none for tensors in shared memory)."""
    if isinstance(message, (RunJob, SubmitJob)):
        return message.inputs.frames + message.targets.frames
    if isinstance(message, (JobResult, JobDone)):
        return message.outputs.frames
    if isinstance(message, PassOn):
        return message.reply.outputs.frames
    if isinstance(message, SetWeights):
        return message.weights.frames
    if isinstance(message, WeightsReply):
        return message.weights.frames
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


def bundle_replies(replies: list[tuple[Any, list[Any]]]) -> tuple[Any, list[Any]]:
    """Replies to one client, with their buffers, as one message: the reply itself when it is alone."""
    if len(replies) == 1:
        return replies[0]
    return Replies(0, [reply for reply, _ in replies]), [b for _, own in replies for b in own]


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


ZERO_COPY_MIN = 64 * 1024


def zero_copy(frames: list[Any]) -> bool:
    """Whether to send ``frames`` without a copy: ZeroMQ copies small frames anyway, and tracking a
    zero-copy frame costs more than copying it (about twice a small send, measured)."""
    return any(memoryview(f).nbytes >= ZERO_COPY_MIN for f in frames)


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
