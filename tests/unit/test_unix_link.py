"""The Unix link: messages of frames come whole and in order, small or cut into many records;
a non-blocking end keeps what the socket cannot take and sends it in order; the end of the other
side is seen, never a hang or a spin."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from core.unix_link import RECORD_BYTES, LinkClosed, UnixLink


@pytest.fixture
def ends():
    near, far_socket = UnixLink.pair(blocking=False)
    far = UnixLink(far_socket, blocking=True)
    yield near, far
    near.close()
    far.close()


def _recv(link: UnixLink) -> list[bytes]:
    assert link.wait(5000)
    frames = link.recv()
    while frames is None:  # a non-blocking end may have taken only part of a long message
        assert link.wait(5000)
        frames = link.recv()
    return [bytes(f) for f in frames]


def test_small_messages_come_whole_and_in_order(ends):
    near, far = ends
    sent = [[b"a"], [b"", b"bc", b""], [], [bytes(range(256)) * 3, b"x"]]
    for frames in sent:
        near.send(frames)
    assert [_recv(far) for _ in sent] == sent
    assert far.recv() is None  # nothing more: no wait on an empty link


def test_any_buffer_is_a_frame(ends):
    near, far = ends
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    near.send([zmq.Frame(b"zmq"), memoryview(b"view"), bytearray(b"ba"), array])
    frames = _recv(far)
    assert frames[:3] == [b"zmq", b"view", b"ba"]
    assert np.array_equal(np.frombuffer(frames[3], np.float32).reshape(3, 4), array)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3 * RECORD_BYTES), min_size=0, max_size=5))
def test_messages_of_any_size_come_back_byte_for_byte(sizes):
    near, far_socket = UnixLink.pair(blocking=False)
    far = UnixLink(far_socket, blocking=True)
    try:
        frames = [os.urandom(size) for size in sizes]
        received: list[list[bytes]] = []
        reader = threading.Thread(target=lambda: received.append(_recv(far)))
        reader.start()
        near.send(frames)
        while not near.flush():
            near.wait(10)  # the reader drains the socket; the near end keeps the rest meanwhile
        reader.join(10)
        assert received == [frames]
    finally:
        near.close()
        far.close()


def test_a_non_blocking_end_keeps_what_the_socket_cannot_take_and_sends_it_in_order(ends):
    near, far = ends
    big = os.urandom(8 * RECORD_BYTES)
    count = 0
    while not near.wants_write:  # fill the socket until it refuses
        near.send([big, count.to_bytes(4, "little")])
        count += 1
    near.send([b"last"])  # behind the kept ones, never ahead of them
    received = []
    while len(received) < count + 1:
        near.flush()
        frames = far.recv() if far.wait(100) else None
        if frames is not None:
            received.append([bytes(f) for f in frames])
    assert [int.from_bytes(r[1], "little") for r in received[:count]] == list(range(count))
    assert all(r[0] == big for r in received[:count])
    assert received[-1] == [b"last"]
    assert near.flush() and not near.wants_write


def test_a_kept_message_is_a_copy_so_the_sender_may_reuse_its_buffer(ends):
    near, far = ends
    filler = bytes(RECORD_BYTES - 64)
    while not near.wants_write:
        near.send([filler])
    buffer = bytearray(b"before")
    near.send([buffer])
    buffer[:] = b"after!"
    last = None
    while last is None or last != [b"before"]:
        near.flush()
        last = _recv(far)
    assert last == [b"before"]


def test_the_end_of_the_other_side_is_seen_not_a_spin(ends):
    near, far = ends
    near.send([b"bye"])
    near.close()
    assert _recv(far) == [b"bye"]
    assert far.wait(1000)  # readable: the end is an event
    with pytest.raises(LinkClosed):
        far.recv()
    with pytest.raises(LinkClosed):
        far.send([b"anyone?"])


def test_sending_to_a_gone_end_raises_link_closed():
    near, far_socket = UnixLink.pair(blocking=False)
    far_socket.close()
    with pytest.raises(LinkClosed):
        near.send([b"x"])
    assert near.closed
    near.close()


def test_a_peer_dying_mid_message_ends_the_link():
    near, far_socket = UnixLink.pair(blocking=True)
    # a first record that promises more than ever comes, then the end
    far_socket.send((10 * RECORD_BYTES).to_bytes(8, "little") + (1).to_bytes(4, "little")
                    + (10 * RECORD_BYTES).to_bytes(8, "little") + bytes(100))
    far_socket.close()
    with pytest.raises(LinkClosed):
        near.recv()
    near.close()


def test_connect_reaches_a_listener(tmp_path):
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    client = UnixLink.connect(path, blocking=True)
    accepted, _ = listener.accept()
    server = UnixLink(accepted, blocking=False)
    client.send([b"hello"])
    assert _recv(server) == [b"hello"]
    server.send([b"back"])
    assert _recv(client) == [b"back"]
    for s in (client, server):
        s.close()
    listener.close()


def _raw_pair(max_message_bytes: int | None = None) -> tuple[UnixLink, socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return UnixLink(mine, blocking=False, max_message_bytes=max_message_bytes), theirs


def _head(payload: int, lengths: list[int]) -> bytes:
    return payload.to_bytes(8, "little") + len(lengths).to_bytes(4, "little") + b"".join(
        n.to_bytes(8, "little") for n in lengths)


@pytest.mark.parametrize("record", [
    b"short",  # shorter than a header
    _head(3, [1, 1]) + b"abc",  # frame lengths that do not add up to the payload
    _head(1, [1]) + b"ab",  # a record longer than the message it starts
])
def test_a_message_that_breaks_the_rules_closes_the_link_never_the_reader(record):
    link, peer = _raw_pair()
    peer.send(record)
    assert link.wait(1000)
    with pytest.raises(LinkClosed, match="rules"):
        link.recv()
    assert link.closed
    peer.close()


def test_a_message_over_the_bound_closes_the_link_before_any_of_it_is_kept():
    link, peer = _raw_pair(max_message_bytes=1000)
    peer.send(_head(1 << 40, [1 << 40]))  # a terabyte promised: refused from its header alone
    assert link.wait(1000)
    with pytest.raises(LinkClosed, match="over the bound"):
        link.recv()
    peer.close()
    ok, ok_peer = _raw_pair(max_message_bytes=1000)
    UnixLink(ok_peer, blocking=True).send([bytes(900)])
    assert ok.wait(1000) and [bytes(f) for f in ok.recv()] == [bytes(900)]
    ok.close()


def test_what_a_peer_sent_before_it_went_is_read_though_ours_to_it_were_unread(ends):
    near, far = ends
    near.send([b"never read"])  # left unread: the kernel reports the reset once, before the data
    far.send([b"last words"])
    far.close()
    assert near.wait(1000)
    assert [bytes(f) for f in near.recv()] == [b"last words"]
    with pytest.raises(LinkClosed):
        near.recv()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another user")
def test_a_listener_of_another_user_is_refused(tmp_path):
    name = f"\0cohort-test-{os.getpid()}-{id(tmp_path)}"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another user takes the name first
        try:
            os.setuid(65534)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(name)
            listener.listen(1)
            os.write(ready_w, b"x")
            listener.settimeout(10)
            listener.accept()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(PermissionError, match="another user"):
            UnixLink.connect(name, blocking=True)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_closing_a_link_wakes_a_thread_waiting_on_it(ends):
    near, _ = ends
    woke: list[float] = []
    waiter = threading.Thread(target=lambda: (near.wait(20_000), woke.append(time.monotonic())))
    waiter.start()
    time.sleep(0.2)
    closed = time.monotonic()
    near.close()
    waiter.join(10)
    assert woke and woke[0] - closed < 5, "a thread waiting on a closed link slept on"


def test_a_passed_socket_arrives_between_messages_and_works():
    near, far_socket = UnixLink.pair(blocking=False)
    far = UnixLink(far_socket, blocking=True, takes_sockets=True)
    mine, theirs = UnixLink.pair(blocking=False)
    try:
        near.send([b"before"])
        assert near.send_socket(theirs, 7)
        theirs.close()  # the kernel holds the passed duplicate
        near.send([b"after"])
        assert _recv(far) == [b"before"]
        assert _recv(far) == [b"after"]  # the passed socket's record is not a message
        [(tag, passed)] = far.take_sockets()
        assert tag == 7 and far.take_sockets() == []
        got = UnixLink(passed, blocking=False)
        assert got.send_now([b"over the passed socket"])
        assert _recv(mine) == [b"over the passed socket"]
        got.close()
    finally:
        for link in (near, far, mine):
            link.close()


def test_an_end_that_takes_no_sockets_drops_them_and_reads_on(ends):
    near, far = ends
    _, theirs = UnixLink.pair(blocking=False)
    assert near.send_socket(theirs, 3)
    theirs.close()
    near.send([b"next"])
    assert _recv(far) == [b"next"]
    assert far.take_sockets() == []
    fds = len(os.listdir("/proc/self/fd"))
    near.send_socket(socket.socket(fileno=os.dup(near.fileno())), 4)
    near.send([b"again"])
    assert _recv(far) == [b"again"]
    assert len(os.listdir("/proc/self/fd")) <= fds + 1  # the duplicate sent; none received and kept


def test_send_now_sends_one_record_or_nothing(ends):
    near, far = ends
    assert not near.send_now([bytes(RECORD_BYTES)])  # more than one record with its header: not sent
    assert near.send_now([b"x" * 100])
    assert _recv(far) == [b"x" * 100]
    sent = 0
    while near.send_now([bytes(60_000)]):  # until the socket is full: never blocks, never keeps a copy
        sent += 1
        assert sent < 10_000
    assert not near.wants_write
    for _ in range(sent):
        assert _recv(far) == [bytes(60_000)]
