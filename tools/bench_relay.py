"""The floor of cohort's design in Python: a client, a relay and an echo worker, three Python
processes that do nothing but forward a small message, over ZeroMQ (DEALER -> ROUTER | PAIR ->
PAIR and back, as cohort's three did before its Unix sockets) or over Unix ``SOCK_SEQPACKET``
sockets with cohort's own ``core.unix_link`` (as a local client, the coordinator and a worker
talk now). What cohort adds over these is its own work; what they add over ``bench_control``'s
echo (a C proxy) is Python's cost per hop."""

from __future__ import annotations

import multiprocessing
import os
import select
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zmq

from core.unix_link import UnixLink
from tools.bench_control import round_trips

STOP = b"stop"


def _relay(front: str, back: str) -> None:
    context = zmq.Context()
    clients, worker = context.socket(zmq.ROUTER), context.socket(zmq.PAIR)
    clients.bind(front)
    worker.bind(back)
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(worker, zmq.POLLIN)
    while True:
        events = dict(poller.poll(1000))
        if clients in events:
            frames = clients.recv_multipart()
            if frames[-1] == STOP:
                worker.send(STOP)
                break
            worker.send_multipart(frames)
        if worker in events:
            clients.send_multipart(worker.recv_multipart())
    context.destroy(linger=0)


def _echo(back: str) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    socket.connect(back)
    while (frames := socket.recv_multipart())[-1] != STOP:
        socket.send_multipart(frames)
    context.destroy(linger=0)


@contextmanager
def relay_and_echo() -> Iterator[str]:
    """The relay and the echo worker running; the relay's client address."""
    directory = tempfile.mkdtemp(prefix="cohort-relay-")
    front, back = f"ipc://{directory}/front", f"ipc://{directory}/back"
    spawn = multiprocessing.get_context("spawn")  # not fork: the caller may hold threads and torch
    processes = [spawn.Process(target=_relay, args=(front, back), daemon=True),
                 spawn.Process(target=_echo, args=(back,), daemon=True)]
    for process in processes:
        process.start()
    try:
        yield front
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def _unix_relay(front: socket.socket, back: socket.socket) -> None:
    clients, worker = UnixLink(front, blocking=True), UnixLink(back, blocking=True)
    poller = select.poll()
    for link in (clients, worker):
        poller.register(link.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll(1000):
            if fd == clients.fileno():
                frames = clients.recv()
                if frames is not None:
                    worker.send(frames)
                    if bytes(frames[-1]) == STOP:
                        return
            else:
                frames = worker.recv()
                if frames is not None:
                    clients.send(frames)


def _unix_echo(end: socket.socket) -> None:
    link = UnixLink(end, blocking=True)
    while link.wait(None):
        frames = link.recv()
        if frames is not None:
            if bytes(frames[-1]) == STOP:
                return
            link.send(frames)


def unix_relay_round_trips(count: int, warmup: int, budget_s: float, payload: bytes = bytes(100)) -> list[float]:
    """As ``relay_round_trips``, over Unix socket pairs with ``core.unix_link`` (cohort's local links)."""
    client, relay_front = UnixLink.pair(blocking=True)
    relay_back, echo_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spawn = multiprocessing.get_context("spawn")  # it hands the sockets over itself (SCM_RIGHTS)
    processes = [spawn.Process(target=_unix_relay, args=(relay_front, relay_back), daemon=True),
                 spawn.Process(target=_unix_echo, args=(echo_end,), daemon=True)]
    for process in processes:
        process.start()
    for sock in (relay_front, relay_back, echo_end):
        sock.close()

    def call() -> list[Any]:
        client.send([payload])
        if not client.wait(10_000):
            raise TimeoutError("the relay did not answer within 10 s")
        frames = client.recv()
        if frames is None:
            raise TimeoutError("the relay's answer did not come whole")
        return frames

    try:
        return round_trips(call, count, warmup, budget_s)
    finally:
        client.send([STOP])
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        client.close()


def relay_round_trips(count: int, warmup: int, budget_s: float, payload: bytes = bytes(100)) -> list[float]:
    """Round trips (seconds) of ``payload`` through the relay and the echo worker and back."""
    with relay_and_echo() as address:
        context: Any = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.connect(address)
        deadline = time.monotonic() + 60
        while not socket.poll(0, zmq.POLLOUT) and time.monotonic() < deadline:
            time.sleep(0.01)

        def call() -> bytes:
            socket.send(payload)
            if not socket.poll(10_000):
                raise TimeoutError("the relay did not answer within 10 s")
            return socket.recv()

        try:
            return round_trips(call, count, warmup, budget_s)
        finally:
            socket.send(STOP)
            context.destroy(linger=1000)
