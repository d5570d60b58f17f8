#!/usr/bin/env python
"""Soak test: a mixed load on a real coordinator while a killer SIGKILLs its workers.

    python tools/soak.py [--minutes M | --seconds S] [--workers N] [--kill-every S]
                         [--clients C] [--address ADDR] [--json FILE]

Without ``--address`` it writes a config (8 MLPs and 4 small CNNs from
``examples.models``, ``snapshot_interval_s = 1``) into a private temporary directory,
starts ``python -m scheduler run`` on an ``ipc://`` path inside it, and always stops
it again (SIGINT, then SIGKILL of its process group). With ``--address`` it drives a
coordinator started elsewhere from ``--write-config FILE``; nothing is started,
stopped or checked for leaks then.

C client threads (one ``Client`` each) run a mix of ``infer``, ``train_step``,
``ensemble``, ``train_round``, ``barrier``, ``get_weights``, ``copy_weights``,
pipelined ``submit`` bursts and bad inputs that must be refused with ``BadInput`` or
``UnknownModel``. A killer thread SIGKILLs a random ready worker every
``--kill-every`` seconds (pids from ``stats()``) and measures how long the
coordinator takes to have that worker ``ready`` again with ``restarts`` incremented.
It never kills one worker more than the coordinator's crash-loop limit allows
(``MAX_RESTARTS`` deaths in ``RESTART_WINDOW_S``), unless ``--allow-crash-loop``
asks for that: past the limit the coordinator stops restarting the worker.

Every job must end: answered, or failed with a typed ``CohortError`` (counted by
class). A job not done ``HANG_S`` seconds after it was submitted is HUNG. At the end:
no process (coordinator and every worker pid ever seen) and no
``/dev/shm/cohort-<run_id>-*`` segment may be left.

The modules: this one (command line and the run), ``soak_load`` (the groups and the
client load mix), ``soak_killer`` (the monitor, the killer and recovery timing),
``soak_report`` (the tally, the verdict and the summary) and ``harness`` (the
coordinator's start, stop and leak check, shared with the tests and the benchmark).

Exit code 0 only if nothing hung, every failure was a ``CohortError``, every bad
input was refused with the expected error, every answer had the expected shape,
every kill was recovered from, and nothing leaked. 1 otherwise; 2 when the
coordinator could not be started or reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scheduler import Client, CohortError  # noqa: E402
from tools import harness  # noqa: E402
from tools.harness import StartFailed, config_text, wait_until_up  # noqa: E402
from tools.soak_killer import (  # noqa: E402
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    Observed,
    killer_thread,
    monitor_thread,
)
from tools.soak_load import GROUPS, JOB_TIMEOUT_S, load_thread, soak_groups  # noqa: E402
from tools.soak_report import HANG_S, Tally, finish_report, print_summary  # noqa: E402

READY_TIMEOUT_S = 180.0    # coordinator start-up


def coordinator_settings(args: argparse.Namespace, address: str | None = None) -> dict[str, Any]:
    """The ``[coordinator]`` table; without an address the harness picks a private ipc:// one."""
    settings: dict[str, Any] = {"workers": args.workers, "device": args.device, "mps": args.mps,
                                "snapshot_interval_s": 1.0}
    return settings if address is None else {"address": address, **settings}


def start_coordinator(args: argparse.Namespace) -> harness.Cohort:
    """The soak's own coordinator, in a private temporary directory ``cohort-soak-*``."""
    threads = str(args.worker_threads)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if args.worker_threads else {}
    return harness.start(soak_groups(), coordinator_settings(args), prefix="cohort-soak-", env=env,
                         config_name="soak.toml", ready_timeout_s=READY_TIMEOUT_S)


# ---------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run the load (default 5)")
    length.add_argument("--seconds", type=float, help="how long to run the load, in seconds")
    p.add_argument("--workers", type=int, default=2, help="workers of the coordinator it starts (default 2)")
    p.add_argument("--kill-every", type=float, default=10.0, metavar="S",
                   help="SIGKILL a random worker every S seconds; 0: never (default 10)")
    p.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--address", help="drive this coordinator (started from --write-config's file) instead")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--device", default="auto", help="device of the coordinator it starts (default auto)")
    p.add_argument("--mps", default="off", choices=("auto", "on", "off"),
                   help="MPS mode of the coordinator it starts (default off: SIGKILL mid-kernel can hang MPS)")
    p.add_argument("--worker-threads", type=int, default=None, metavar="N",
                   help="OMP_NUM_THREADS for the coordinator it starts and its workers (default: $OMP_NUM_THREADS, "
                        "else the cores shared out among the workers; 0: leave torch's default)")
    p.add_argument("--max-kills-per-worker", type=int, default=0, metavar="N",
                   help="kill each worker at most N times (0: no limit)")
    p.add_argument("--allow-crash-loop", action="store_true",
                   help=f"kill a worker even when that makes more than {MAX_RESTARTS} deaths in "
                        f"{RESTART_WINDOW_S:.0f} s, after which the coordinator stops restarting it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--write-config", metavar="FILE",
                   help="write the soak's coordinator config (for --address) to FILE and exit")
    args = p.parse_args(argv)
    args.duration = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 5.0)
    if args.worker_threads is None:
        env_threads = os.environ.get("OMP_NUM_THREADS", "")
        args.worker_threads = int(env_threads) if env_threads.isdigit() else max(1, (os.cpu_count() or 1) // args.workers)
    if args.duration <= 0 or args.clients < 1 or args.workers < 1 or args.kill_every < 0:
        p.error("--minutes/--seconds, --clients and --workers must be positive, --kill-every not negative")
    return args


def check_external(address: str) -> dict[str, Any]:
    """The coordinator at ``address`` must serve the soak's groups."""
    stats = wait_until_up(address, None, 10.0)
    with Client(address, timeout=10) as c:
        groups = Counter(m.group for m in c.models())
    for g in GROUPS:
        if groups.get(g.name) != g.count:
            raise RuntimeError(f"{address} does not serve the soak's groups ({dict(groups)}); "
                               f"start it from the config --write-config FILE writes")
    return stats


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak; returns the report (``report["ok"]`` says whether it passed)."""
    report: dict[str, Any] = {
        "settings": {"duration_s": args.duration, "workers": args.workers, "kill_every_s": args.kill_every,
                     "clients": args.clients, "address": args.address, "device": args.device, "mps": args.mps,
                     "hang_s": HANG_S, "job_timeout_s": JOB_TIMEOUT_S, "seed": args.seed,
                     "max_kills_per_worker": args.max_kills_per_worker, "worker_threads": args.worker_threads,
                     "allow_crash_loop": args.allow_crash_loop},
    }
    started: harness.Cohort | None = None
    observed = Observed()
    tally = Tally()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    load_errors: list[str] = []
    interrupted = False
    try:
        if args.address:
            address = args.address
            first = check_external(address)
        else:
            try:
                started = start_coordinator(args)
            except StartFailed as exc:  # the harness stopped and removed what it had started
                report["coordinator_log_tail"] = exc.log_tail[-2000:]
                raise
            address = started.address
            report["coordinator_log"] = str(started.log_path)
            first = started.info
        observed.run_id, observed.coordinator_pid = first["run_id"], first["pid"]
        with observed.lock:
            observed.stats = first
        observed.see(first)
        observed.sample_baseline()
        report.update(run_id=observed.run_id, coordinator_pid=observed.coordinator_pid, device=first.get("device"),
                      initial_workers=[{k: w[k] for k in ("id", "pid", "models")} for w in first["workers"]])

        started_at = observed.started_at = time.monotonic()
        process = started.process if started is not None else None
        threads.append(threading.Thread(target=monitor_thread, name="soak-monitor", daemon=True,
                                        args=(address, process, observed, tally, stop, started_at, args.duration,
                                              args.quiet)))
        for i in range(args.clients):
            threads.append(threading.Thread(target=load_thread, name=f"soak-load-{i}", daemon=True,
                                            args=(address, args.seed * 1000 + i, stop, tally, load_errors)))
        killer = None
        if args.kill_every > 0:
            killer = threading.Thread(target=killer_thread, name="soak-killer", daemon=True,
                                      args=(address, observed, stop, args.kill_every, args.seed,
                                            args.max_kills_per_worker, args.allow_crash_loop))
            threads.append(killer)
        for t in threads:
            t.start()
        try:
            stop.wait(args.duration)
        except KeyboardInterrupt:
            interrupted = True
        stop.set()
        report["load_s"] = round(time.monotonic() - started_at, 3)
        # Load threads finish the call they are in; each one ends within the client's timeout.
        deadline = time.monotonic() + JOB_TIMEOUT_S + 10
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            load_errors.append(f"threads still running after the run: {stuck}")
        tally.mark_hung()
        try:
            observed.see(wait_until_up(address, None, 10.0))
        except RuntimeError:
            pass
    except KeyboardInterrupt:
        interrupted = True
    except (RuntimeError, CohortError) as exc:
        report["error"] = str(exc)
        report["startup_failed"] = isinstance(exc, StartFailed) or not observed.run_id
    finally:
        stop.set()
        if started is not None:
            started.remember(observed.pids)  # every worker the run saw, the killed ones included
            report["stop"] = started.stop().as_dict()
            report["leaks"] = started.leaks().as_dict()
            report["coordinator_log_tail"] = started.log_tail(2000)
    report["interrupted"] = interrupted
    finish_report(report, observed, tally, load_errors, own_coordinator=not args.address)
    if started is not None:  # leftovers go in any case; the directory (config, log) only if it passed
        started.clean_up(remove_directory=report["ok"])
        if report["ok"]:
            report.pop("coordinator_log", None)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_config:
        address = args.address or "ipc:///tmp/cohort-soak.sock"
        Path(args.write_config).write_text(config_text(coordinator_settings(args, address), soak_groups()))
        print(f"wrote {args.write_config}; start it with: python -m scheduler run --config {args.write_config}")
        return 0
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_summary(report)
    if report.get("startup_failed"):
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
