"""Snapshot files written in the background, so a large snapshot never stalls the coordinator.

A snapshot is a host copy of every model taken in the workers' queues (a consistent
cut, see ``scheduler.host_copies``). A ``SnapshotWriter`` first copies what it needs out
of the host copies, on its thread (the coordinator sends no worker a new host copy to
make until then), and then writes the files while the coordinator goes on serving, and reports its progress (``stats()["snapshots"]``,
``cohort snapshot`` shows it as a progress bar). Each file is written under a
temporary name and renamed, so a crash never leaves a torn file under the final name.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch


class SnapshotWriter:
    """Writes ``(path, tensors)`` pairs to safetensors files on a thread."""

    def __init__(self, directory: Path, files: list[tuple[Path, dict[str, torch.Tensor]]]) -> None:
        self.directory = directory
        self.files = files
        self.total = len(files)
        self.total_bytes = sum(t.numel() * t.element_size() for _, tensors in files for t in tensors.values())
        self.done = 0
        self.done_bytes = 0
        self.error: str | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.token = uuid.uuid4().hex[:12]
        self.taken = threading.Event()  # set once the tensors are copied out of the host copies
        self._thread = threading.Thread(target=self._write_all, name="cohort-snapshot", daemon=True)

    def start(self) -> SnapshotWriter:
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive() and self.finished_at is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the files; whether they are all written (or it failed) by then."""
        self._thread.join(timeout)
        return self.finished

    def progress(self) -> dict[str, Any]:
        return {
            "path": str(self.directory),
            "files_done": self.done,
            "files": self.total,
            "bytes_done": self.done_bytes,
            "bytes": self.total_bytes,
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }

    def _write_all(self) -> None:
        from safetensors.torch import save_file

        try:
            try:
                self.files = [(path, {n: t.clone() for n, t in tensors.items()}) for path, tensors in self.files]
            finally:
                self.taken.set()
            for path, tensors in self.files:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{self.token}.tmp")  # this writer's own: never shared
                try:
                    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
                    tmp.replace(path)
                finally:
                    tmp.unlink(missing_ok=True)
                self.done += 1
                self.done_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        except Exception as exc:  # reported to whoever asked for the snapshot
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_at = time.monotonic()
