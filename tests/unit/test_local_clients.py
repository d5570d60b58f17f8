"""The coordinator's Unix socket for local clients: one name per address, the same on both sides;
none for an address other hosts reach; clients of another user refused; each client answered by
its own key; a client that goes is forgotten."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import uuid

import pytest

from core.unix_link import UnixLink
from scheduler.local_clients import LocalClients, local_name


def test_one_name_per_address_and_none_for_other_hosts(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_name("ipc://c.sock") == local_name(f"ipc://{tmp_path}/c.sock")
    assert local_name("tcp://localhost:5555") == local_name("tcp://127.0.0.1:5555")
    assert local_name("tcp://[::1]:5555") is not None
    assert len({local_name("tcp://127.0.0.1:5555"), local_name("tcp://127.0.0.1:5556"),
                local_name("ipc:///tmp/a"), local_name("ipc:///tmp/b")}) == 4
    for remote in ("tcp://10.0.0.1:5555", "tcp://0.0.0.0:5555", "tcp://*:5555", "inproc://x"):
        assert local_name(remote) is None
    name = local_name("ipc:///tmp/a")
    assert name is not None and name.startswith("\0") and len(name) < 100  # abstract, within a Unix path's bound


@pytest.fixture
def address() -> str:
    return f"ipc:///tmp/cohort-test-{uuid.uuid4().hex}"


@pytest.fixture
def clients(address):
    local = LocalClients.open(address, max_message_bytes=1 << 20)
    assert local is not None
    yield local
    local.close()


def _serve_once(local: LocalClients) -> list[tuple[bytes, list[bytes]]]:
    """One turn of the coordinator's loop over the local clients: what each sent."""
    got: list[tuple[bytes, list[bytes]]] = []
    for _ in range(100):
        local.receive(dict.fromkeys(local.fds()), lambda key, frames: got.append((key, [bytes(f) for f in frames])))
        if got:
            return got
        os.sched_yield()
    return got


def test_each_client_is_answered_by_its_own_key_and_forgotten_when_it_goes(clients) -> None:
    a = UnixLink.connect(clients.name, blocking=True)
    b = UnixLink.connect(clients.name, blocking=True)
    local_fds_before = clients.version
    a.send([b"from a"])
    b.send([b"from b"])
    got = dict(_serve_once(clients))
    while len(got) < 2:
        got.update(_serve_once(clients))
    assert clients.version > local_fds_before  # two came: the loop polls them
    key_a = next(k for k, v in got.items() if v == [b"from a"])
    key_b = next(k for k, v in got.items() if v == [b"from b"])
    assert key_a != key_b and clients.owns(key_a) and not clients.owns(b"\x00\x01\x02\x03\x04")
    clients.send(key_b, [b"to b"])
    clients.send(key_a, [b"to a"])
    assert a.wait(5000) and [bytes(f) for f in a.recv()] == [b"to a"]
    assert b.wait(5000) and [bytes(f) for f in b.recv()] == [b"to b"]
    a.close()
    before = clients.version
    for _ in range(100):
        clients.receive(dict.fromkeys(clients.fds()), lambda key, frames: None)
        if clients.version != before:
            break
    assert clients.version != before, "a client that went was not forgotten"
    clients.send(key_a, [b"anyone?"])  # a reply to a gone client is dropped, not an error
    b.close()


def test_a_second_coordinator_on_the_same_address_goes_without(clients, address) -> None:
    assert LocalClients.open(address, 1 << 20) is None  # its clients use ZeroMQ; the first keeps its own


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_client_of_another_user_is_refused(clients) -> None:
    pid = os.fork()
    if pid == 0:  # the child: another user, connecting
        code = 1
        try:
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(clients.name)
            s.settimeout(10)
            code = 0 if s.recv(10) == b"" else 2  # closed by the coordinator's side
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        clients.receive(dict.fromkeys(clients.fds()), lambda key, frames: None)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.005)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the other user's client was never refused")
    assert os.waitstatus_to_exitcode(status) == 0
    assert clients.fds() == [clients.listener_fd]  # nobody kept


def test_a_link_that_cannot_take_a_message_is_polled_for_writing_until_it_has(tmp_path) -> None:
    import threading
    from types import SimpleNamespace

    from scheduler.loop_poll import LoopPoll

    near, far_socket = UnixLink.pair(blocking=False)
    far = UnixLink(far_socket, blocking=True)
    while not near.wants_write:
        near.send([bytes(60_000)])
    loop = LoopPoll(-1, [SimpleNamespace(link=near, notices=None)], None)  # type: ignore[list-item]
    def drain() -> None:  # a Unix socket is writable again once its reader has taken three quarters
        while far.wait(0):
            far.recv()

    reader = threading.Timer(0.3, drain)
    reader.start()
    try:
        began = time.monotonic()
        ready = loop.wait(10_000)
        assert time.monotonic() - began < 5, "the loop slept through the socket becoming writable"
        assert ready.get(near.fileno(), 0) & select.POLLOUT
        while near.wants_write:  # the loop's flush, turn after turn, as the reader takes the rest
            loop.flush()
            loop.wait(100)
            if far.wait(0):
                far.recv()
        assert not loop.wait(0), "a link with nothing left to send is still polled for writing"
    finally:
        reader.join()
        near.close()
        far.close()


def test_an_answer_socket_is_passed_once_and_only_between_messages(clients) -> None:
    client = UnixLink.connect(clients.name, blocking=True, takes_sockets=True)
    client.send([b"hello"])
    [(key, _)] = _serve_once(clients)
    coordinator_end, worker_socket = UnixLink.pair(blocking=False)
    worker = UnixLink(worker_socket, blocking=True, takes_sockets=True)
    try:
        assert clients.answer_socket(b"\x00local:999", 0, coordinator_end) == 0  # no such client
        clients.send(key, [bytes(8 << 20)])  # more than the socket takes: the rest waits to go
        assert clients.writing()
        assert clients.answer_socket(key, 0, coordinator_end) == 0  # nothing passed while a reply waits
        coordinator_end.send([b"job"])
        assert _frames(worker) == [b"job"] and worker.take_sockets() == []
        flusher = threading.Thread(target=_flush_all, args=(clients,))  # the coordinator sends the rest
        flusher.start()
        assert _frames(client) == [bytes(8 << 20)]
        flusher.join(10)
        assert not clients.writing()
        number = clients.answer_socket(key, 0, coordinator_end)
        assert number > 0 and clients.key(number) == key
        assert clients.answer_socket(key, 0, coordinator_end) == number  # once per client and worker
        coordinator_end.send([b"job"])
        client.send([b"next"])
        assert _serve_once(clients) == [(key, [b"next"])]
        assert _frames(worker) == [b"job"]
        [(tag, worker_end)] = worker.take_sockets()
        clients.send(key, [b"reply"])
        assert _frames(client) == [b"reply"]  # the passed socket came before it
        [(worker_id, client_end)] = client.take_sockets()
        assert (tag, worker_id) == (number, 0)
        UnixLink(worker_end, blocking=False).send_now([b"answer"])
        assert _frames(UnixLink(client_end, blocking=True)) == [b"answer"]
    finally:
        for link in (client, coordinator_end, worker):
            link.close()


def _flush_all(local: LocalClients) -> None:
    deadline = time.monotonic() + 10
    while local.writing() and time.monotonic() < deadline:
        local.flush()
        time.sleep(0.001)


def _frames(link: UnixLink) -> list[bytes]:
    assert link.wait(5000)
    frames = link.recv()
    while frames is None:
        assert link.wait(5000)
        frames = link.recv()
    return [bytes(f) for f in frames]
