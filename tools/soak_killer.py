"""The soak's watchers: a monitor that samples the coordinator, and a killer that SIGKILLs
its workers and times their recovery.

The monitor polls ``stats()`` and the tree's RSS, marks jobs open past ``HANG_S`` as
hung and prints a progress line. The killer SIGKILLs a random ready worker every few
seconds (pids from ``stats()``, checked to be the coordinator's children) and measures
how long the coordinator takes to have it ``ready`` again with ``restarts``
incremented. It stays under the coordinator's crash-loop limit (``MAX_RESTARTS``
deaths in ``RESTART_WINDOW_S``) unless asked not to.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from scheduler import Client, CohortError

if TYPE_CHECKING:
    from tools.soak_report import Tally

try:  # the coordinator's crash-loop policy: more than MAX_RESTARTS deaths within RESTART_WINDOW_S
    from scheduler.supervisor import MAX_RESTARTS, RESTART_WINDOW_S
except ImportError:  # pragma: no cover - an older or newer coordinator
    MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0

RECOVERY_LIMIT_S = 60.0    # a killed worker not ready again after this long is "not recovered"
PROGRESS_EVERY_S = 5.0
RSS_EVERY_S = 0.2
STATS_EVERY_S = 1.0


@dataclass
class Observed:
    """What the monitor and the killer saw; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    run_id: str = ""
    coordinator_pid: int = 0
    pids: dict[int, float] = field(default_factory=dict)   # every worker pid seen -> its create time
    rss_baseline: int = 0
    rss_peak: int = 0
    rss_last: int = 0
    workers_rss_peak: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    kills: list[dict[str, Any]] = field(default_factory=list)
    coordinator_died: str = ""
    started_at: float = 0.0
    kills_deferred: int = 0
    timeline: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sample_baseline(self) -> None:
        """The coordinator's RSS before any load: what growth is measured from."""
        try:
            self.rss_baseline = self.rss_peak = psutil.Process(self.coordinator_pid).memory_info().rss
        except psutil.Error:
            pass

    def see(self, stats: dict[str, Any]) -> None:
        with self.lock:
            self.stats = stats
            for w in stats.get("workers", []):
                pid = w.get("pid")
                if pid and pid not in self.pids:
                    try:
                        self.pids[pid] = psutil.Process(pid).create_time()
                    except psutil.Error:
                        self.pids[pid] = 0.0


def monitor_thread(address: str, process: subprocess.Popen[bytes] | None, observed: Observed, tally: Tally,
                   stop: threading.Event, started_at: float, duration: float, quiet: bool) -> None:
    try:
        coordinator = psutil.Process(observed.coordinator_pid)
    except psutil.Error:
        coordinator = None
    last_stats = last_progress = 0.0
    with Client(address, timeout=10) as c:
        while not stop.wait(RSS_EVERY_S):
            now = time.monotonic()
            if process is not None and process.poll() is not None:
                observed.coordinator_died = f"the coordinator exited with code {process.returncode} during the run"
                stop.set()
                return
            if coordinator is not None:
                try:
                    rss = coordinator.memory_info().rss
                    workers = sum(p.memory_info().rss for p in coordinator.children(recursive=True))
                except psutil.Error:
                    rss = workers = 0
                with observed.lock:
                    observed.rss_last = rss
                    observed.rss_peak = max(observed.rss_peak, rss)
                    observed.workers_rss_peak = max(observed.workers_rss_peak, workers)
            tally.mark_hung()
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                try:
                    observed.see(c.stats())
                except CohortError as exc:
                    with observed.lock:
                        if len(observed.notes) < 20:
                            observed.notes.append(f"stats() failed at {now - started_at:.1f} s: {type(exc).__name__}: {exc}")
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                t = tally.totals()
                with observed.lock:
                    observed.timeline.append({"t_s": round(now - started_at, 1), "answered": t["answered"],
                                              "failed": t["failed"], "hung": t["hung"], "kills": len(observed.kills),
                                              "coordinator_rss_mib": round(observed.rss_last / 2**20, 1),
                                              "jobs_per_s": observed.stats.get("jobs_per_s", 0.0)})
                if not quiet:
                    print(progress_line(observed, tally, now - started_at, duration), file=sys.stderr, flush=True)


def progress_line(observed: Observed, tally: Tally, elapsed: float, duration: float) -> str:
    t = tally.totals()
    errors = ", ".join(f"{k} {v}" for k, v in t["failed_by_error"].items()) or "none"
    with observed.lock:
        kills = observed.kills
        recovered = [k for k in kills if k.get("recovered")]
        last = f", last {recovered[-1]['recovery_s']:.2f} s" if recovered else ""
        rss = f"coordinator RSS {observed.rss_last / 2**20:.0f} MiB (peak {observed.rss_peak / 2**20:.0f})"
        rate = observed.stats.get("jobs_per_s", 0.0)
    return (f"[soak {elapsed:5.0f}/{duration:.0f} s] jobs {t['submitted']} answered {t['answered']} "
            f"failed {t['failed']} ({errors}) hung {t['hung']} | kills {len(kills)} recovered {len(recovered)}{last} "
            f"| {rss} | {rate:.0f} jobs/s")


def is_worker_of(pid: int, coordinator_pid: int) -> bool:
    try:
        return psutil.Process(pid).ppid() == coordinator_pid
    except psutil.Error:
        return False


def killer_thread(address: str, observed: Observed, stop: threading.Event, every: float, seed: int,
                  max_kills_per_worker: int, allow_crash_loop: bool) -> None:
    rng = random.Random(seed)
    next_at = time.monotonic() + every
    killed: Counter[int] = Counter()
    recent: dict[int, list[float]] = defaultdict(list)   # worker id -> times of its kills
    with Client(address, timeout=10) as c:
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                stats = c.stats()
            except CohortError:
                next_at = time.monotonic() + 1.0
                continue
            observed.see(stats)
            now = time.monotonic()
            ready = [w for w in stats["workers"] if w["state"] == "ready" and w["pid"]
                     and (not max_kills_per_worker or killed[w["id"]] < max_kills_per_worker)
                     and is_worker_of(w["pid"], stats["pid"])]
            if not allow_crash_loop:
                # Stay under the coordinator's crash-loop limit (a margin of 5 s on its window):
                # this soak measures recovery, not the worker being given up.
                allowed = [w for w in ready
                           if sum(now - t < RESTART_WINDOW_S + 5 for t in recent[w["id"]]) < MAX_RESTARTS]
                if ready and not allowed:
                    with observed.lock:
                        observed.kills_deferred += 1
                ready = allowed
            if not ready:
                next_at = time.monotonic() + 1.0
                continue
            victim = rng.choice(ready)
            pid, wid, restarts = victim["pid"], victim["id"], victim["restarts"]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                next_at = time.monotonic() + 0.5
                continue
            killed_at = time.monotonic()
            killed[wid] += 1
            recent[wid].append(killed_at)
            kill = {"at_s": round(killed_at - observed.started_at, 3), "worker": wid,
                    "pid": pid, "restarts_before": restarts, "recovered": False, "noticed_s": None,
                    "recovery_s": None, "new_pid": None}
            with observed.lock:
                observed.kills.append(kill)
            wait_for_recovery(c, observed, kill, killed_at)
            next_at = max(killed_at + every, time.monotonic())


def wait_for_recovery(c: Client, observed: Observed, kill: dict[str, Any], killed_at: float) -> None:
    """Poll stats() until the killed worker is ready again with ``restarts`` incremented."""
    while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
        try:
            stats = c.stats(timeout=5)
        except CohortError:
            time.sleep(0.1)
            continue
        observed.see(stats)
        now = time.monotonic()
        w = next(w for w in stats["workers"] if w["id"] == kill["worker"])
        changed = w["restarts"] > kill["restarts_before"] or w["pid"] != kill["pid"] or w["state"] != "ready"
        if changed and kill["noticed_s"] is None:
            kill["noticed_s"] = round(now - killed_at, 3)
        if w["state"] == "ready" and w["restarts"] > kill["restarts_before"] and w["pid"] != kill["pid"]:
            with observed.lock:
                kill.update(recovered=True, recovery_s=round(now - killed_at, 3), new_pid=w["pid"],
                            restarts_after=w["restarts"], state="ready")
            return
        kill["state"] = w["state"]
        kill["restarts_after"] = w["restarts"]
        time.sleep(0.05)
