"""The client's connection rules against a bare ROUTER socket standing in for the coordinator.

A request that waited for a coordinator to appear carries only the time its caller has
left (the coordinator counts a job's deadline from when it receives it), on both the
blocking path and the ``submit`` path. Requests queued while no coordinator listens go
out bundled; a thread's blocking call takes the queue while its submitted futures are
unanswered; both flavours raise a remote error as its own class, check sizes against
the coordinator's bound, and build an ``AsyncClient`` request only when it is awaited.
"""

from __future__ import annotations

import asyncio
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
from core.messages import ErrorReply, Hello, HelloReply, JobDone, Replies, Requests, SubmitJob
from core.tensors import encode_tensors
from scheduler import AsyncClient, BadInput, Client, JobTimeout, UnknownModel
from scheduler.client import MAX_BUNDLE

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


def _recording_router(address: str, stop: threading.Event, seen: list[tuple[bytes, list]],  # type: ignore[type-arg]
                      answer, delay_s: float = 0.0) -> threading.Thread:  # type: ignore[no-untyped-def]
    """Record every message as ``(routing id, requests)``; reply to each request for which
    ``answer(request)`` gives a ``(reply, buffers)``, bundled as the coordinator does."""

    def loop(router: zmq.Socket, codec) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set():
            if router.poll(50):
                client, requests = _recv_requests(router, codec)
                seen.append((client, requests))
                answers = [a for a in map(answer, requests) if a is not None]
                if answers:
                    reply = answers[0][0] if len(answers) == 1 else Replies(0, [r for r, _ in answers])
                    router.send_multipart([client, *codec.encode(reply, [b for _, bs in answers for b in bs])])

    return _serve(address, loop, delay_s)


def test_requests_queued_while_no_coordinator_listens_go_out_bundled(address: str) -> None:
    stop, seen = threading.Event(), []
    tree, buffers = encode_tensors(torch.ones(1))
    server = _recording_router(address, stop, seen, lambda m: (JobDone(m.req_id, tree), buffers), delay_s=LATE_S)
    count = MAX_BUNDLE + 44
    try:
        with Client(address, timeout=TIMEOUT_S + LATE_S) as client:
            futures = [client.submit("infer", "m/0", torch.zeros(1)) for _ in range(count)]
            results = [f.result(timeout=TIMEOUT_S + LATE_S) for f in futures]
    finally:
        stop.set()
        server.join(10)
    assert [len(requests) for _, requests in seen] == [MAX_BUNDLE, count - MAX_BUNDLE]
    assert [m.req_id for _, requests in seen for m in requests] == sorted(m.req_id for m in _calls(seen))
    assert all(torch.equal(r, torch.ones(1)) for r in results)


def _calls(seen: list[tuple[bytes, list]]) -> list:  # type: ignore[type-arg]
    return [m for _, requests in seen for m in requests]


def test_a_thread_with_unanswered_futures_sends_its_blocking_calls_through_the_queue(address: str) -> None:
    """Else a blocking call on the thread's own socket could overtake the jobs it submitted."""
    stop, seen = threading.Event(), []
    tree, buffers = encode_tensors(torch.ones(1))

    def loop(router: zmq.Socket, codec) -> None:  # type: ignore[no-untyped-def]
        held = []  # the job on "held" is answered only after the one on "m/1"
        while not stop.is_set():
            if router.poll(50):
                who, requests = _recv_requests(router, codec)
                seen.append((who, requests))
                for m in requests:
                    if m.target == "held":
                        held.append((who, m))
                        continue
                    for to, job in [(who, m), *(held if m.target == "m/1" else [])]:
                        router.send_multipart([to, *codec.encode(JobDone(job.req_id, tree), buffers)])

    server = _serve(address, loop)
    try:
        with Client(address, timeout=TIMEOUT_S) as client:
            client.infer("m/0", torch.zeros(1))  # no future unanswered: on this thread's own socket
            future = client.submit("infer", "held", torch.zeros(1))
            client.infer("m/1", torch.zeros(1))  # one is: through the queue, behind it
            future.result(timeout=TIMEOUT_S)
            time.sleep(0.2)  # the future's done callback, which counts it answered, runs just after
            client.infer("m/2", torch.zeros(1))  # all answered: its own socket again
    finally:
        stop.set()
        server.join(10)
    sender = {m.target: who for who, requests in seen for m in requests}
    assert [m.target for m in _calls(seen)] == ["m/0", "held", "m/1", "m/2"]
    assert sender["m/0"] != sender["held"]
    assert sender["m/1"] == sender["held"]
    assert sender["m/2"] == sender["m/0"]


def _error_or_bound(bound: int):  # type: ignore[no-untyped-def]
    """Answer a Hello with ``bound``, a job on ``bad/0`` with UnknownModel and a traceback."""

    def answer(m):  # type: ignore[no-untyped-def]
        if isinstance(m, Hello):
            return HelloReply(m.req_id, 1, "test", bound), []
        return ErrorReply(m.req_id, "UnknownModel", "no model bad/0", "Traceback (remote): here"), []

    return answer


def _check_remote_error(raised: pytest.ExceptionInfo[UnknownModel]) -> None:
    assert type(raised.value) is UnknownModel
    assert str(raised.value) == "no model bad/0" and raised.value.remote_traceback == "Traceback (remote): here"


BIG = torch.zeros(3 << 20, dtype=torch.uint8)  # over the size every coordinator answers


def test_client_raises_remote_errors_and_checks_the_coordinators_bound(address: str) -> None:
    stop, seen = threading.Event(), []
    server = _recording_router(address, stop, seen, _error_or_bound(2 << 20))
    try:
        with Client(address, timeout=TIMEOUT_S) as client:
            with pytest.raises(UnknownModel) as blocking:
                client.infer("bad/0", torch.zeros(1))
            _check_remote_error(blocking)
            with pytest.raises(UnknownModel) as submitted:
                client.submit("infer", "bad/0", torch.zeros(1)).result(timeout=TIMEOUT_S)
            _check_remote_error(submitted)
            for call in (lambda: client.infer("bad/0", BIG), lambda: client.submit("infer", "bad/0", BIG)):
                with pytest.raises(BadInput, match=f"exceed the message bound of {2 << 20} bytes"):
                    call()
    finally:
        stop.set()
        server.join(10)
    assert [type(m).__name__ for m in _calls(seen)] == ["SubmitJob", "SubmitJob", "Hello"]  # one Hello, no big job


def test_async_client_raises_remote_errors_checks_the_bound_and_builds_requests_when_awaited(address: str) -> None:
    stop, seen = threading.Event(), []
    server = _recording_router(address, stop, seen, _error_or_bound(2 << 20))

    async def scenario() -> None:
        async with AsyncClient(address, timeout=TIMEOUT_S) as client:
            with pytest.raises(UnknownModel) as raised:
                await client.infer("bad/0", torch.zeros(1))
            _check_remote_error(raised)
            pending = client.submit("fly", "bad/0", torch.zeros(1))  # nothing is checked before it is awaited
            with pytest.raises(BadInput, match="unknown op 'fly'"):
                await pending
            for _ in range(2):
                with pytest.raises(BadInput, match=f"exceed the message bound of {2 << 20} bytes"):
                    await client.submit("infer", "bad/0", BIG)

    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        server.join(10)
    assert [type(m).__name__ for m in _calls(seen)] == ["SubmitJob", "Hello"]
