"""The cluster's placement table, held by a named, detached Ray actor.

``cohort-directory`` (namespace ``cohort``) is found by name from any driver on the Ray
cluster (``ClusterClient``, the monitor, Ray Tune trials). It holds:

- ``owner``: the ``cohort cluster`` process that runs the cluster, and its heartbeat. A
  detached actor outlives a driver killed with SIGKILL; a table whose owner has been
  silent for ``STALE_AFTER_S`` is a dead cluster's, and the next ``cohort cluster`` takes
  it over (a live one is refused).
- ``layout``: every group's blocks, ``(coordinator, start, count)`` (``layout.Layout``).
- ``coordinators``: index -> address, state (starting, up, failed, stopped), incarnation
  (1, then one more at each restart), node, GPU UUID, pid, log path, what it restored from.
- ``snapshots``: the paths of the cluster's snapshots, newest last (restore points).
- ``version``: one more at every change, so a reader can tell that something moved.

``DirectoryState`` is plain Python (the unit tests use it as it is); ``directory_actor``
makes it a Ray actor class.
"""

from __future__ import annotations

import sys
import time
from typing import Any

STALE_AFTER_S = 15.0  # an owner silent this long is gone
KEEP_SNAPSHOTS = 8


class DirectoryState:
    def __init__(self) -> None:
        self.owner: dict[str, Any] | None = None
        self.layout: dict[str, Any] | None = None
        self.coordinators: dict[int, dict[str, Any]] = {}
        self.snapshots: list[str] = []
        self.started = time.time()
        self.version = 0
        self._beat = 0.0

    def _changed(self) -> int:
        self.version += 1
        return self.version

    # ------------------------------------------------------------------ the owner

    def claim(self, owner: dict[str, Any], stale_after_s: float = STALE_AFTER_S) -> dict[str, Any] | None:
        """Take the table for a new cluster; the live owner instead, if there is one (refused)."""
        if self.owner is not None and self.owner_alive(stale_after_s):
            return dict(self.owner)
        version = self.version
        self.__init__()  # type: ignore[misc]  # a dead cluster's table goes with it
        self.version = version  # never backwards: a reader compares versions
        self.owner = dict(owner)
        self._beat = time.monotonic()
        self._changed()
        return None

    def owner_alive(self, stale_after_s: float = STALE_AFTER_S) -> bool:
        return self.owner is not None and time.monotonic() - self._beat < stale_after_s

    def heartbeat(self, owner_id: str) -> bool:
        """The owner is alive; False if the table is no longer its own."""
        if self.owner is None or self.owner.get("id") != owner_id:
            return False
        self._beat = time.monotonic()
        return True

    def set_layout(self, layout: dict[str, Any]) -> int:
        self.layout = layout
        return self._changed()

    # ------------------------------------------------------------------ coordinators

    def begin(self, index: int) -> tuple[dict[str, Any] | None, int]:
        """A supervisor (re)starts coordinator ``index``: its last entry, and the new incarnation."""
        previous = self.coordinators.get(index)
        return (dict(previous) if previous else None), (int(previous.get("incarnation", 1)) + 1 if previous else 1)

    def register(self, index: int, entry: dict[str, Any]) -> int:
        """Record coordinator ``index`` as its supervisor sees it now (merged into what was known)."""
        self.coordinators[index] = {**self.coordinators.get(index, {}), **entry, "index": index,
                                    "updated": time.time()}
        return self._changed()

    def coordinator(self, index: int) -> dict[str, Any] | None:
        entry = self.coordinators.get(index)
        return dict(entry) if entry else None

    # ------------------------------------------------------------------ snapshots

    def record_snapshot(self, path: str) -> int:
        if path in self.snapshots:
            self.snapshots.remove(path)
        self.snapshots = [*self.snapshots, path][-KEEP_SNAPSHOTS:]
        return self._changed()

    # ------------------------------------------------------------------ readers

    def table(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "owner": self.owner,
            "owner_alive": self.owner_alive(),
            "started": self.started,
            "layout": self.layout,
            "coordinators": {i: dict(c) for i, c in self.coordinators.items()},
            "snapshots": list(self.snapshots),
        }

    def get_version(self) -> int:
        return self.version


def directory_actor() -> Any:
    """``DirectoryState`` as a Ray actor class (no CPU: it only answers small calls).

    The class travels to its worker by value: imported there by name, it would import
    the ``scheduler`` package, and with it PyTorch (1.5 s and 250 MB for a small table)."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray.remote(num_cpus=0, max_restarts=0)(DirectoryState)


def find_directory() -> Any:
    """The running cluster's directory actor; ``ConfigError`` if there is none."""
    import ray

    from core.errors import ConfigError
    from scheduler.cluster import DIRECTORY_NAME, NAMESPACE

    try:
        return ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    except ValueError:
        raise ConfigError(f"no cohort cluster on this Ray cluster (no actor {DIRECTORY_NAME!r} in namespace "
                          f"{NAMESPACE!r}); start one with `cohort cluster --config FILE`") from None
