"""core/codec.py and core/tensors.py: framing, message round trips and the tensor codec.

The fuzzing (arbitrary bytes, mutated messages) lives in test_protocol_fuzz.py.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import pytest
import torch

from core.errors import BadInput, ProtocolError
from tests.unit.wire import P

from .protocol_samples import CODEC_FACTORIES, DIRECTIONS, messages, union_members

# --------------------------------------------------------------------------- helpers


def wire(frames: list[Any]) -> list[bytes]:
    """What a peer receives: plain bytes per frame (zmq copies, or memoryviews of frames)."""
    return [bytes(memoryview(f)) for f in frames]


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    # Compare bytes: exact for every dtype, NaN included.
    if a.numel():
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist()


def same_tree(a: Any, b: Any) -> None:
    if a is None:
        assert b is None
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        same_tensor(a, b)
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            same_tensor(x, y)
    else:
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            same_tensor(a[k], b[k])


def tensor_roundtrip(value: Any) -> Any:
    tree, bufs = P.encode_tensors(value)
    # Through msgspec and back, as the header travels.
    tree = msgspec.msgpack.decode(msgspec.msgpack.encode(tree), type=P.TensorTree)
    return P.decode_tensors(tree, wire(bufs))


# --------------------------------------------------------------------------- message round trips


def test_samples_cover_every_message_type() -> None:
    for d in DIRECTIONS:
        covered = {type(m) for m, _, _ in messages(d.name)}
        assert covered == union_members(d.union), f"{d.name}: samples miss {union_members(d.union) - covered}"


@pytest.mark.parametrize("d", DIRECTIONS, ids=lambda d: d.name)
def test_every_message_round_trips_small_and_packed(d: Any) -> None:
    send, recv = d.sender(), d.receiver()
    for msg, bufs, trees in messages(d.name):
        frames = send.encode(msg, bufs)
        assert len(frames) == 1, f"{type(msg).__name__} of {sum(len(bytes(b)) for b in bufs)} buffer bytes was split"
        assert bytes(memoryview(frames[0])[:2]) == P.PACKED_PREFIX
        got, got_bufs = recv.decode(wire(frames))
        assert type(got) is type(msg)
        assert got == msg
        assert [bytes(b) for b in got_bufs] == [bytes(b) for b in bufs]
        _check_trees(trees, got_bufs, bufs)


@pytest.mark.parametrize("d", DIRECTIONS, ids=lambda d: d.name)
def test_every_message_round_trips_large_and_split(d: Any) -> None:
    send, recv = d.sender(), d.receiver()
    seen = 0
    for msg, bufs, trees in messages(d.name, rows=3000):
        if not bufs:
            continue
        seen += 1
        frames = send.encode(msg, bufs)
        assert sum(memoryview(b).nbytes for b in bufs) > P.PACKED_LIMIT
        assert len(frames) == 1 + len(bufs)
        assert bytes(memoryview(frames[0])[:2]) == P.SPLIT_PREFIX
        got, got_bufs = recv.decode(wire(frames))
        assert got == msg
        assert [bytes(b) for b in got_bufs] == [bytes(b) for b in bufs]
        _check_trees(trees, got_bufs, bufs)
        # As memoryviews, as the coordinator and the client receive them with copy=False.
        got2, got_bufs2 = recv.decode([memoryview(f) for f in wire(frames)])
        assert got2 == msg and [bytes(b) for b in got_bufs2] == [bytes(b) for b in bufs]
    assert seen >= 1


def _check_trees(trees: list[P.TensorTree], got_bufs: list[Any], sent_bufs: list[Any]) -> None:
    at = 0
    for tree in trees:
        n = len(tree.metas)
        same_tree(P.decode_tensors(tree, sent_bufs[at:at + n]), P.decode_tensors(tree, list(got_bufs[at:at + n])))
        at += n
    assert at == len(got_bufs)


@pytest.mark.parametrize("d", DIRECTIONS, ids=lambda d: d.name)
@pytest.mark.parametrize("extra", [[b"abc", b"", bytes(range(256))], [bytes(70_000), b"z"]], ids=["small", "large"])
def test_any_message_carries_any_buffers(d: Any, extra: list[bytes]) -> None:
    """The codec frames buffers for every message type, whether or not it declares tensors."""
    send, recv = d.sender(), d.receiver()
    for msg, _, _ in messages(d.name):
        frames = send.encode(msg, extra)
        assert len(frames) == (1 if sum(map(len, extra)) < P.PACKED_LIMIT else 1 + len(extra))
        got, got_bufs = recv.decode(wire(frames))
        assert got == msg
        assert [bytes(b) for b in got_bufs] == extra


def test_packed_limit_boundary() -> None:
    codec = P.client_codec()
    msg = P.Hello(1, "x")
    header = len(msgspec.msgpack.encode(msg))
    at_limit = codec.encode(msg, [bytes(P.PACKED_LIMIT - header)])
    over = codec.encode(msg, [bytes(P.PACKED_LIMIT - header + 1)])
    assert len(at_limit) == 1
    assert len(over) == 2
    for frames in (at_limit, over):
        got, bufs = P.coordinator_client_codec().decode(wire(frames))
        assert got == msg and len(bufs) == 1


def test_split_buffers_are_sent_without_a_copy() -> None:
    buf = bytearray(100_000)
    frames = P.client_codec().encode(P.Hello(1), [buf])
    buf[5] = 42
    assert bytes(memoryview(frames[1])[:6]) == b"\x00" * 5 + b"\x2a"


def test_received_message_is_decoded_to_the_union_of_its_direction() -> None:
    """A worker command sent to a client is a ProtocolError, not silently accepted."""
    frames = P.coordinator_worker_codec().encode(P.Shutdown())
    with pytest.raises(ProtocolError):
        P.client_codec().decode(frames)
    frames = P.client_codec().encode(P.ListModels(1))
    with pytest.raises(ProtocolError):
        P.worker_codec().decode(frames)


# --------------------------------------------------------------------------- malformed frames


def _packed(header: bytes, sizes: list[int], body: bytes, version: int = P.PROTOCOL_VERSION) -> bytes:
    return bytes([version, 1]) + struct.pack("<IH", len(header), len(sizes)) + struct.pack(f"<{len(sizes)}I", *sizes) + header + body


def _expect_protocol_error(frames: list[Any], *words: str) -> str:
    for make in CODEC_FACTORIES:
        with pytest.raises(ProtocolError) as info:
            make().decode(frames)
        text = str(info.value).lower()
        for w in words:
            assert w in text, f"{text!r} does not mention {w!r}"
    return text


@pytest.mark.parametrize("version", [0, 2, 255])
@pytest.mark.parametrize("layout", [0, 1])
def test_wrong_version_byte(version: int, layout: int) -> None:
    good = P.client_codec().encode(P.Hello(1))
    bad = bytes([version, layout]) + bytes(good[0])[2:]
    _expect_protocol_error([bad], "version")


@pytest.mark.parametrize("layout", [2, 7, 255])
def test_unknown_layout_byte(layout: int) -> None:
    good = P.client_codec().encode(P.Hello(1))
    bad = bytes([P.PROTOCOL_VERSION, layout]) + bytes(good[0])[2:]
    _expect_protocol_error([bad], "layout")


def test_packed_frame_with_extra_frames_is_refused() -> None:
    good = P.client_codec().encode(P.Hello(1), [b"ab"])
    _expect_protocol_error([*good, b"more"], "layout")


@pytest.mark.parametrize("frames", [[], [b""], [b"\x01"]], ids=["no frames", "empty frame", "one byte"])
def test_too_short(frames: list[bytes]) -> None:
    _expect_protocol_error(frames)


def test_truncated_packed_frame() -> None:
    frame = bytes(P.client_codec().encode(P.SubmitJob(1, "infer", "m/0", P.NO_TENSORS), [b"abcdef", b"gh"])[0])
    for cut in range(2, len(frame)):
        _expect_protocol_error([frame[:cut]])
    _expect_protocol_error([frame[:5]], "truncated")


def test_packed_table_that_does_not_add_up() -> None:
    header = msgspec.msgpack.encode(P.Hello(1))
    body = b"abcdef"
    assert P.Codec(P.ClientMessage).decode([_packed(header, [4, 2], body)])[1]  # the valid one decodes
    _expect_protocol_error([_packed(header, [4, 3], body)], "table")
    _expect_protocol_error([_packed(header, [4, 1], body)], "table")
    _expect_protocol_error([_packed(header, [2**32 - 1, 2**32 - 1], body)], "table")
    # A header length past the end of the frame.
    frame = bytearray(_packed(header, [4, 2], body))
    struct.pack_into("<I", frame, 2, len(header) + 100)
    _expect_protocol_error([bytes(frame)], "table")


def test_buffer_table_past_the_end_of_the_frame() -> None:
    frame = bytes([P.PROTOCOL_VERSION, 1]) + struct.pack("<IH", 0, 60_000) + b"\x00" * 8
    _expect_protocol_error([frame], "truncated")


def test_unknown_struct_tag() -> None:
    header = msgspec.msgpack.encode(["NoSuchMessage", 1])
    _expect_protocol_error([P.SPLIT_PREFIX + header])
    _expect_protocol_error([_packed(header, [], b"")])


@pytest.mark.parametrize(
    "header",
    [
        ["SubmitJob", "one", "infer", "mlp/0", ["tensor", [["float32", [2, 2]]], []], ["none", [], []], None],
        ["SubmitJob", 1, 7, "mlp/0", ["tensor", [["float32", [2, 2]]], []], ["none", [], []], None],
        ["SubmitJob", 1, "infer", "mlp/0", ["tensor", [["float32", ["2", 2]]], []], ["none", [], []], None],
        ["SubmitJob", 1, "infer", "mlp/0", ["matrix", [], []], ["none", [], []], None],
        ["SubmitJob", 1, "infer", "mlp/0", ["tensor", [["float32", [2, 2]]], []], ["none", [], []], "soon"],
        ["SubmitJob", 1, "infer"],
        ["BarrierRequest", 1, "mlp", None],
        ["BarrierRequest", 1, [1, 2], None],
        ["Hello", 1.5, ""],
        ["GetWeights", 1, None, None],
        {"type": "Hello", "req_id": 1},
    ],
    ids=["req_id str", "op int", "shape str", "layout", "timeout str", "missing fields", "scope str",
         "scope ints", "req_id float", "model None", "map not array"],
)
def test_request_header_with_a_wrong_field(header: Any) -> None:
    raw = msgspec.msgpack.encode(header)
    for frames in ([P.SPLIT_PREFIX + raw], [_packed(raw, [], b"")]):
        with pytest.raises(ProtocolError) as info:
            P.coordinator_client_codec().decode(frames)
        assert "malformed" in str(info.value)


@pytest.mark.parametrize(
    "header",
    [b"\x92\xa5Hel\xddo\x01", b"\x93\xa5Hello\x01\xa50\xdd1.0", b"\x93\xaaGetWeights\x01\xa3\xff\xfe\xfd"],
    ids=["tag", "client_version", "model"],
)
def test_invalid_utf8_in_a_string_is_a_protocol_error(header: bytes) -> None:
    for frames in ([P.SPLIT_PREFIX + header], [_packed(header, [], b"")]):
        with pytest.raises(ProtocolError):
            P.coordinator_client_codec().decode(frames)


def test_deeply_nested_header_is_a_protocol_error() -> None:
    """Messages with free-form fields (Ack.detail, StatsReply.stats, GroupSpec.kwargs) nested
    deeper than the decoder's recursion limit must still fail as ProtocolError."""
    depth = 100_000
    stats = b"\x93\xaaStatsReply\x01\x81\xa1a" + b"\x91" * depth + b"\xc0"
    with pytest.raises(ProtocolError):
        P.client_codec().decode([P.SPLIT_PREFIX + stats])
    ack = b"\x93\xa3Ack\x01\x81\xa1a" + b"\x91" * depth + b"\xc0"
    with pytest.raises(ProtocolError):
        P.client_codec().decode([P.SPLIT_PREFIX + ack])


# --------------------------------------------------------------------------- tensor codec


@pytest.mark.parametrize("name", list(P.DTYPES))
def test_every_dtype_round_trips(name: str) -> None:
    dtype = P.DTYPES[name]
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        t = torch.rand(5, 7, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = (torch.randn(5, 7, generator=g) * 100).to(dtype)
        t[0, 0] = float("nan")
        t[0, 1] = float("inf")
        t[0, 2] = -0.0
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (5, 7), generator=g, dtype=torch.int64).to(dtype)
        t[0, 0], t[0, 1] = info.min, info.max
    assert P.DTYPE_NAMES[dtype] == name
    same_tree(t, tensor_roundtrip(t))
    # Non-contiguous views of every dtype: transposed, strided slice, expanded.
    for view in (t.t(), t[1:4, ::2], t[:, 3], t[:1].expand(4, 7)):
        assert not view.is_contiguous()
        got = tensor_roundtrip(view)
        same_tree(view.contiguous(), got)
        assert got.is_contiguous()
    same_tree(t[2, 3], tensor_roundtrip(t[2, 3]))  # 0-dim
    empty = torch.empty(0, 4, dtype=dtype)
    same_tree(empty, tensor_roundtrip(empty))


def test_special_shapes_and_views() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    cases = [
        torch.tensor(3.5),
        torch.tensor(True),
        torch.empty(0, 4),
        torch.empty(4, 0, 3, dtype=torch.int64),
        base.permute(2, 0, 1),
        base[:, 1:3, ::2],
        base[1:],  # contiguous, but with a storage offset
        base.transpose(0, 2)[1],
        torch.arange(10, dtype=torch.bfloat16).reshape(2, 5).t(),
        torch.randn(3, requires_grad=True),
        torch.zeros(()).expand(2, 3),
    ]
    for t in cases:
        got = tensor_roundtrip(t)
        same_tree(t.detach().contiguous(), got)
        assert not got.requires_grad


def test_decoded_tensors_own_their_memory() -> None:
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    tree, bufs = P.encode_tensors(t)
    frame = bytearray(bytes(bufs[0]))
    got = P.decode_tensors(tree, [frame])
    frame[:] = bytes(len(frame))
    assert torch.equal(got, t)
    got.add_(1)  # writable


def test_tuple_dict_and_none_layouts() -> None:
    a = torch.randn(2, 3)
    b = torch.arange(4).reshape(2, 2).t()
    c = torch.tensor([True, False])
    tree, bufs = P.encode_tensors((a, b, c))
    assert tree.layout == "tuple" and len(bufs) == 3
    same_tree((a, b.contiguous(), c), tensor_roundtrip((a, b, c)))
    same_tree((a, b.contiguous()), tensor_roundtrip([a, b]))  # a list travels as a tuple
    d = {"tokens": b, "x": a, "mask": c}
    got = tensor_roundtrip(d)
    assert list(got) == ["tokens", "x", "mask"]  # key order kept
    same_tree({"tokens": b.contiguous(), "x": a, "mask": c}, got)
    assert tensor_roundtrip(()) == ()
    assert tensor_roundtrip({}) == {}
    assert tensor_roundtrip(None) is None
    tree, bufs = P.encode_tensors(None)
    assert tree.layout == "none" and bufs == []


def test_encode_rejects_what_it_cannot_carry() -> None:
    with pytest.raises(BadInput, match="dtype"):
        P.encode_tensors(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(BadInput, match="string keys"):
        P.encode_tensors({1: torch.zeros(2)})
    with pytest.raises(BadInput, match="torch.Tensor"):
        P.encode_tensors((torch.zeros(2), 3))
    with pytest.raises(BadInput, match="got int"):
        P.encode_tensors(3)


def test_tensor_nbytes() -> None:
    assert P.tensor_nbytes(P.TensorMeta("float32", (2, 3))) == 24
    assert P.tensor_nbytes(P.TensorMeta("bfloat16", ())) == 2
    assert P.tensor_nbytes(P.TensorMeta("bool", (0, 9))) == 0
    with pytest.raises(BadInput, match="unsupported dtype 'float8'"):
        P.tensor_nbytes(P.TensorMeta("float8", (2,)))
    with pytest.raises(BadInput, match="shape"):
        P.tensor_nbytes(P.TensorMeta("float32", (2, -1)))
    with pytest.raises(BadInput, match="shape"):
        P.tensor_nbytes(P.TensorMeta("float32", (1,) * (P.MAX_NDIM + 1)))


# --------------------------------------------------------------------------- check_buffers


def _tree(*shapes: tuple[int, ...], dtype: str = "float32", layout: str = "tuple") -> P.TensorTree:
    return P.TensorTree(layout, tuple(P.TensorMeta(dtype, s) for s in shapes))  # type: ignore[arg-type]


def test_check_buffers_accepts_and_totals() -> None:
    tree = _tree((2, 3), (4,))
    assert P.check_buffers(tree, [bytes(24), bytes(16)], 40) == 40


def test_check_buffers_size_mismatch_names_the_tensor() -> None:
    with pytest.raises(ProtocolError) as info:
        P.check_buffers(_tree((2, 3), (4,)), [bytes(24), bytes(15)], 10**6)
    assert "[4]" in str(info.value) and "16" in str(info.value) and "15" in str(info.value)


def test_check_buffers_count_mismatch() -> None:
    with pytest.raises(ProtocolError, match="2 tensors but 1 buffers"):
        P.check_buffers(_tree((1,), (1,)), [bytes(4)], 10**6)
    with pytest.raises(ProtocolError, match="1 tensors but 2 buffers"):
        P.check_buffers(_tree((1,)), [bytes(4), bytes(4)], 10**6)


def test_check_buffers_too_many_tensors() -> None:
    n = P.MAX_TENSORS + 1
    with pytest.raises(BadInput, match=f"too many tensors.*{n}"):
        P.check_buffers(_tree(*[(0,)] * n), [b""] * n, 10**6)
    P.check_buffers(_tree(*[(0,)] * P.MAX_TENSORS), [b""] * P.MAX_TENSORS, 10**6)


def test_check_buffers_total_over_bound() -> None:
    with pytest.raises(BadInput) as info:
        P.check_buffers(_tree((10,), (10,)), [bytes(40), bytes(40)], 79)
    assert "80 bytes" in str(info.value) and "79" in str(info.value)
    assert P.check_buffers(_tree((10,), (10,)), [bytes(40), bytes(40)], 80) == 80


def test_check_buffers_layout_rules() -> None:
    with pytest.raises(ProtocolError, match="one key per tensor"):
        P.check_buffers(P.TensorTree("dict", (P.TensorMeta("int8", (1,)),), ()), [b"x"], 100)
    with pytest.raises(ProtocolError, match="exactly one"):
        P.check_buffers(_tree((1,), (1,), dtype="int8", layout="tensor"), [b"x", b"y"], 100)
    with pytest.raises(ProtocolError, match="exactly one"):
        P.check_buffers(P.TensorTree("tensor"), [], 100)


def test_check_buffers_bad_header_is_bad_input() -> None:
    with pytest.raises(BadInput, match="dtype"):
        P.check_buffers(_tree((1,), dtype="str"), [b"x"], 100)
    with pytest.raises(BadInput, match="shape"):
        P.check_buffers(_tree((-4,)), [b""], 100)


def test_decode_tensors_refuses_before_allocating() -> None:
    # 2**40 float32 would be 4 TiB: the bound must stop it before torch.empty is reached.
    tree = _tree((2**40,), layout="tensor")
    with pytest.raises(ProtocolError):
        P.decode_tensors(tree, [b""])


@pytest.mark.parametrize(
    "shape",
    [(0, 2**63), (0, 2**64 - 1), (0, 2**62, 2**62), (2**40, 2**40, 0)],
    ids=["dim 2**63", "dim 2**64-1", "stride overflow", "storage overflow"],
)
def test_decode_tensors_with_absurd_empty_shape(shape: tuple[int, ...]) -> None:
    """Zero elements but sizes torch cannot represent: the header is bad input, not a crash."""
    tree = msgspec.msgpack.decode(msgspec.msgpack.encode(_tree(shape, layout="tensor")), type=P.TensorTree)
    with pytest.raises((BadInput, ProtocolError)):
        P.decode_tensors(tree, [b""])


def test_dict_layout_with_duplicate_keys_is_refused() -> None:
    """Two tensors under one key: decoding would silently drop one of them."""
    tree = P.TensorTree("dict", (P.TensorMeta("int8", (1,)), P.TensorMeta("int8", (1,))), ("x", "x"))
    with pytest.raises((BadInput, ProtocolError)):
        P.decode_tensors(tree, [b"a", b"b"])


def test_unbundle_splits_buffers_job_by_job_and_checks_the_count() -> None:
    x_tree, x_bufs = P.encode_tensors((torch.ones(2, 3), torch.zeros(2)))
    d_tree, d_bufs = P.encode_tensors({"a": torch.ones(1)})
    jobs = [P.RunJob(1, "infer", "g", [0], x_tree), P.RunJob(2, "infer", "g", [1], d_tree)]
    parts = P.unbundle(jobs, x_bufs + d_bufs)
    assert [len(b) for _, b in parts] == [2, 1]
    assert P.decode_tensors(parts[1][0].inputs, parts[1][1])["a"].tolist() == [1.0]
    with pytest.raises(ProtocolError, match="announces 3 buffers"):
        P.unbundle(jobs, x_bufs)
