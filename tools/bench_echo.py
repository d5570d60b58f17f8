"""The raw floor for the control plane: a two-hop ZeroMQ echo, and a no-op for a process pool.

``client (DEALER) -> broker (ROUTER | DEALER, zmq.proxy) -> echo worker (DEALER)`` is
the shape of cohort's path (client -> coordinator -> worker) with nothing on it but
ZeroMQ itself. The broker and the echo worker run as separate processes:

    python tools/bench_echo.py broker FRONTEND_ADDRESS BACKEND_ADDRESS
    python tools/bench_echo.py echo BACKEND_ADDRESS

Only ZeroMQ is imported here, so the children start in milliseconds, not seconds.
"""

from __future__ import annotations

import sys

import zmq


def noop(payload: bytes) -> bytes:
    """The job a ``ProcessPoolExecutor`` runs: hand the payload back."""
    return payload


def serve_broker(frontend: str, backend: str) -> None:
    """Forward client requests to the echo worker and replies back, until killed."""
    context = zmq.Context()
    front = context.socket(zmq.ROUTER)
    back = context.socket(zmq.DEALER)
    for socket in (front, back):
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
    front.bind(frontend)
    back.bind(backend)
    try:
        zmq.proxy(front, back)
    except (zmq.ContextTerminated, KeyboardInterrupt):
        pass


def serve_echo(backend: str) -> None:
    """Send every message (routing envelope included) straight back, until killed."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(backend)
    try:
        while True:
            socket.send_multipart(socket.recv_multipart(copy=False), copy=False)
    except (zmq.ContextTerminated, KeyboardInterrupt):
        pass


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "broker":
        serve_broker(argv[1], argv[2])
        return 0
    if len(argv) == 2 and argv[0] == "echo":
        serve_echo(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
