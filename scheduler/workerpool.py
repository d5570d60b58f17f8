"""Worker processes as the coordinator sees them: start, talk, notice death, stop.

Each worker has its own link, a Unix socket pair whose other end the worker inherits (a new
one for every replacement, so a late message from a dead worker never reaches its
successor; ``core.unix_link`` says why not ZeroMQ). Death is noticed from the process itself (``poll()``, checked every loop
turn) and from silence: a thread in the worker stamps the time into a small file every
quarter second, whatever the worker is running, so a long job is never taken for a
death, and the coordinator's own pauses never count as a worker's silence.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.bank import leftover_shm, unlink_shm
from core.spec import GroupSpec
from core.unix_link import LinkClosed, UnixLink
from scheduler.jobs import Part
from scheduler.placement import Block

STOP_GRACE_S = 5.0
BEAT = struct.Struct("<d")  # time.monotonic() of the worker's last heartbeat


ALLOC_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 reads the first, older the second


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """Both allocator variables with ``expandable_segments:False`` last, the user's other options kept.

    Banks are exported with CUDA IPC, whose expandable-segments path needs pidfd
    permissions and has open bugs; a later option wins over an earlier one.
    """
    out = {}
    for name in ALLOC_VARIABLES:
        options = [o for o in env.get(name, "").split(",") if o.strip() and not o.strip().startswith("expandable_segments")]
        out[name] = ",".join([*options, "expandable_segments:False"])
    return out


@dataclass
class WorkerHandle:
    id: int
    blocks: list[Block]
    specs: list[GroupSpec]
    state: str = "new"  # new -> starting -> ready -> dead (-> starting ...) ; stopping
    generation: int = 0
    beat_path: str = ""
    link: UnixLink | None = None
    # Where the worker says which jobs it answered directly (``JobAnswered`` alone): read at every turn of
    # the loop while such jobs are out, but polled only while something waits for a job to finish, so
    # the worker's word does not wake a coordinator that has nothing to do with it.
    notices: UnixLink | None = None
    answering: int = 0  # jobs out that this worker answers directly, not yet said done
    process: subprocess.Popen[bytes] | None = None
    pid: int = 0
    device: str = ""
    pending: deque[Part] = field(default_factory=deque)
    in_flight: dict[int, Part] = field(default_factory=dict)
    started_at: float = 0.0
    jobs_done: int = 0
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # monotonic times of recent deaths
    respawn_at: float = 0.0  # when a dead worker's replacement may start (monotonic)
    counters: dict[str, int] = field(default_factory=dict)  # the worker's counts as of its last heartbeat
    compiled_shapes: list[str] = field(default_factory=list)  # its compiled call shapes, and how each came
    plans: list[Any] = field(default_factory=list)  # how it runs each kind of call (PlanReport, as plain data)
    restore: bool = False
    shm_prefix: str = ""

    @property
    def placed(self) -> dict[str, list[int]]:
        return {b.group: b.indices for b in self.blocks}

    def model_ids(self) -> list[str]:
        return [f"{b.group}/{i}" for b in self.blocks for i in b.indices]

    def stats(self, default_device: str) -> dict[str, Any]:
        """This worker's part of the coordinator's ``stats()``."""
        counted = self.counters.get
        return {"id": self.id, "pid": self.pid, "state": self.state, "device": self.device or default_device,
                "models": self.model_ids(), "queued": len(self.pending), "in_flight": len(self.in_flight),
                "jobs_done": self.jobs_done, "restarts": self.restarts, "calls": counted("calls", 0),
                "joined_jobs": counted("joined_jobs", 0), "compiled_calls": counted("compiled_calls", 0),
                "eager_calls": counted("eager_calls", 0),
                "compile": {"loaded": counted("compile_loaded", 0), "compiled": counted("compile_compiled", 0),
                            "seconds": round(counted("compile_ms", 0) / 1000, 3), "shapes": self.compiled_shapes,
                            "recompiles": counted("recompiles", 0)},
                "plans": self.plans}

    def spawn(self, run_dir: str, run_id: str, env: dict[str, str]) -> None:
        """Start (or restart) the process on a fresh link, with exactly the environment ``env``."""
        self.generation += 1
        self.beat_path = f"{run_dir}/worker-{self.id}-{self.generation}.beat"
        with open(self.beat_path, "wb") as beat:
            beat.write(BEAT.pack(0.0))
        self.shm_prefix = f"cohort-{run_id}-w{self.id}g{self.generation}-"
        self.link, theirs = UnixLink.pair(blocking=False)
        self.notices, theirs_notices = UnixLink.pair(blocking=False)
        self.answering = 0
        worker_env = dict(env)  # complete: the supervisor decides what the worker sees
        worker_env.update(allocator_env(worker_env))
        path = [os.getcwd(), *filter(None, worker_env.get("PYTHONPATH", "").split(os.pathsep))]
        worker_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers", "--link-fd", str(theirs.fileno()), "--notices-fd",
                 str(theirs_notices.fileno()), "--worker-id", str(self.id), "--beat", self.beat_path],
                env=worker_env,
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), theirs_notices.fileno()),
                start_new_session=True,  # Ctrl-C reaches the coordinator only; it stops workers in order
            )
        except BaseException:
            self.close_link()
            raise
        finally:
            theirs.close()  # the worker's now: its end is seen to close when the worker dies
            theirs_notices.close()
        self.pid = self.process.pid
        self.state = "starting"
        self.started_at = time.monotonic()

    def silent_for(self, now: float) -> float:
        """Seconds since the worker's last heartbeat (or since it was started, before its first)."""
        try:
            with open(self.beat_path, "rb") as beat:
                (last,) = BEAT.unpack(beat.read(BEAT.size))
        except (OSError, struct.error):
            last = 0.0
        return now - max(last, self.started_at)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send(self, frames: list[Any]) -> bool:
        """Send without blocking (what the socket cannot take now goes later, in order); False when
        the worker has gone."""
        if self.link is None:
            return False
        try:
            self.link.send(frames)
            return True
        except LinkClosed:
            return False

    def receive(self, notices: bool = False) -> list[Any] | None:
        """The frames of the worker's next message (on ``notices``, its word on jobs it answered directly);
        None when none waits or the worker has gone (its exit is seen by the supervisor's health check)."""
        link = self.notices if notices else self.link
        try:
            return None if link is None else link.recv()
        except LinkClosed:
            return None

    def landed(self, job_id: int) -> Part | None:
        """The part of ``job_id`` this worker has finished, out of its jobs in flight (None if not there)."""
        part = self.in_flight.pop(job_id, None)
        if part is not None and part.answered_here:
            self.answering -= 1
        return part

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def remove_shm(self) -> None:
        """The shared memory of this worker's banks: a dead worker cannot remove its own."""
        if not self.shm_prefix:  # never started
            return
        for name in leftover_shm(self.shm_prefix):
            unlink_shm(name)

    def close_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.notices is not None:
            self.notices.close()
            self.notices = None
        if self.beat_path:
            try:
                os.unlink(self.beat_path)
            except OSError:
                pass


def writing(workers: list[WorkerHandle]) -> bool:
    """Whether a worker's socket holds back messages (``flush_links`` sends them as it takes them)."""
    return any(w.link is not None and w.link.wants_write and not w.link.closed for w in workers)


def flush_links(workers: list[WorkerHandle]) -> None:
    for w in workers:
        if w.link is not None and w.link.wants_write and not w.link.closed:
            try:
                w.link.flush()
            except LinkClosed:
                pass  # the worker has gone; its exit is seen by the supervisor's health check


def stop_processes(workers: list[WorkerHandle], grace_s: float = STOP_GRACE_S,
                   before_kill: Callable[[int], None] | None = None) -> None:
    """Wait for workers told to shut down; then SIGTERM, then SIGKILL the ones still there.

    ``before_kill(pid)`` runs before a SIGKILL (under MPS: detach the client from the
    server first, since a client killed mid-kernel can hang the server and every client).
    """
    deadline = time.monotonic() + grace_s
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        alive = [w for w in workers if w.process is not None and w.process.poll() is None]
        if not alive:
            return
        if sig is not None:
            for w in alive:
                if sig == signal.SIGKILL and before_kill is not None:
                    before_kill(w.process.pid)  # type: ignore[union-attr]
                try:
                    os.kill(w.process.pid, sig)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2.0
        for w in alive:
            assert w.process is not None
            try:
                w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
