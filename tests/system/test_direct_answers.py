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


def test_what_waits_for_a_job_answered_directly_is_not_kept_waiting(tmp_path) -> None:
    """A worker's word on the jobs it answered directly does not wake an idle coordinator; it must wake
    one that waits for it: a job behind a full window (of one job), a barrier. Each time, another
    client's call goes out while a slow job answered directly runs, and must end right after it, not
    at the coordinator's next idle turn (up to 50 ms later)."""
    import threading

    from cohort_harness import start_cohort
    from fixture_models import group

    running = start_cohort(tmp_path, [group("slow", "sleepy", count=2)], workers=1, window=1)
    gaps: dict[str, list[float]] = {"infer": [], "barrier": []}
    try:
        with running.client(timeout=30) as first, running.client(timeout=30) as second:
            first.infer("slow/0", torch.zeros(1, 4))  # each has its answer socket before the timing
            second.infer("slow/1", torch.zeros(1, 4))
            for k in range(16):
                op = "infer" if k % 2 == 0 else "barrier"
                ended: dict[str, float] = {}

                def other(op: str = op, ended: dict[str, float] = ended) -> None:
                    second.infer("slow/1", torch.zeros(1, 4)) if op == "infer" else second.barrier()
                    ended["other"] = time.monotonic()

                slow = torch.zeros(1, 4)
                slow[0, 0] = 0.125  # seconds the job sleeps: not a multiple of the idle turn, 50 ms after the other call
                thread = threading.Thread(target=lambda: time.sleep(0.05) or other())
                thread.start()
                first.infer("slow/0", slow)
                ended["slow"] = time.monotonic()
                thread.join(30)
                gaps[op].append(ended["other"] - ended["slow"])
        for op, values in gaps.items():
            values.sort()
            assert values[len(values) // 2] < 0.015, f"{op}: waited {[round(v * 1000, 1) for v in values]} ms"
        assert "Traceback" not in running.log()
    finally:
        running.close()
