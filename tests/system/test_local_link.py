"""Clients on the coordinator's host over its Unix socket: the same answers as over ZeroMQ, large
messages included; a client that breaks the link's rules, or dies with calls out, is dropped
alone and the coordinator goes on serving; ``local_link=False`` stays on ZeroMQ."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import msgspec
import psutil
import pytest
import torch
from cohort_harness import ROOT, mlp_group

from core.codec import PROTOCOL_VERSION, client_codec
from core.messages import ListModels, ModelsReply, SubmitJob
from core.tensors import encode_tensors
from core.unix_link import UnixLink
from scheduler import ProtocolError
from scheduler.local_clients import local_name


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from cohort_harness import start_cohort

    r = start_cohort(tmp_path_factory.mktemp("local"), [mlp_group("mlp", 3)], workers=2)
    yield r
    r.close()


def _seqpackets() -> int:
    """This process's Unix sequenced-packet sockets: a local link is one; ZeroMQ uses none."""
    return sum(c.type == socket.SOCK_SEQPACKET for c in psutil.Process().net_connections(kind="unix"))


def _local_path(running) -> str:
    """The coordinator's Unix socket for local clients (abstract: no file)."""
    name = local_name(running.address)
    assert name is not None and name.startswith("\0")
    return name


def _still_serving(running) -> None:
    with running.client(timeout=10) as c:
        assert c.infer("mlp/0", torch.randn(2, 8)).shape == (2, 4)


def test_a_local_client_calls_over_the_unix_socket_with_the_same_answers(running) -> None:
    x = torch.randn(64, 8)
    with running.client(timeout=30) as local, running.client(timeout=30, local_link=False) as remote:
        before = _seqpackets()
        y_remote = remote.infer("mlp/1", x)
        assert _seqpackets() == before, "local_link=False went over the Unix socket"
        y_local = local.infer("mlp/1", x)
        # The coordinator's socket, and the one the worker of mlp/1 answered on (passed by the coordinator).
        assert _seqpackets() == before + 2, "a local client did not use the Unix sockets"
        assert torch.equal(y_local, y_remote)
        inputs = [torch.randn(4, 8) for _ in range(40)]
        alone = [remote.infer("mlp/2", x) for x in inputs]
        # in order; jobs the worker joined into one call may differ in the last bits
        for a, b in zip(local.map("infer", "mlp/2", inputs, depth=8), alone, strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(local.ensemble("mlp", x), remote.ensemble("mlp", x))


def test_large_messages_cross_the_unix_socket_whole(running) -> None:
    # shm=False: the tensors go in the messages themselves, 2 MB each way, cut into many records
    x = torch.randn(65_536, 8)
    with running.client(timeout=60, shm=False) as local, running.client(timeout=60, local_link=False, shm=False) as remote:
        assert torch.equal(local.infer("mlp/0", x), remote.infer("mlp/0", x))
        weights = local.get_weights("mlp/0")
        assert all(torch.equal(weights[k], v) for k, v in remote.get_weights("mlp/0").items())


def test_unreadable_messages_on_the_unix_socket_get_protocol_error(running) -> None:
    link = UnixLink.connect(_local_path(running), blocking=True)
    try:
        for frames in ([b"\x00garbage"], [bytes([PROTOCOL_VERSION, 0]) + msgspec.msgpack.encode(["NoSuchMessage", 7])]):
            link.send(frames)
            assert link.wait(10_000)
            reply, _ = client_codec().decode(link.recv())
            assert reply.error == ProtocolError.__name__
        link.send(client_codec().encode(ListModels(42)))  # the same connection still works
        assert link.wait(10_000)
        reply, _ = client_codec().decode(link.recv())
        assert isinstance(reply, ModelsReply) and reply.req_id == 42
    finally:
        link.close()
    _still_serving(running)


@pytest.mark.parametrize("record", [b"abc", (1 << 40).to_bytes(8, "little") + (1).to_bytes(4, "little")],
                         ids=["shorter-than-a-header", "a-terabyte-promised"])
def test_a_client_that_breaks_the_links_rules_is_dropped_alone(running, record) -> None:
    with running.client(timeout=10) as bystander:
        bystander.infer("mlp/0", torch.randn(2, 8))  # connected over the Unix socket before the bad one
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bad.connect(_local_path(running))
        bad.send(record)
        bad.settimeout(10)
        assert bad.recv(100) == b"", "the coordinator kept a client that broke the rules"
        bad.close()
        assert bystander.infer("mlp/0", torch.randn(2, 8)).shape == (2, 4)
    assert "Traceback" not in running.log()


CLIENT_WITH_CALLS_OUT = """
import sys, torch
from scheduler import Client
c = Client(sys.argv[1], timeout=60)
stream = c.map("infer", "mlp/0", (torch.randn(512, 8) for _ in range(10**9)), depth=64)
next(stream)
print("streaming", flush=True)
for _ in stream:
    pass
"""


def test_a_client_killed_with_calls_out_leaves_the_coordinator_serving(running) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen([sys.executable, "-c", CLIENT_WITH_CALLS_OUT, running.address], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
        time.sleep(0.3)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    _still_serving(running)
    deadline = time.monotonic() + 30
    while (stats := running.stats())["in_flight"] or stats["queued"]:  # its calls run out and are dropped
        assert time.monotonic() < deadline, "the killed client's calls never left the coordinator"
        time.sleep(0.1)
    assert "Traceback" not in running.log()


def test_a_thread_that_began_before_its_coordinator_moves_to_the_unix_socket(tmp_path) -> None:
    from cohort_harness import start_cohort

    from scheduler import Client, JobTimeout

    address = f"ipc://{tmp_path}/late/coordinator.sock"  # where start_cohort(name="late") will listen
    with Client(address, timeout=1) as c:
        before = _seqpackets()
        with pytest.raises(JobTimeout):
            c.models()  # nobody listens yet: this thread's connection is ZeroMQ's
        running = start_cohort(tmp_path, [mlp_group("mlp", 1)], name="late")
        try:
            assert running.address == address
            c.timeout = 30
            c.infer("mlp/0", torch.randn(2, 8))
            time.sleep(1.2)  # a thread on ZeroMQ looks for the Unix socket again at most once a second
            c.infer("mlp/0", torch.randn(2, 8))
            assert _seqpackets() == before + 2, "the thread stayed on ZeroMQ"  # the coordinator's, the worker's
            assert c.infer("mlp/0", torch.randn(2, 8)).shape == (2, 4)
        finally:
            running.close()


def test_a_zeromq_peer_named_like_a_local_client_is_ignored(running) -> None:
    import zmq

    from scheduler.local_clients import KEY_PREFIX

    with running.client(timeout=10) as local:
        local.infer("mlp/0", torch.randn(2, 8))  # a local client, whose key the impostor takes
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, KEY_PREFIX + b"1")
        s.connect(running.address)
        jobs = running.stats()["models"]["mlp/0"]["jobs"]
        try:
            tree, buffers = encode_tensors(torch.randn(2, 8))
            s.send_multipart(client_codec().encode(SubmitJob(7, "infer", "mlp/0", tree), buffers))
            assert not s.poll(1000), "a ZeroMQ peer posing as a local client was answered"
        finally:
            s.close()
        assert running.stats()["models"]["mlp/0"]["jobs"] == jobs, "its job ran (its answer went to the local client)"
        assert local.infer("mlp/0", torch.randn(2, 8)).shape == (2, 4)
