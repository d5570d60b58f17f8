"""The client's connection rules against a bare ROUTER socket standing in for the coordinator.

A request that waited for a coordinator to appear carries only the time its caller has
left (the coordinator counts a job's deadline from when it receives it), on both the
blocking path and the ``submit`` path.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from core.codec import coordinator_client_codec, unbundle
from core.messages import Requests, SubmitJob
from scheduler import Client, JobTimeout

TIMEOUT_S = 6.0
LATE_S = 2.0  # the stand-in coordinator starts listening this long after the call


@pytest.fixture
def address() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="cohort-link-"))
    yield f"ipc://{root}/coordinator.sock"
    shutil.rmtree(root, ignore_errors=True)


def _recv_requests(router: zmq.Socket, codec) -> tuple[bytes, list]:  # type: ignore[no-untyped-def]
    """One message from a client: its routing id and the requests in it, bundled or not."""
    frames = router.recv_multipart(copy=False)
    message, buffers = codec.decode([f.buffer for f in frames[1:]])
    items = unbundle(message.requests, buffers) if isinstance(message, Requests) else [(message, buffers)]
    return frames[0].bytes, [m for m, _ in items]


def _serve(address: str, loop, delay_s: float = 0.0) -> threading.Thread:  # type: ignore[no-untyped-def]
    """On a thread: after ``delay_s``, bind a ROUTER at ``address`` and run ``loop(router, codec)``."""

    def serve() -> None:
        time.sleep(delay_s)
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(address)
        try:
            loop(router, coordinator_client_codec())
        finally:
            router.close(linger=0)
            context.term()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _late_router(address: str, received: list[SubmitJob], done: threading.Event) -> threading.Thread:
    """Bind after ``LATE_S``, record the first job request that arrives, answer nothing; stay up until ``done``."""

    def loop(router: zmq.Socket, codec) -> None:  # type: ignore[no-untyped-def]
        if router.poll(int(TIMEOUT_S * 1000)):
            received.extend(m for m in _recv_requests(router, codec)[1] if isinstance(m, SubmitJob))
        done.wait(TIMEOUT_S * 2)  # closing earlier would drop the connection under the call

    return _serve(address, loop, delay_s=LATE_S)


@pytest.mark.parametrize("path", ["blocking", "submit"])
def test_a_request_that_waited_for_the_coordinator_carries_the_time_it_has_left(address: str, path: str) -> None:
    received: list[SubmitJob] = []
    done = threading.Event()
    server = _late_router(address, received, done)
    try:
        with Client(address, timeout=TIMEOUT_S) as client:
            began = time.monotonic()
            with pytest.raises(JobTimeout):
                if path == "blocking":
                    client.infer("m/0", torch.zeros(1, 4))
                else:
                    client.submit("infer", "m/0", torch.zeros(1, 4)).result(timeout=TIMEOUT_S + 5)
            assert time.monotonic() - began < TIMEOUT_S + 2
    finally:
        done.set()
        server.join(TIMEOUT_S)
    [job] = received
    assert job.timeout_s is not None
    assert job.timeout_s <= TIMEOUT_S - LATE_S + 0.5, job.timeout_s  # not the full timeout it started with
    assert job.timeout_s > 0


def _answering_router(address: str, stop: threading.Event) -> threading.Thread:
    """A stand-in coordinator that answers every job at once with a one-element tensor."""
    from core.messages import JobDone, Replies
    from core.tensors import encode_tensors

    tree, buffers = encode_tensors(torch.ones(1))

    def loop(router: zmq.Socket, codec) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set():
            if router.poll(50):
                client, requests = _recv_requests(router, codec)
                replies = [JobDone(m.req_id, tree) for m in requests]
                reply = replies[0] if len(replies) == 1 else Replies(0, replies)
                router.send_multipart([client, *codec.encode(reply, buffers * len(replies))])

    return _serve(address, loop)


def test_pipelined_submits_from_threads_never_lose_a_wake_up(address: str) -> None:
    """Submitting threads and the I/O thread race on one wake-up pipe: every request must go out."""
    stop = threading.Event()
    server = _answering_router(address, stop)
    per_thread, window = 4000, 64
    stuck: list[str] = []
    try:
        with Client(address, timeout=30) as client:

            def pipeline(name: str) -> None:
                slots = threading.Semaphore(window)
                for i in range(per_thread):
                    if not slots.acquire(timeout=10):
                        stuck.append(f"{name} stuck after {i} submits")
                        return
                    client.submit("infer", "m/0", torch.zeros(1)).add_done_callback(lambda _: slots.release())
                for _ in range(window):
                    if not slots.acquire(timeout=10):
                        stuck.append(f"{name}: the last answers never came")
                        return

            threads = [threading.Thread(target=pipeline, args=(f"thread {k}",)) for k in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    finally:
        stop.set()
        server.join(10)
    assert stuck == []
