"""The worker's lifeline: a thread that beats whatever the worker runs, and ends an orphan.

Every ``HEARTBEAT_S`` it stamps ``time.monotonic()`` (one clock for every process of the
machine) into the file the coordinator gave it, so a job longer than the coordinator's
``heartbeat_timeout_s`` is never taken for a death. It also watches the coordinator: when
it is gone (killed with SIGKILL, so it could not stop its workers), the thread removes
this worker's shared memory and ends the process at once, even in the middle of a job.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.bank import shm_dir

HEARTBEAT_S = 0.25
WATCH_S = 0.1
BEAT = struct.Struct("<d")
ORPHAN_EXIT = 4

log = logging.getLogger("cohort.worker")


class Lifeline:
    def __init__(self, beat_path: str, parent: int, cleanup: Callable[[], None]) -> None:
        self.beat_path = beat_path
        self.parent = parent
        self.cleanup = cleanup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cohort-lifeline", daemon=True)

    def start(self) -> Lifeline:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def _beat(self) -> None:
        try:
            with open(self.beat_path, "r+b") as beat:
                beat.write(BEAT.pack(time.monotonic()))
        except OSError:
            pass  # the coordinator removed it: it is stopping this worker

    def _run(self) -> None:
        last = 0.0
        while not self._stop.wait(WATCH_S):
            if os.getppid() != self.parent:
                self._orphaned()
            if time.monotonic() - last >= HEARTBEAT_S:
                last = time.monotonic()
                self._beat()

    def _orphaned(self) -> None:
        log.error("the coordinator (pid %d) is gone; this worker ends now", self.parent)
        try:
            self.cleanup()
            remove_torch_shm(os.getpid())
        finally:
            os._exit(ORPHAN_EXIT)


def remove_torch_shm(pid: int) -> None:
    """PyTorch's CUDA IPC reference-count files of process ``pid`` (left when it does not exit normally)."""
    for path in Path(shm_dir()).glob(f"torch_{pid}_*"):
        path.unlink(missing_ok=True)
