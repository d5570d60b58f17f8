"""Fuzzing core/codec.py and core/tensors.py: whatever arrives, only ``ProtocolError`` (or ``BadInput``
for tensor headers) may come out of decoding, never another exception.

Case counts (each test asserts its own lower bound, so a change shows up here):
- test_arbitrary_single_frame:        3000 hypothesis examples, each decoded by all 4 codecs
- test_arbitrary_frame_lists:         3000 hypothesis examples, each decoded by all 4 codecs
- test_structured_headers:            1000 hypothesis examples (tagged msgpack with random
                                      fields, packed and split), each decoded by all 4 codecs
- test_mutated_valid_messages:        MUTATIONS_PER_MESSAGE (600) seeded mutations of each of
                                      the valid sample encodings (40 of them: 24,000 cases),
                                      each decoded by its receiver (then its tensors decoded)
                                      and by all 4 codecs
- test_decode_tensors_fuzzed_trees:   2000 hypothesis examples of TensorTree + buffers
"""

from __future__ import annotations

import random
import struct
from typing import Any

import msgspec
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import BadInput, ProtocolError
from tests.unit.wire import P

from .protocol_samples import CODEC_FACTORIES, Direction, all_valid_encodings, union_members

EXAMPLES = 3000
MUTATIONS_PER_MESSAGE = 600
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, never flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STRUCTURED_EXAMPLES = 1000  # each costs more to draw; the mutation fuzz below covers the same ground
TREE_EXAMPLES = 2000
FUZZ_STRUCTURED = settings(FUZZ, max_examples=STRUCTURED_EXAMPLES)
FUZZ_TREES = settings(FUZZ, max_examples=TREE_EXAMPLES)
CODECS = [make() for make in CODEC_FACTORIES]
PREFIXES = [b"", P.SPLIT_PREFIX, P.PACKED_PREFIX, bytes([P.PROTOCOL_VERSION, 2]), bytes([0, 1]), bytes([2, 0])]


def decode_or_protocol_error(codec: P.Codec, frames: list[Any]) -> Any:
    """Decode; ``None`` on ProtocolError; any other exception fails the test."""
    try:
        message, buffers = codec.decode(frames)
    except ProtocolError:
        return None
    assert isinstance(message, msgspec.Struct)
    assert all(isinstance(memoryview(b), memoryview) for b in buffers)
    return message, buffers


def decode_everywhere(frames: list[Any]) -> None:
    for codec in CODECS:
        decode_or_protocol_error(codec, frames)


def trees_of(message: msgspec.Struct) -> list[P.TensorTree]:
    return [v for v in (getattr(message, f) for f in message.__struct_fields__) if isinstance(v, P.TensorTree)]


def decode_message_tensors(message: msgspec.Struct, buffers: list[Any]) -> None:
    """What a receiver does next: each TensorTree takes its buffers in order (the last the rest)."""
    trees = trees_of(message)
    at = 0
    for i, tree in enumerate(trees):
        n = len(buffers) - at if i == len(trees) - 1 else len(tree.metas)
        try:
            value = P.decode_tensors(tree, list(buffers[at:at + n]), 1 << 20)
        except (BadInput, ProtocolError):
            return
        _check_decoded(tree, value)
        at += n


def _check_decoded(tree: P.TensorTree, value: Any) -> None:
    if tree.layout == "none":
        assert value is None
    elif tree.layout == "tensor":
        assert isinstance(value, torch.Tensor)
    elif tree.layout == "tuple":
        assert isinstance(value, tuple) and len(value) == len(tree.metas)
    else:
        assert isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())
        if len(set(tree.keys)) != len(tree.keys):
            return  # duplicate keys: see test_protocol.py::test_dict_layout_with_duplicate_keys_is_refused
    leaves = [value] if isinstance(value, torch.Tensor) else list(value.values()) if isinstance(value, dict) else list(value or ())
    for meta, t in zip(tree.metas, leaves):
        assert t.dtype == P.DTYPES[meta.dtype] and tuple(t.shape) == tuple(meta.shape)


# --------------------------------------------------------------------------- arbitrary bytes

frame_bytes = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda p, b: p + b, st.sampled_from(PREFIXES), st.binary(max_size=200)),
    # A packed frame whose head is well formed and whose table may or may not add up.
    st.builds(
        lambda hl, sizes, body, pad: P.PACKED_PREFIX + struct.pack("<IH", hl, len(sizes))
        + struct.pack(f"<{len(sizes)}I", *sizes) + body[:hl + sum(sizes) + pad],
        st.integers(0, 64),
        st.lists(st.integers(0, 16), max_size=5),
        st.binary(min_size=0, max_size=200),
        st.integers(-3, 3),
    ),
)


def as_frame(data: bytes, kind: int) -> Any:
    return [data, memoryview(data), bytearray(data)][kind]


def test_arbitrary_single_frame() -> None:
    ran = 0

    @FUZZ
    @given(data=frame_bytes, kind=st.integers(0, 2))
    def run(data: bytes, kind: int) -> None:
        nonlocal ran
        ran += 1
        decode_everywhere([as_frame(data, kind)])

    run()
    assert ran >= EXAMPLES


def test_arbitrary_frame_lists() -> None:
    ran = 0

    @FUZZ
    @given(frames=st.lists(st.tuples(frame_bytes, st.integers(0, 2)), max_size=4))
    def run(frames: list[tuple[bytes, int]]) -> None:
        nonlocal ran
        ran += 1
        decode_everywhere([as_frame(d, k) for d, k in frames])

    run()
    assert ran >= EXAMPLES


# --------------------------------------------------------------------------- structured headers

TAGS = sorted(
    {cls.__name__ for union in (P.ClientMessage, P.CoordinatorReply, P.WorkerCommand, P.WorkerEvent) for cls in union_members(union)}
    | {"", "Nope", "TensorTree", "ModelInfo"}
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=12), st.binary(max_size=12), st.sampled_from(["tensor", "tuple", "dict", "none", "float32", "bool", "shm", "cuda", "param"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
tree_like = st.builds(
    lambda layout, metas, keys: [layout, metas, keys],
    st.sampled_from(["tensor", "tuple", "dict", "none", "other"]),
    st.lists(st.tuples(st.sampled_from([*P.DTYPES, "float8"]), st.lists(st.integers(-2, 5), max_size=3)), max_size=3),
    st.lists(st.text(max_size=3), max_size=3),
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    tag = draw(st.sampled_from(TAGS))
    fields = draw(st.lists(st.one_of(scalars, values, tree_like), max_size=8))
    shape = draw(st.sampled_from(["array", "map", "raw"]))
    if shape == "array":
        return msgspec.msgpack.encode([tag, *fields])
    if shape == "map":
        return msgspec.msgpack.encode({"type": tag, **{f"f{i}": v for i, v in enumerate(fields)}})
    return draw(st.binary(max_size=64))


def test_structured_headers() -> None:
    ran = 0

    @FUZZ_STRUCTURED
    @given(header=headers(), buffers=st.lists(st.binary(max_size=40), max_size=4), packed=st.booleans())
    def run(header: bytes, buffers: list[bytes], packed: bool) -> None:
        nonlocal ran
        ran += 1
        if packed:
            table = struct.pack(f"<{len(buffers)}I", *map(len, buffers))
            frames = [P.PACKED_PREFIX + struct.pack("<IH", len(header), len(buffers)) + table + header + b"".join(buffers)]
        else:
            frames = [P.SPLIT_PREFIX + header, *buffers]
        for codec in CODECS:
            got = decode_or_protocol_error(codec, frames)
            if got is not None:
                assert [bytes(b) for b in got[1]] == buffers
                decode_message_tensors(*got)

    run()
    assert ran >= STRUCTURED_EXAMPLES


# --------------------------------------------------------------------------- mutations of valid messages


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    kind = rng.randrange(9)
    i = rng.randrange(len(frames))
    f = bytearray(frames[i])
    # Bias positions towards the prefix, the table and the msgpack header.
    def pos() -> int:
        return rng.randrange(min(len(f), 80)) if rng.random() < 0.8 else rng.randrange(len(f))

    if kind == 0 and f:  # flip 1..4 bits
        for _ in range(rng.randint(1, 4)):
            f[pos()] ^= 1 << rng.randrange(8)
    elif kind == 1 and f:  # set a byte to an interesting value
        f[pos()] = rng.choice([0, 1, 0x7F, 0x80, 0xC0, 0xC1, 0xDC, 0xDD, 0xDE, 0xFF, rng.randrange(256)])
    elif kind == 2:  # truncate
        del f[rng.randrange(len(f) + 1):]
    elif kind == 3:  # extend
        f += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    elif kind == 4 and f:  # delete a span
        a = pos()
        del f[a:a + rng.randint(1, 8)]
    elif kind == 5:  # insert a span
        a = pos() if f else 0
        f[a:a] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 6 and len(f) >= 6:  # rewrite a u32 length field of a packed frame
        struct.pack_into("<I", f, rng.choice([2, 8, 12]) if len(f) >= 16 else 2, rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**16)]))
    elif kind == 7:  # drop, duplicate or add a frame
        what = rng.randrange(3)
        if what == 0 and len(frames) > 1:
            del frames[rng.randrange(len(frames))]
        elif what == 1:
            frames.insert(rng.randrange(len(frames) + 1), frames[rng.randrange(len(frames))])
        else:
            frames.append(bytes(rng.randrange(256) for _ in range(rng.randrange(16))))
        return frames
    elif kind == 8 and len(frames) > 1:  # swap two frames
        a, b = rng.sample(range(len(frames)), 2)
        frames[a], frames[b] = frames[b], frames[a]
        return frames
    frames[i] = bytes(f)
    return frames


def test_mutated_valid_messages() -> None:
    rng = random.Random(20240601)
    encodings = all_valid_encodings()
    assert len(encodings) >= 40
    cases = decoded = 0
    for direction, frames in encodings:
        receiver = direction.receiver()
        for _ in range(MUTATIONS_PER_MESSAGE):
            mutated = mutate(rng, frames)
            cases += 1
            got = decode_or_protocol_error(receiver, mutated)
            if got is not None:
                decoded += 1
                assert type(got[0]) in union_members(direction.union)
                decode_message_tensors(*got)
            for codec in CODECS:
                decode_or_protocol_error(codec, mutated)
    assert cases >= 24_000
    # Mutations of tensor bytes and of string contents still decode: the fuzz reached both sides.
    assert 0 < decoded < cases


def test_valid_encodings_decode_unmutated() -> None:
    for direction, frames in all_valid_encodings():
        got = decode_or_protocol_error(direction.receiver(), frames)
        assert got is not None
        _check_direction(direction, got[0])
        decode_message_tensors(*got)


def _check_direction(direction: Direction, message: Any) -> None:
    assert type(message) in union_members(direction.union)


# --------------------------------------------------------------------------- decode_tensors on fuzzed trees

dims = st.one_of(st.integers(-2, 6), st.sampled_from([0, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]))
metas = st.builds(
    P.TensorMeta,
    st.one_of(st.sampled_from(list(P.DTYPES)), st.sampled_from(["float8", "", "complex64", "int4", "Float32"])),
    st.lists(dims, max_size=P.MAX_NDIM + 1).map(tuple),
)


@st.composite
def trees_and_buffers(draw: st.DrawFn) -> tuple[P.TensorTree, list[Any]]:
    layout = draw(st.sampled_from(["tensor", "tuple", "dict", "none"]))
    ms = draw(st.lists(metas, max_size=4))
    keys = draw(st.one_of(st.lists(st.text(max_size=3), min_size=len(ms), max_size=len(ms)), st.lists(st.text(max_size=3), max_size=5)))
    raw = msgspec.msgpack.encode(P.TensorTree(layout, tuple(ms), tuple(keys)))  # type: ignore[arg-type]
    tree = msgspec.msgpack.decode(raw, type=P.TensorTree)  # exactly what a peer's header would decode to
    buffers: list[Any] = []
    for m in ms:
        try:
            need = P.tensor_nbytes(m)
        except BadInput:
            need = None
        if need is not None and need <= 256 and draw(st.booleans()):
            buffers.append(draw(st.binary(min_size=need, max_size=need)))
        else:
            buffers.append(draw(st.binary(max_size=64)))
    buffers += draw(st.lists(st.binary(max_size=8), max_size=1))
    if buffers and draw(st.booleans()):
        buffers = [memoryview(b) for b in buffers]
    return tree, buffers


def test_decode_tensors_fuzzed_trees() -> None:
    ran = ok = 0

    @FUZZ_TREES
    @given(case=trees_and_buffers(), bound=st.sampled_from([0, 100, 1 << 20, P.DEFAULT_MAX_MESSAGE_BYTES]))
    def run(case: tuple[P.TensorTree, list[Any]], bound: int) -> None:
        nonlocal ran, ok
        ran += 1
        tree, buffers = case
        try:
            value = P.decode_tensors(tree, buffers, bound)
        except (BadInput, ProtocolError):
            return
        ok += 1
        _check_decoded(tree, value)

    run()
    assert ran >= TREE_EXAMPLES
    assert ok > 0
