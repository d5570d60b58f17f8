"""The workers' lives as the coordinator runs them: start, restore, watch, replace, recycle.

Start-up waits for every worker with a deadline and notices one that dies or fails on
the way. A worker that exits, or whose heartbeat stops, is buried: its jobs that may
have run fail with ``WorkerDied``, those that surely did not go back to the front of its
queue, and a replacement starts on the same models, filled from their host copies.
A worker that keeps dying (more than ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``) is given
up. Under MPS a worker killed by a CUDA fault takes the whole GPU's clients with it (the
server refuses new ones until all have exited), so every worker is recycled then.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from core.codec import Codec
from core.errors import CohortError, WorkerDied
from core.messages import Heartbeat, InitWorker, WorkerFailed, WorkerHello, WorkerReady
from core.spec import GroupSpec, ModelKey
from scheduler.config import CoordinatorConfig
from scheduler.host_copies import HostCopies
from scheduler.jobs import Part
from scheduler.mps import MpsDaemon
from scheduler.workerpool import WorkerHandle, stop_processes

log = logging.getLogger("cohort")

MAX_RESTARTS = 5  # deaths of one worker within RESTART_WINDOW_S before cohort stops restarting it
RESTART_WINDOW_S = 60.0
# A worker that died again soon after a restart is restarted after a pause that doubles each
# time: an MPS server recovering from a fault refuses new clients for a while, and a restart
# at once would only use up the restarts.
RESPAWN_BACKOFF_S = 0.25
RESPAWN_BACKOFF_MAX_S = 4.0
STARTUP_PROGRESS_S = 5.0
FATAL_DEVICE_EXIT = 3  # a worker's exit code after a fault that leaves its device unusable (workers.worker)


class StartupError(CohortError):
    """The coordinator could not start (a worker failed, or did not answer in time)."""


class Supervisor:
    def __init__(self, config: CoordinatorConfig, workers: list[WorkerHandle], host: HostCopies,
                 versions: dict[ModelKey, int], mps: MpsDaemon, device: str, env: dict[str, str], codec: Codec,
                 finish_part: Callable[[Part, Any, CohortError | None], None]) -> None:
        self.config = config
        self.workers = workers
        self.host = host
        self.versions = versions
        self.mps = mps
        self.device = device
        self.env = env  # what every worker process gets on top of the coordinator's environment
        self.codec = codec
        self.finish_part = finish_part
        self.recycles: list[dict[str, Any]] = []
        # Reads what a worker sent before it went (set by the coordinator): a job it answered a client
        # directly, or finished, counts as done, not as lost or to run again.
        self.read_last: Callable[[WorkerHandle], None] = lambda w: None
        self.handlers: dict[type, Callable[[WorkerHandle, Any, list[Any]], None]] = {
            WorkerHello: self.on_hello,
            WorkerReady: self.on_ready,
            Heartbeat: self.on_heartbeat,
            WorkerFailed: self.on_failed,
        }
        self._specs: dict[int, list[GroupSpec]] = {}
        self._mirrors: dict[int, list[str]] = {}

    # ------------------------------------------------------------------ start

    def prepare(self, w: WorkerHandle, specs: list[GroupSpec]) -> None:
        """What worker ``w`` is given: its groups' specs and their host-copy segments (made here, once)."""
        self._specs[w.id] = specs
        self._mirrors[w.id] = [self.host.create(w.id, spec) for spec in specs]

    def spawn(self, w: WorkerHandle, run_dir: str, run_id: str) -> None:
        w.spawn(run_dir, run_id, self.env)

    def wait_until_ready(self, receive: Callable[[int], None], stopping: Callable[[], bool]) -> None:
        """Serve worker messages until every worker is ready; ``StartupError`` naming the reason if not."""
        began = shown = time.monotonic()
        deadline = began + self.config.start_timeout_s
        while not all(w.state == "ready" for w in self.workers):
            if time.monotonic() - shown > STARTUP_PROGRESS_S:  # big models or many of them: say it is working
                shown = time.monotonic()
                ready = sum(w.state == "ready" for w in self.workers)
                log.info("starting: %d/%d workers ready after %.0f s (timeout %.0f s)", ready, len(self.workers),
                         shown - began, self.config.start_timeout_s)
            if stopping():
                raise StartupError("interrupted during start-up")
            if time.monotonic() > deadline:
                slow = [w.id for w in self.workers if w.state != "ready"]
                raise StartupError(f"worker(s) {slow} not ready within {self.config.start_timeout_s} s")
            receive(50)
            for w in self.workers:
                code = w.exited()
                if code is not None and w.state != "ready":
                    raise StartupError(f"worker {w.id} exited with code {code} during start-up (its output is above)")

    # ------------------------------------------------------------------ messages

    def on_hello(self, w: WorkerHandle, msg: WorkerHello, _: list[Any]) -> None:
        w.pid = msg.pid
        init = InitWorker(w.id, self.device, self.config.streams, self._specs[w.id], w.shm_prefix, restore=w.restore,
                          mirrors=self._mirrors[w.id], compile_cache_dir=self.config.compile_cache_dir)
        w.send(self.codec.encode(init))

    def on_ready(self, w: WorkerHandle, msg: WorkerReady, _: list[Any]) -> None:
        w.device = msg.device
        models = [(b.group, i) for b in w.blocks for i in b.indices]
        if w.restore:
            for m in models:
                self.versions[m] = self.host.version.get(m, 0)
            if w.restarts:  # a first start restoring a dead run's host copies is said by the coordinator
                log.warning("worker %d restarted (pid %d); models restored: %s", w.id, w.pid,
                            ", ".join(f"{g}/{i}@v{self.versions[(g, i)]}" for g, i in models))
        else:  # the worker copied its freshly initialised banks to their host copies before saying ready
            self.host.mirrored(models, self.versions)
        w.state = "ready"

    def on_heartbeat(self, w: WorkerHandle, msg: Heartbeat, _: list[Any]) -> None:
        w.counters = dict(msg.counters)
        w.compiled_shapes = list(msg.compiled_shapes)
        # As named fields: stats() is read by people and by the monitor.
        w.plans = [{f: getattr(report, f) for f in report.__struct_fields__} for report in msg.plans]

    def on_failed(self, w: WorkerHandle, msg: WorkerFailed, _: list[Any]) -> None:
        if w.state == "starting" and w.restarts == 0:
            raise StartupError(f"worker {w.id} failed to start: {msg.error}: {msg.message}")
        log.error("worker %d failed to restart: %s: %s", w.id, msg.error, msg.message)
        self.bury(w, f"restart failed: {msg.message}")  # ``check`` starts the next one when its pause is over

    # ------------------------------------------------------------------ health

    def check(self, respawn: Callable[[WorkerHandle], None]) -> None:
        """Bury workers that died or fell silent, then start the replacements that are due."""
        now = time.monotonic()
        for w in self.workers:
            if w.state not in ("ready", "starting"):
                continue
            code = w.exited()
            if code is not None:
                if code == FATAL_DEVICE_EXIT and self.mps.mode == "on":
                    self.recycle(w)
                    break
                self.bury(w, f"process exited with code {code}")
            elif w.state == "ready" and w.silent_for(now) > self.config.heartbeat_timeout_s:
                self.bury(w, f"no heartbeat for {w.silent_for(now):.1f} s")
            elif w.state == "starting" and now - w.started_at > self.config.start_timeout_s:
                self.bury(w, f"not ready within {self.config.start_timeout_s} s")
        now = time.monotonic()
        for w in self.workers:
            if w.state == "dead" and w.respawn_at <= now:
                respawn(w)

    def bury(self, w: WorkerHandle, reason: str) -> None:
        """Stop it for good, fail what it may have run, keep what it surely did not."""
        log.error("worker %d (pid %d) died: %s", w.id, w.pid, reason)
        self.mps.terminate_client(w.pid)
        w.kill()
        self.read_last(w)
        w.close_link()
        w.remove_shm()
        in_flight = list(w.in_flight.values())
        w.in_flight.clear()
        started, unstarted = maybe_started(w, in_flight)
        for part in started:
            self.finish_part(part, None, WorkerDied(f"worker {w.id} died while running the job: {reason}"))
        for part in reversed(unstarted):  # back to the front of the queue, in their order
            part.sent = False
            w.pending.appendleft(part)
        w.state = "dead"
        w.restarts += 1
        now = time.monotonic()
        w.deaths = [t for t in w.deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(w.deaths) > MAX_RESTARTS:  # a crash loop: restarting again would only fail again
            log.error("worker %d died %d times in %.0f s; not restarting it", w.id, len(w.deaths), RESTART_WINDOW_S)
            w.state = "failed"
            for part in list(w.pending):
                self.finish_part(part, None, WorkerDied(f"worker {w.id} is down after {w.restarts} failures"))
            w.pending.clear()
            return
        w.restore = True
        pause = 0.0 if len(w.deaths) == 1 else min(RESPAWN_BACKOFF_MAX_S, RESPAWN_BACKOFF_S * 2 ** (len(w.deaths) - 2))
        w.respawn_at = now + pause
        if pause:
            log.warning("worker %d: restarting in %.2f s (%d deaths in %.0f s)", w.id, pause, len(w.deaths),
                        RESTART_WINDOW_S)

    def recycle(self, faulted: WorkerHandle) -> None:
        """A CUDA fault under MPS: every client of the GPU must exit before the server takes a new one."""
        reason = f"worker {faulted.id} hit a CUDA fault under MPS; every worker on the GPU is restarted"
        log.error("%s (restored from their host copies)", reason)
        self.recycles.append({"at": time.time(), "reason": reason})
        for w in self.workers:
            if w.state in ("ready", "starting"):
                self.bury(w, reason if w is not faulted else "CUDA fault under MPS")

    def stop_all(self) -> None:
        stop_processes(self.workers, before_kill=self.mps.terminate_client)
        for w in self.workers:
            w.close_link()
            w.remove_shm()


def maybe_started(w: WorkerHandle, in_flight: list[Part]) -> tuple[list[Part], list[Part]]:
    """Split a dead worker's parts into those that may have run and those that surely did not.

    A CPU worker runs its parts one at a time in the order sent, so only the oldest
    unanswered one can have started; the rest were still in its socket. A GPU worker
    puts every part it receives on a stream at once, so any of them may have run.
    """
    if (w.device or "cpu").startswith("cpu"):
        return in_flight[:1], in_flight[1:]
    return in_flight, []


# glibc returns every large block (over 32 MB by default, dynamically) to the kernel when it is
# freed, so a worker that builds a large batch or output per job pays a page fault per 4 KiB
# of it every time: keep freed memory in the heap for the next job instead.
MALLOC_REUSE = {"MALLOC_MMAP_THRESHOLD_": str(1 << 31), "MALLOC_TRIM_THRESHOLD_": str(1 << 33)}


def worker_malloc() -> dict[str, str]:
    """The allocator settings above, unless the user chose their own."""
    return {k: v for k, v in MALLOC_REUSE.items() if k not in os.environ}


def worker_threads(workers: int) -> dict[str, str]:
    """Workers share the cores (unless the user set it), leaving one to the coordinator and the
    clients: an intra-op thread pool that oversubscribes the cores waits on its slowest thread."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, ((os.cpu_count() or 1) - 1) // workers))}
