"""Running a coordinator as a program: start it, say what runs where, serve until a signal, stop cleanly."""

from __future__ import annotations

import logging
import signal

from core.heap import freeze_start_up_heap
from scheduler import __version__
from scheduler.config import Config
from scheduler.coordinator import Coordinator

log = logging.getLogger("cohort")


def run(config: Config) -> int:
    """Start a coordinator, serve until SIGINT or SIGTERM, then shut down cleanly."""
    coordinator = Coordinator(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, coordinator.request_stop)
    try:
        coordinator.start()
        describe(coordinator)
        freeze_start_up_heap()
        coordinator.serve()
    finally:
        log.info("shutting down")
        coordinator.shutdown()
    log.info("stopped")
    return 0


def describe(c: Coordinator) -> None:
    """What a user needs to see at start-up: where it listens, what runs where, on which device."""
    mps = c.mps.state()
    log.info("cohort %s listening on %s (device %s, MPS %s: %s)", __version__, c.cc.address, c.device, mps["mode"], mps["reason"])
    for w in c.workers:
        groups = ", ".join(f"{b.group}/{b.start}..{b.start + b.count - 1}" for b in w.blocks) or "(no models)"
        log.info("worker %d pid %d on %s: %s", w.id, w.pid, w.device, groups)
