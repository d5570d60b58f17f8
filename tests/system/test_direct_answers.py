"""Workers answer a local client's jobs themselves, on a socket the coordinator passes to both: the
coordinator counts each job done before its client has the answer (stats, versions and bounds are
exact for whoever asks next), a restarted worker answers again on a new socket, and an answer the
client's socket cannot take goes through the coordinator instead."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest
import torch
from cohort_harness import mlp_group

from core.codec import client_codec, coordinator_worker_codec
from core.messages import JobDone, PassOn
from core.unix_link import UnixLink
from workers.worker import Worker


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from cohort_harness import start_cohort

    r = start_cohort(tmp_path_factory.mktemp("direct"), [mlp_group("mlp", 2)], workers=1, max_queued_per_model=1)
    yield r
    r.close()


def _seqpackets() -> int:
    return sum(c.type == socket.SOCK_SEQPACKET for c in psutil.Process().net_connections(kind="unix"))


def _wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_job_answered_by_its_worker_is_counted_before_the_answer(running) -> None:
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    with running.client(timeout=30) as c:
        before = c.stats()["jobs"]["completed"]
        sockets = _seqpackets()
        for k in range(1, 41):
            c.infer("mlp/0", x)  # one queued job per model at most: a late count would be Overloaded here
            assert c.stats()["jobs"]["completed"] == before + k
        assert _seqpackets() == sockets + 1, "the worker did not answer on a socket of its own"
        version = {m.id: m.version for m in c.models()}["mlp/1"]
        for k in range(1, 21):
            c.train_step("mlp/1", x, y)
            assert {m.id: m.version for m in c.models()}["mlp/1"] == version + k
    assert "Traceback" not in running.log()


def test_a_restarted_worker_answers_on_a_new_socket(running) -> None:
    x = torch.randn(2, 8)
    with running.client(timeout=60) as c:
        c.infer("mlp/0", x)
        sockets = _seqpackets()
        worker = c.stats()["workers"][0]
        os.kill(worker["pid"], signal.SIGKILL)
        _wait_for(lambda: (w := c.stats()["workers"][0])["restarts"] == worker["restarts"] + 1
                  and w["state"] == "ready", 60, "the replacement worker")
        for _ in range(5):
            assert c.infer("mlp/0", x).shape == (2, 4)
        assert _seqpackets() == sockets, "the dead worker's socket was kept, or the new one not passed"


def test_an_answer_the_clients_socket_does_not_take_goes_to_the_coordinator() -> None:
    coordinator_end, worker_socket = UnixLink.pair(blocking=False)
    worker = Worker(UnixLink(worker_socket, blocking=True, takes_sockets=True), worker_id=3)
    full_client, full_theirs = UnixLink.pair(blocking=False)
    gone_client, gone_theirs = UnixLink.pair(blocking=False)
    worker._add_clients([(11, full_theirs), (12, gone_theirs)])
    try:
        while worker.clients[11].send_now([bytes(60_000)]):  # a client that reads nothing: its socket fills
            pass
        gone_client.close()
        answers = []
        for number, req_id in ((11, 5), (12, 6)):
            worker.answer_to[100 + req_id] = (number, req_id, False)
            answer = worker._direct_answer(100 + req_id, *_outputs(), None)
            assert answer is not None
            answers.append(answer)
        worker._send_answers(answers)
        assert coordinator_end.wait(5000)
        message, buffers = coordinator_worker_codec().decode(coordinator_end.recv())
        passed = list(message.results) if hasattr(message, "results") else [message]
        assert [(p.client, p.reply.req_id) for p in passed] == [(11, 5), (12, 6)]
        assert all(isinstance(p, PassOn) for p in passed) and len(buffers) == 2
        reply, own = client_codec().decode(worker.codec.encode(passed[0].reply, buffers[:1]))
        assert isinstance(reply, JobDone) and bytes(own[0]) == bytes(_outputs()[1][0])
        assert 11 in worker.clients and 12 not in worker.clients  # a full socket is kept, a gone one dropped
    finally:
        worker.close()
        coordinator_end.close()
        full_client.close()


def _outputs():
    from core.tensors import encode_tensors

    return encode_tensors(torch.arange(6, dtype=torch.float32).reshape(2, 3))
