#!/usr/bin/env python
"""What a lone call pays for waking each process up cold, measured on this machine.

    python tools/bench_warm.py [--calls N] [--out FILE.json]

A coordinator runs in this process (one worker, the tiny model of ``tools/bench_path.py``);
a client process makes ``N`` calls one at a time, twice:

1. with the coordinator's loop as it is (it sleeps in ``poll`` between messages), timing its
   request handler (``_on_submit``) inside the loop; then that handler again on the same
   request, back to back, with the caches warm (medians both): the ratio is what a cold
   wake-up costs the coordinator's Python;
2. with the loop never sleeping (``poll`` with no wait: it keeps its core and its caches), the
   client's p50 against the first run's.

On a machine with fewer cores than cohort's processes each wake-up finds its caches holding
another process's data; with a core per process they stay warm. Run it on your own host to see
which you have.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.heap import freeze_start_up_heap  # noqa: E402
from core.messages import SubmitJob  # noqa: E402
from scheduler.config import parse_config  # noqa: E402
from scheduler.coordinator import Coordinator  # noqa: E402
from tools.bench_path import TINY  # noqa: E402

CLIENT_LIMIT_S = 120.0  # its start-up (importing torch) and warm-up; each call may take up to 10 ms more
CLIENT = """
import json, sys, time, torch
from scheduler import Client
x = torch.randn(1, 16)
with Client(sys.argv[1], timeout=60) as c:
    for _ in range(300):
        c.infer("cp/0", x)
    took = []
    for _ in range(int(sys.argv[2])):
        began = time.perf_counter()
        c.infer("cp/0", x)
        took.append(time.perf_counter() - began)
print(json.dumps(sorted(took)[len(took) // 2] * 1e6))
"""


def serve_one_client(c: Coordinator, calls: int, spin: bool) -> float:
    """Serve a client process making ``calls`` lone calls; its p50 in microseconds."""
    client = subprocess.Popen([sys.executable, "-c", CLIENT, c.cc.address, str(calls)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLIENT_LIMIT_S + calls * 0.01
    try:
        while client.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the client process did not finish {calls} calls in time")
            c.step(0 if spin else 50)
        out, _ = client.communicate()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    if client.returncode != 0:
        raise RuntimeError(f"the client process failed (exit {client.returncode})")
    return float(out)


def handler_warm_us(c: Coordinator, handler: Any, request: tuple[bytes, SubmitJob, list[bytes]], times: int) -> float:
    """The request handler's median time run back to back on one request, its job dropped after each."""
    client, message, buffers = request
    took = []
    for _ in range(times):
        views = [memoryview(b) for b in buffers]
        began = time.perf_counter_ns()
        handler(client, message, views)
        took.append(time.perf_counter_ns() - began)
        c.jobs.clear()
        c.deadlines.clear()
        c.queued_per_model.clear()
        for w in c.workers:
            w.pending.clear()
    return sorted(took)[len(took) // 2] / 1000


def measure(calls: int) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="cohort-warm-")
    raw = {"coordinator": {"address": f"ipc://{directory}/c.sock", "workers": 1, "device": "cpu", "mps": "off"},
           "group": [TINY]}
    try:
        c = Coordinator(parse_config(raw, "bench_warm"))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        c.start()
        freeze_start_up_heap()
        handler = c.client_handlers[SubmitJob]
        in_loop: list[int] = []
        captured: list[tuple[bytes, SubmitJob, list[bytes]]] = []

        def timed(client: bytes, message: SubmitJob, buffers: list[Any]) -> None:
            if not captured:
                captured.append((client, message, [bytes(b) for b in buffers]))
            began = time.perf_counter_ns()
            handler(client, message, buffers)
            in_loop.append(time.perf_counter_ns() - began)

        c.client_handlers[SubmitJob] = timed
        sleeping = serve_one_client(c, calls, spin=False)
        c.client_handlers[SubmitJob] = handler
        warm = handler_warm_us(c, handler, captured[0], calls)
        spinning = serve_one_client(c, calls, spin=True)
    finally:
        c.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    loop_us = sorted(in_loop)[len(in_loop) // 2] / 1000
    return {"calls": calls, "on_submit_in_loop_p50_us": round(loop_us, 1), "on_submit_warm_us": round(warm, 1),
            "cold_over_warm": round(loop_us / warm, 2), "p50_us_loop_sleeping": round(sleeping),
            "p50_us_loop_spinning": round(spinning), "spinning_over_sleeping": round(spinning / sleeping, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_warm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="lone calls in each run")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    report = {"date": datetime.date.today().isoformat(), **measure(args.calls)}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
