"""A worker process: owns the banks of the models placed on it and runs their jobs.

Start-up: connect to the coordinator's socket for this worker, say hello, receive the
compiled group definitions, allocate and initialise the banks, export them, and say
ready (or say why start-up failed). Then the loop: receive commands, run jobs, send
results, heartbeat; it exits when told to, when its socket says the coordinator has
gone, or when its parent process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

import torch
import zmq

from core.bank import Bank
from core.codec import unbundle, worker_codec
from core.device import resolve_device
from core.errors import CohortError
from core.messages import (
    Heartbeat,
    InitWorker,
    JobError,
    JobResult,
    JobResults,
    RunJob,
    RunJobs,
    Shutdown,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
)
from core.tensors import encode_tensors
from workers.execute import GroupRuntime
from workers.executors import make_executor
from workers.outcome import Finished

HEARTBEAT_S = 0.25
INIT_TIMEOUT_S = 60.0
LOG_LEVEL_ENV = "COHORT_LOG_LEVEL"
COMPILE_QUIET_S = 600.0  # torch.compile of one call shape: seconds on a GPU, up to minutes on a CPU


class Worker:
    def __init__(self, address: str, worker_id: int) -> None:
        self.worker_id = worker_id
        self.parent = os.getppid()
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(address)
        self.codec = worker_codec()
        self.banks: list[Bank] = []
        self.runtimes: dict[str, GroupRuntime] = {}
        self.executor: Any = None
        self.running = True
        self.fatal = False
        self._last_beat = 0.0

    # ------------------------------------------------------------------ start-up

    def start(self) -> bool:
        self._send(WorkerHello(self.worker_id, os.getpid()))
        if not self.socket.poll(int(INIT_TIMEOUT_S * 1000)):
            return False
        message, _ = self.codec.decode(self.socket.recv_multipart())
        if not isinstance(message, InitWorker):
            return False
        try:
            self._init(message)
        except Exception as exc:
            error = type(exc).__name__ if isinstance(exc, CohortError) else "JobFailed"
            text = str(exc) if isinstance(exc, CohortError) else f"{type(exc).__name__}: {exc}"
            self._send(WorkerFailed(self.worker_id, error, text, traceback.format_exc()))
            self.close()
            return False
        return True

    def _init(self, init: InitWorker) -> None:
        device = resolve_device(init.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        for spec in init.groups:
            bank = Bank.create(spec.name, spec.entries, len(spec.indices), device, f"{init.shm_prefix}{spec.name}")
            self.banks.append(bank)
            runtime = GroupRuntime(spec, bank, device)
            runtime.fused.on_compile = self._compiling
            if not init.restore:
                runtime.initialise()
            self.runtimes[spec.name] = runtime
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.executor = make_executor(self.runtimes, device, init.streams)
        self.max_wait_s = max((g.batching.max_wait_ms for g in init.groups), default=0.0) / 1000
        self.max_jobs = max((g.batching.max_jobs for g in init.groups), default=1)
        self._send(WorkerReady(self.worker_id, str(device), [b.handle for b in self.banks]))

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        assert self.executor is not None
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while self.running:
            wait = self.executor.wait_ms()
            timeout = int(HEARTBEAT_S * 1000) if wait is None else wait
            if poller.poll(timeout):
                self._receive()
            self._reply(self.executor.poll())
            self._heartbeat()
            if self.fatal or os.getppid() != self.parent:
                break

    def _receive(self) -> None:
        """Take every command waiting, then hand the jobs to the executor together, so it can join them."""
        assert self.executor is not None
        jobs: list[tuple[RunJob, list[Any]]] = []
        self._drain(jobs)
        waiting_pays = jobs and self.max_wait_s > 0 and len(jobs) < self.max_jobs and self.running
        if waiting_pays and self.socket.poll(int(self.max_wait_s * 1000)):  # the group's policy: wait for company
            self._drain(jobs)
        if jobs:
            self.executor.submit_many(jobs)

    def _drain(self, jobs: list[tuple[RunJob, list[Any]]]) -> None:
        while self.running:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            message, buffers = self.codec.decode([f.buffer for f in frames])
            if isinstance(message, RunJob):
                jobs.append((message, buffers))
            elif isinstance(message, RunJobs):
                jobs.extend(unbundle(message.jobs, buffers))
            elif isinstance(message, Shutdown):
                self.running = False

    def _reply(self, finished: list[Finished]) -> None:
        """Every finished job in one message: one system call and one wake-up for the coordinator."""
        results: list[JobResult | JobError] = []
        buffers: list[Any] = []
        for item in finished:
            if item.error is not None:
                results.append(JobError(self.worker_id, item.job_id, type(item.error).__name__, item.error.message,
                                        item.traceback))
                self.fatal = self.fatal or item.fatal
                continue
            try:
                tree, own = encode_tensors(item.outputs)
            except CohortError as exc:
                results.append(JobError(self.worker_id, item.job_id, type(exc).__name__, f"model output: {exc}"))
                continue
            results.append(JobResult(self.worker_id, item.job_id, tree, item.losses))
            buffers += own
        if len(results) == 1:
            self._send(results[0], buffers)
        elif results:
            self._send(JobResults(self.worker_id, results), buffers)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            ex = self.executor
            self._send(Heartbeat(self.worker_id, getattr(ex, "calls", 0), getattr(ex, "joined_jobs", 0)))

    def _compiling(self) -> None:
        """Tell the coordinator the next call may keep this worker silent (it compiles)."""
        ex = self.executor
        self._send(Heartbeat(self.worker_id, getattr(ex, "calls", 0), getattr(ex, "joined_jobs", 0),
                             quiet_s=COMPILE_QUIET_S))

    def _send(self, message: Any, buffers: list[Any] | None = None) -> None:
        self.socket.send_multipart(self.codec.encode(message, buffers), copy=False)

    def close(self) -> None:
        for bank in self.banks:
            bank.close()
        self.banks = []
        self.socket.close(linger=500)
        self.context.term()


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the coordinator dies, so no worker is ever orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the loop's parent check still ends the worker


def main(address: str, worker_id: int) -> int:
    die_with_parent()
    # The coordinator's log level and format, so a worker's lines read like its own.
    logging.basicConfig(level=os.environ.get(LOG_LEVEL_ENV, "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s cohort worker {worker_id} %(levelname)s %(message)s")
    # Ctrl-C goes to the coordinator, which stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = Worker(address, worker_id)
    stop = lambda *_: setattr(worker, "running", False)
    signal.signal(signal.SIGTERM, stop)
    if not worker.start():
        return 1
    try:
        worker.run()
    finally:
        worker.close()
    return 3 if worker.fatal else 0
