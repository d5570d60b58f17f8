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

from scheduler import Client, JobTimeout
from scheduler.protocol import Requests, SubmitJob, coordinator_client_codec, unbundle

TIMEOUT_S = 6.0
LATE_S = 2.0  # the stand-in coordinator starts listening this long after the call


@pytest.fixture
def address() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="cohort-link-"))
    yield f"ipc://{root}/coordinator.sock"
    shutil.rmtree(root, ignore_errors=True)


def _late_router(address: str, received: list[SubmitJob], done: threading.Event) -> threading.Thread:
    """Bind after ``LATE_S``, record the first job request that arrives, answer nothing; stay up until ``done``."""

    def serve() -> None:
        time.sleep(LATE_S)
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(address)
        codec = coordinator_client_codec()
        try:
            if router.poll(int(TIMEOUT_S * 1000)):
                frames = router.recv_multipart(copy=False)
                message, buffers = codec.decode([f.buffer for f in frames[1:]])
                items = unbundle(message.requests, buffers) if isinstance(message, Requests) else [(message, buffers)]
                received.extend(m for m, _ in items if isinstance(m, SubmitJob))
            done.wait(TIMEOUT_S * 2)  # closing earlier would drop the connection under the call
        finally:
            router.close(linger=0)
            context.term()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


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
