"""The control plane: tiny jobs through cohort, against the raw floor, in the same run.

Three systems answer the same tiny request, one at a time (latency: p50/p99 of a
round trip) and kept ``window`` deep (throughput: jobs/s):

- ``cohort``: ``Client.infer`` on a one-layer model, client -> coordinator -> worker;
- ``zmq_echo``: the same two hops with nothing but ZeroMQ on them (``bench_echo``);
- ``process_pool``: ``concurrent.futures.ProcessPoolExecutor`` running a no-op.

The ratios the project aims at: cohort p50 / echo p50 <= 1.5, and cohort jobs/s /
pool jobs/s >= 1.5.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from tools.bench_measure import Result, describe, error, latency_ms
from tools.bench_workloads import ControlPlane

ECHO_SCRIPT = Path(__file__).resolve().with_name("bench_echo.py")
REPLY_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 20.0
GOALS = {"latency_ratio": 1.5, "throughput_ratio": 1.5}
CP_GROUP = "cp"


# ---------------------------------------------------------------------- measuring


def round_trips(call: Callable[[], object], count: int, warmup: int, budget_s: float) -> list[float]:
    """Durations of ``count`` calls made one after another (fewer if ``budget_s`` runs out)."""
    for _ in range(warmup):
        call()
    durations: list[float] = []
    began = time.perf_counter()
    while len(durations) < count and (len(durations) < 10 or time.perf_counter() - began < budget_s):
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
    return durations


def pipelined(submit: Callable[[], Future[Any]], count: int, window: int, budget_s: float) -> tuple[int, float]:
    """Keep ``window`` jobs in flight until ``count`` are done (or the budget ends); (jobs, seconds).

    A semaphore bounds the window: each completion frees a slot for the next submit,
    so the submitter never waits on one particular job.
    """
    slots = threading.Semaphore(window)
    failures: list[BaseException] = []

    def done(future: Future[Any]) -> None:
        if future.exception() is not None:
            failures.append(future.exception())  # type: ignore[arg-type]
        slots.release()

    submitted = 0
    start = time.perf_counter()
    while submitted < count and (submitted < window or time.perf_counter() - start < budget_s):
        if not slots.acquire(timeout=REPLY_TIMEOUT_S):
            raise TimeoutError(f"no job finished within {REPLY_TIMEOUT_S:.0f} s")
        if failures:
            raise failures[0]
        submit().add_done_callback(done)
        submitted += 1
    for _ in range(window):  # wait for the tail: every slot back
        if not slots.acquire(timeout=REPLY_TIMEOUT_S):
            raise TimeoutError(f"the last jobs did not finish within {REPLY_TIMEOUT_S:.0f} s")
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return submitted, elapsed


def summarize(latencies_s: list[float], jobs: int, seconds: float, **extra: Any) -> Result:
    """One system's control-plane figures."""
    return {
        "status": "ok",
        "p50_ms": latency_ms(latencies_s, 0.5),
        "p99_ms": latency_ms(latencies_s, 0.99),
        "round_trips": len(latencies_s),
        "jobs_s": jobs / seconds,
        "pipelined_jobs": jobs,
        **extra,
    }


def best_system(results: list[Result]) -> Result:
    """One system's repeats merged: the lowest-latency repeat's p50/p99 and the highest jobs/s."""
    measured = [r for r in results if r.get("status") == "ok"]
    if not measured:
        return dict(results[-1])
    best = dict(min(measured, key=lambda r: r["p50_ms"]))
    fastest = max(measured, key=lambda r: r["jobs_s"])
    best.update(jobs_s=fastest["jobs_s"], pipelined_jobs=fastest["pipelined_jobs"])
    if len(results) > 1:
        best["repeats"] = [
            {"p50_ms": r["p50_ms"], "jobs_s": r["jobs_s"]} if r.get("status") == "ok" else r.get("status") for r in results
        ]
    return best


def merge_control_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ``run_control_plane`` results as one: each system's best figures, ratios of those."""
    systems = {name: best_system([run["systems"][name] for run in runs]) for name in runs[0]["systems"]}
    return {**runs[0], "systems": systems, "ratios": control_ratios(systems)}


def control_ratios(systems: dict[str, Result]) -> dict[str, Any]:
    """The two ratios the project holds itself to, with their goals and whether they are met."""
    cohort, echo, pool = (systems.get(k, {}) for k in ("cohort", "zmq_echo", "process_pool"))

    def ratio(a: Result, b: Result, key: str) -> float | None:
        if a.get("status") != "ok" or b.get("status") != "ok" or not b.get(key):
            return None
        return float(a[key]) / float(b[key])

    latency = ratio(cohort, echo, "p50_ms")
    throughput = ratio(cohort, pool, "jobs_s")
    return {
        "cohort_p50_over_echo_p50": latency,
        "cohort_p50_goal_max": GOALS["latency_ratio"],
        "latency_goal_met": None if latency is None else latency <= GOALS["latency_ratio"],
        "cohort_jobs_s_over_pool_jobs_s": throughput,
        "cohort_jobs_s_goal_min": GOALS["throughput_ratio"],
        "throughput_goal_met": None if throughput is None else throughput >= GOALS["throughput_ratio"],
        "cohort_jobs_s_over_echo_jobs_s": ratio(cohort, echo, "jobs_s"),
        "cohort_p50_over_pool_p50": ratio(cohort, pool, "p50_ms"),
    }


# ---------------------------------------------------------------------- zmq echo


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ECHO_SCRIPT), *args], stdin=subprocess.DEVNULL, start_new_session=True
    )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def echo_servers() -> Iterator[str]:
    """A broker and an echo worker on private ``ipc://`` paths; yields the client address."""
    with tempfile.TemporaryDirectory(prefix="cohort-bench-echo-") as root:
        front, back = f"ipc://{root}/front.sock", f"ipc://{root}/back.sock"
        processes = [_spawn("broker", front, back)]
        try:
            processes.append(_spawn("echo", back))
            yield front
        finally:
            _stop(processes)


class EchoClient:
    """A DEALER socket to the broker, with the two ways of driving it."""

    def __init__(self, address: str, payload: bytes) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.payload = payload

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Ping until the echo answers: the broker and worker are up and connected."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.socket.send(self.payload)
            if self.socket.poll(200):
                self.socket.recv()
                while self.socket.poll(50):  # replies to earlier pings that arrived late
                    self.socket.recv()
                return
        raise TimeoutError(f"no echo within {timeout_s:.0f} s")

    def _recv(self) -> None:
        if not self.socket.poll(int(REPLY_TIMEOUT_S * 1000)):
            raise TimeoutError(f"no echo within {REPLY_TIMEOUT_S:.0f} s")
        self.socket.recv(copy=False)

    def call(self) -> None:
        self.socket.send(self.payload, copy=False)
        self._recv()

    def pipelined(self, count: int, window: int, budget_s: float) -> tuple[int, float]:
        """Like ``pipelined`` above, for a socket: ``window`` sent ahead, one more per reply."""
        start = time.perf_counter()
        sent = received = 0
        while sent < min(window, count):
            self.socket.send(self.payload, copy=False)
            sent += 1
        while received < sent:
            self._recv()
            received += 1
            if sent < count and (sent < window or time.perf_counter() - start < budget_s):
                self.socket.send(self.payload, copy=False)
                sent += 1
        return received, time.perf_counter() - start

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def measure_echo(cp: ControlPlane) -> Result:
    payload = bytes(cp.payload_bytes)
    with echo_servers() as address:
        client = EchoClient(address, payload)
        try:
            client.wait_ready()
            latencies = round_trips(client.call, cp.round_trips, cp.warmup, cp.budget_s)
            jobs, seconds = client.pipelined(cp.pipelined, cp.window, cp.budget_s)
        finally:
            client.close()
    return summarize(latencies, jobs, seconds, notes="client DEALER -> zmq.proxy ROUTER/DEALER -> DEALER echo; ipc://")


# ---------------------------------------------------------------------- process pool


def measure_pool(cp: ControlPlane, workers: int) -> Result:
    import multiprocessing

    from tools.bench_echo import noop

    payload = bytes(cp.payload_bytes)
    # spawn, not fork: this process holds torch and client threads that fork would copy half-way.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(noop, payload) for _ in range(4 * workers)]:
            future.result(timeout=READY_TIMEOUT_S * 3)  # every worker started
        latencies = round_trips(
            lambda: pool.submit(noop, payload).result(timeout=REPLY_TIMEOUT_S), cp.round_trips, cp.warmup, cp.budget_s
        )
        jobs, seconds = pipelined(lambda: pool.submit(noop, payload), cp.pipelined, cp.window, cp.budget_s)
    return summarize(latencies, jobs, seconds, workers=workers, notes=f"{workers} spawned processes, no-op job")


# ---------------------------------------------------------------------- cohort


def cohort_group(cp: ControlPlane) -> dict[str, Any]:
    d_in = int(cp.kwargs["d_in"])
    return {
        "name": CP_GROUP,
        "factory": cp.factory,
        "kwargs": cp.kwargs,
        "count": cp.models,
        "input": {"shape": [-1, d_in], "dtype": "float32"},
        "loss": "mse",
        "optimizer": {"name": "sgd", "lr": 0.01},
        "init": {"seed": 0},
    }


def measure_cohort(cp: ControlPlane, device: str) -> Result:
    import itertools

    import torch

    from scheduler import Client
    from tools.bench_cohort import coordinator

    d_in = int(cp.kwargs["d_in"])
    x = torch.randn(max(1, cp.payload_bytes // (4 * d_in)), d_in)
    with coordinator([cohort_group(cp)], device) as running, Client(running.address, timeout=REPLY_TIMEOUT_S) as client:
        latencies = round_trips(lambda: client.infer(f"{CP_GROUP}/0", x), cp.round_trips, cp.warmup, cp.budget_s)
        models = itertools.cycle(f"{CP_GROUP}/{k}" for k in range(cp.models))
        submitted, submit_s = pipelined(lambda: client.submit("infer", next(models), x), cp.pipelined, cp.window,
                                        cp.budget_s)
        jobs, seconds = mapped(client, models, x, cp)
        return summarize(
            latencies, jobs, seconds, workers=running.workers, submit_jobs_s=submitted / submit_s,
            notes=f"Client.infer on a {cp.factory} {cp.kwargs}; pipelined: Client.map, {cp.window} deep, over "
                  f"{cp.models} models in turn (submit_jobs_s: as many submit calls kept in flight)",
        )


def mapped(client: Any, models: Iterator[str], x: Any, cp: ControlPlane) -> tuple[int, float]:
    """Jobs kept ``cp.window`` deep with ``Client.map``, a stream per model in turn, until ``cp.pipelined``
    are done or the budget ends; (jobs, seconds)."""
    done, began = 0, time.perf_counter()
    while done < cp.pipelined and time.perf_counter() - began < cp.budget_s:
        for _ in client.map("infer", next(models), [x] * min(cp.pipelined - done, 20 * cp.window), depth=cp.window):
            done += 1
    return done, time.perf_counter() - began


def run_control_plane(
    cp: ControlPlane, device: str, on_result: Callable[[str, Result], None] | None = None
) -> dict[str, Any]:
    """All three systems, each recorded on its own (a failure in one does not stop the others)."""
    from tools.bench_cohort import cohort_workers

    workers = cohort_workers(device)
    measures: dict[str, Callable[[], Result]] = {
        "cohort": lambda: measure_cohort(cp, device),
        "zmq_echo": lambda: measure_echo(cp),
        "process_pool": lambda: measure_pool(cp, workers),
    }
    systems: dict[str, Result] = {}
    for name, measure in measures.items():
        try:
            systems[name] = measure()
        except Exception as exc:  # noqa: BLE001 - recorded with its error; the run goes on
            systems[name] = error(describe(exc))
        if on_result is not None:
            on_result(name, systems[name])
    return {
        "payload_bytes": cp.payload_bytes,
        "window": cp.window,
        "systems": systems,
        "ratios": control_ratios(systems),
    }
