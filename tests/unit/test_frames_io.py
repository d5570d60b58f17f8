"""The plain-call frame helpers keep ZeroMQ's message boundaries and say when nothing waits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from core.frames_io import NOBLOCK, readable, recv_frames, send_frames


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    context = zmq.Context()
    address = f"inproc://frames-{uuid.uuid4().hex}"
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind(address)
    b.connect(address)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    context.term()


def test_messages_keep_their_frames_and_their_order(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    a, b = pair
    messages = [[b"one"], [b"two", b"", b"x" * 70_000], [memoryview(b"three"), bytearray(b"four")]]
    for frames in messages:
        send_frames(a, frames)
    send_frames(a, [b"zero-copy", b"y" * 100_000], copy=False)
    got = [[bytes(f.buffer) for f in recv_frames(b)] for _ in range(4)]
    assert got == [[bytes(f) for f in m] for m in messages] + [[b"zero-copy", b"y" * 100_000]]


def test_readable_says_whether_a_message_waits(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    a, b = pair
    assert not readable(b)
    with pytest.raises(zmq.Again):
        recv_frames(b, NOBLOCK)
    send_frames(a, [b"h", b"body"], NOBLOCK)
    assert b.poll(1000)
    assert readable(b)
    assert [bytes(f.buffer) for f in recv_frames(b, NOBLOCK)] == [b"h", b"body"]
    assert not readable(b)


def test_a_router_reply_reaches_the_peer_it_names() -> None:
    context = zmq.Context()
    address = f"inproc://router-{uuid.uuid4().hex}"
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind(address)
        dealer.connect(address)
        send_frames(dealer, [b"request", b"payload"])
        identity, *body = recv_frames(router)
        assert [bytes(f.buffer) for f in body] == [b"request", b"payload"]
        send_frames(router, [identity.bytes, b"reply"], NOBLOCK)
        assert [bytes(f.buffer) for f in recv_frames(dealer)] == [b"reply"]
        with pytest.raises(zmq.ZMQError):  # an unknown peer: refused, as send_multipart refused it
            send_frames(router, [b"nobody", b"reply"], NOBLOCK)
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()
