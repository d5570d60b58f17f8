"""The soak's counting and its verdict: every job and how it ended, the summary table, the report.

``Tally`` counts each job the load threads start (answered, failed by error class,
hung, wrong answer, bad input refused or not) from any thread. ``finish_report`` turns
the tally, the kills and the leak check into the JSON report and its list of reasons to
fail; ``print_summary`` prints it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from scheduler import CohortError
from scheduler.stats import percentile
from tools.soak_killer import RECOVERY_LIMIT_S, Observed

HANG_S = 60.0  # a job not done this long after submission is HUNG


def percentiles(values: list[float]) -> dict[str, float]:
    """min, p50, p90, p99 and max, rounded; the coordinator's own percentile (nearest rank)."""
    if not values:
        return {}
    v = sorted(values)
    quantiles = {f"p{round(q * 100)}": round(percentile(v, q), 4) for q in (0.5, 0.9, 0.99)}
    return {"min": round(v[0], 4), **quantiles, "max": round(v[-1], 4)}


class Tally:
    """Every job the load threads start, and how it ended; safe to use from any thread."""

    EXAMPLES = 5

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.failed: dict[str, Counter[str]] = defaultdict(Counter)   # op -> error class -> n
        self.hung: Counter[str] = Counter()
        self.untyped: Counter[str] = Counter()                        # "op: Class" -> n
        self.wrong_results: Counter[str] = Counter()
        self.bad_inputs_sent: Counter[str] = Counter()
        self.bad_inputs_refused: Counter[str] = Counter()            # expected error class -> n
        self.bad_inputs_wrong: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.open: dict[int, tuple[str, float]] = {}
        self._tokens = 0

    def begin(self, op: str) -> int:
        with self.lock:
            self._tokens += 1
            self.open[self._tokens] = (op, time.monotonic())
            self.submitted[op] += 1
            return self._tokens

    def end(self, token: int, error: BaseException | None = None, wrong: str = "") -> None:
        now = time.monotonic()
        with self.lock:
            entry = self.open.pop(token, None)
            if entry is None:
                return
            op, t0 = entry
            elapsed = now - t0
            if elapsed > HANG_S:
                self.hung[op] += 1
                self._example("hung", f"{op}: ended after {elapsed:.1f} s with "
                                      f"{'an answer' if error is None else type(error).__name__}")
            elif error is None:
                self.answered[op] += 1
                self.latency[op].append(elapsed)
                if wrong:
                    self.wrong_results[op] += 1
                    self._example("wrong_result", f"{op}: {wrong}")
            elif isinstance(error, CohortError):
                self.failed[op][type(error).__name__] += 1
                self._example(f"error {type(error).__name__}", f"{op}: {error}")
            else:
                self.untyped[f"{op}: {type(error).__name__}"] += 1
                self._example("untyped", f"{op}: {type(error).__name__}: {error}")

    def bad_input(self, kind: str, expected: type[CohortError], error: BaseException | None) -> None:
        with self.lock:
            self.bad_inputs_sent[kind] += 1
            if error is not None and type(error) is expected:
                self.bad_inputs_refused[expected.__name__] += 1
                return
            got = "an answer" if error is None else f"{type(error).__name__}: {error}"
            self.bad_inputs_wrong[kind] += 1
            self._example("bad_input_wrong", f"{kind}: expected {expected.__name__}, got {got}")

    def mark_hung(self) -> None:
        """Jobs still open this long after submission count as hung now (and once only)."""
        now = time.monotonic()
        with self.lock:
            for token, (op, t0) in list(self.open.items()):
                if now - t0 > HANG_S:
                    del self.open[token]
                    self.hung[op] += 1
                    self._example("hung", f"{op}: not done {now - t0:.1f} s after submission")

    def _example(self, kind: str, text: str) -> None:
        if len(self.examples[kind]) < self.EXAMPLES:
            self.examples[kind].append(text[:400])

    def totals(self) -> dict[str, Any]:
        with self.lock:
            errors: Counter[str] = Counter()
            for per_op in self.failed.values():
                errors.update(per_op)
            return {
                "submitted": sum(self.submitted.values()),
                "answered": sum(self.answered.values()),
                "failed": sum(errors.values()) + sum(self.untyped.values()),
                "failed_by_error": dict(errors.most_common()),
                "untyped": sum(self.untyped.values()),
                "hung": sum(self.hung.values()),
                "open": len(self.open),
                "wrong_results": sum(self.wrong_results.values()),
                "bad_inputs_sent": sum(self.bad_inputs_sent.values()),
                "bad_inputs_refused": dict(self.bad_inputs_refused),
                "bad_inputs_wrong": sum(self.bad_inputs_wrong.values()),
            }

    def per_op(self) -> dict[str, Any]:
        with self.lock:
            return {
                op: {"submitted": self.submitted[op], "answered": self.answered[op],
                     "failed": dict(self.failed[op]), "hung": self.hung[op],
                     "wrong_results": self.wrong_results[op],
                     "latency_s": percentiles(self.latency[op])}
                for op in sorted(self.submitted)
            }


# ---------------------------------------------------------------------- the verdict


def finish_report(report: dict[str, Any], observed: Observed, tally: Tally, load_errors: list[str],
                  own_coordinator: bool) -> None:
    totals = tally.totals()
    # Ended after the run (the client's own timeout): count what is still open as hung.
    totals["hung"] += totals.pop("open")
    kills = observed.kills
    recovered = [k["recovery_s"] for k in kills if k["recovered"]]
    final_workers = [{k: w.get(k) for k in ("id", "pid", "state", "restarts", "jobs_done")}
                     for w in observed.stats.get("workers", [])]
    report.update(
        jobs=totals,
        per_op=tally.per_op(),
        examples={k: v for k, v in tally.examples.items()},
        kills={"count": len(kills), "recovered": len(recovered), "not_recovered": len(kills) - len(recovered),
               "deferred_for_crash_loop_limit": observed.kills_deferred,
               "recovery_s": percentiles(recovered),
               "noticed_s": percentiles([k["noticed_s"] for k in kills if k["noticed_s"] is not None]),
               "each": kills},
        workers_final=final_workers,
        coordinator_stats_jobs=observed.stats.get("jobs"),
        memory={"coordinator_rss_baseline_mib": round(observed.rss_baseline / 2**20, 1),
                "coordinator_rss_peak_mib": round(observed.rss_peak / 2**20, 1),
                "coordinator_rss_growth_mib": round((observed.rss_peak - observed.rss_baseline) / 2**20, 1),
                "workers_rss_peak_mib": round(observed.workers_rss_peak / 2**20, 1)},
        load_errors=load_errors,
        notes=observed.notes,
        timeline=observed.timeline,
    )
    if "leaks" not in report:
        report["leaks"] = {"checked": False, "why": "external coordinator" if not own_coordinator else "not started"}
    reasons = []
    if "error" in report:
        reasons.append(report["error"].splitlines()[0])
    if observed.coordinator_died:
        reasons.append(observed.coordinator_died)
    if totals["hung"]:
        reasons.append(f"{totals['hung']} job(s) hung (not done {HANG_S:.0f} s after submission)")
    if totals["untyped"]:
        reasons.append(f"{totals['untyped']} failure(s) were not a CohortError")
    if totals["bad_inputs_wrong"]:
        reasons.append(f"{totals['bad_inputs_wrong']} bad input(s) not refused with the expected error")
    if totals["wrong_results"]:
        reasons.append(f"{totals['wrong_results']} answer(s) of the wrong shape or type")
    if len(kills) > len(recovered):
        reasons.append(f"{len(kills) - len(recovered)} killed worker(s) not ready again within {RECOVERY_LIMIT_S:.0f} s")
    leaks = report["leaks"]
    if leaks.get("processes_left"):
        reasons.append(f"processes left after stop: {leaks['processes_left']}")
    if leaks.get("shm_left"):
        reasons.append(f"{len(leaks['shm_left'])} shared-memory segment(s) left: {leaks['shm_left'][:4]}")
    if leaks.get("run_dirs_left"):
        reasons.append(f"run directories left: {leaks['run_dirs_left']}")
    stop = report.get("stop")
    if stop is not None and stop.get("was_running") and (stop.get("needed_sigkill") or stop.get("exit_code") != 0):
        reasons.append(f"the coordinator did not stop cleanly on SIGINT: {stop}")
    if load_errors:
        reasons.append(f"load errors: {load_errors[:3]}")
    if report.get("interrupted"):
        reasons.append("interrupted")
    report["reasons"] = reasons
    report["ok"] = not reasons


# ---------------------------------------------------------------------- output


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=140)
    jobs = report.get("jobs", {})
    per_op = report.get("per_op", {})
    t = Table(title=f"cohort soak: {report['settings']['duration_s']:.0f} s, {report['settings']['clients']} clients, "
                    f"kill every {report['settings']['kill_every_s']:g} s (run {report.get('run_id', '?')})")
    for col in ("op", "submitted", "answered", "failed (by error)", "hung", "wrong", "p50 s", "p99 s"):
        t.add_column(col, justify="left" if col in ("op", "failed (by error)") else "right")
    for op, row in per_op.items():
        failed = ", ".join(f"{k} {v}" for k, v in row["failed"].items()) or "-"
        lat = row["latency_s"]
        t.add_row(op, str(row["submitted"]), str(row["answered"]), failed, str(row["hung"]), str(row["wrong_results"]),
                  f"{lat.get('p50', 0):.3f}", f"{lat.get('p99', 0):.3f}")
    failed_all = ", ".join(f"{k} {v}" for k, v in jobs.get("failed_by_error", {}).items()) or "-"
    t.add_row("[bold]all", str(jobs.get("submitted", 0)), str(jobs.get("answered", 0)), failed_all,
              str(jobs.get("hung", 0)), str(jobs.get("wrong_results", 0)), "", "", style="bold")
    console.print(t)

    s = Table(show_header=False, title="kills, memory, leaks")
    s.add_column(justify="left")
    s.add_column(justify="left")
    kills = report.get("kills", {})
    rec = kills.get("recovery_s", {})
    s.add_row("bad inputs", f"{jobs.get('bad_inputs_sent', 0)} sent, refused {jobs.get('bad_inputs_refused', {})}, "
                            f"wrong {jobs.get('bad_inputs_wrong', 0)}")
    s.add_row("non-CohortError failures", str(jobs.get("untyped", 0)))
    s.add_row("workers killed", f"{kills.get('count', 0)} ({kills.get('recovered', 0)} recovered, "
                                f"{kills.get('not_recovered', 0)} not; "
                                f"{kills.get('deferred_for_crash_loop_limit', 0)} kill turns deferred by the crash-loop limit)")
    if rec:
        s.add_row("recovery time", f"min {rec['min']:.2f} s, median {rec['p50']:.2f} s, max {rec['max']:.2f} s "
                                   f"({', '.join(format(k['recovery_s'], '.2f') for k in kills['each'] if k['recovered'])})")
    mem = report.get("memory", {})
    s.add_row("coordinator RSS", f"baseline {mem.get('coordinator_rss_baseline_mib', 0):.0f} MiB, "
                                 f"peak {mem.get('coordinator_rss_peak_mib', 0):.0f} MiB "
                                 f"(+{mem.get('coordinator_rss_growth_mib', 0):.0f})")
    s.add_row("workers RSS peak (all)", f"{mem.get('workers_rss_peak_mib', 0):.0f} MiB")
    leaks = report.get("leaks", {})
    if leaks.get("checked"):
        s.add_row("leaks", f"processes {leaks['processes_left'] or 'none'} of {leaks['pids_seen']} seen, "
                           f"shm {len(leaks['shm_left'])}, run dirs {len(leaks['run_dirs_left'])}")
    else:
        s.add_row("leaks", f"not checked ({leaks.get('why', '')})")
    if "stop" in report:
        st = report["stop"]
        s.add_row("coordinator stop", f"exit {st['exit_code']} in {st['stop_s']:.2f} s"
                                      f"{' (needed SIGKILL)' if st['needed_sigkill'] else ''}")
    console.print(s)
    for kind, texts in report.get("examples", {}).items():
        if kind.startswith("error "):
            continue
        for text in texts:
            console.print(f"[yellow]{kind}[/]: {text}", markup=True, highlight=False)
    if report.get("ok"):
        console.print("[bold green]PASS[/]")
    else:
        console.print("[bold red]FAIL[/]: " + "; ".join(report.get("reasons", [])), highlight=False)
        if report.get("coordinator_log"):
            console.print(f"coordinator log kept at {report['coordinator_log']}", highlight=False)
