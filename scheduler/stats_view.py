"""What the coordinator says of itself in ``stats()``: its run, device, workers, jobs and models."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from scheduler import __version__

if TYPE_CHECKING:
    from scheduler.coordinator import Coordinator


def stats_of(coord: Coordinator) -> dict[str, Any]:
    uptime = time.monotonic() - coord.started
    models = {
        f"{g}/{i}": {"jobs": coord.stats.per_model.get((g, i), 0), "version": v, "worker": coord.slot_of[(g, i)][0],
                     "queued": coord.queued_per_model.get((g, i), 0), "host_copy_version": coord.host.version.get((g, i))}
        for (g, i), v in sorted(coord.versions.items())
    }
    return {
        "cohort_version": __version__,
        "pid": os.getpid(),
        "run_id": coord.run_id,
        "restored_from": coord.cc.restore_run or None,
        "uptime_s": round(uptime, 3),
        "address": coord.cc.address, "device": coord.device,
        "gpu": None if coord.plan.gpu is None else {"uuid": coord.plan.gpu.uuid, "name": coord.plan.gpu.name,
                                                   "compute_mode": coord.plan.gpu.compute_mode},
        "mps": {**coord.mps.state(), "recycles": list(coord.supervisor.recycles)},
        "workers": [w.stats(coord.device) for w in coord.workers],
        "queued": sum(len(w.pending) for w in coord.workers),
        "snapshots": [writer.progress() for writer, _ in coord.weight_ops.writers],
        "in_flight": sum(len(w.in_flight) for w in coord.workers),
        **coord.stats.summary(uptime),
        "models": models,
    }
