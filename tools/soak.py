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

Exit code 0 only if nothing hung, every failure was a ``CohortError``, every bad
input was refused with the expected error, every answer had the expected shape,
every kill was recovered from, and nothing leaked. 1 otherwise; 2 when the
coordinator could not be started or reached.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from scheduler import BadInput, Client, CohortError, UnknownModel  # noqa: E402

try:  # the coordinator's crash-loop policy: more than MAX_RESTARTS deaths within RESTART_WINDOW_S
    from scheduler.supervisor import MAX_RESTARTS, RESTART_WINDOW_S  # noqa: E402
except ImportError:  # pragma: no cover - an older or newer coordinator
    MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0

HANG_S = 60.0              # a job not done this long after submission is HUNG
JOB_TIMEOUT_S = HANG_S + 5  # the client's own timeout: longer than HANG_S, so a lost answer shows as HUNG
RECOVERY_LIMIT_S = 60.0    # a killed worker not ready again after this long is "not recovered"
READY_TIMEOUT_S = 180.0    # coordinator start-up
STOP_GRACE_S = 20.0        # SIGINT, then SIGKILL of the process group
LEAK_WAIT_S = 10.0         # how long stopped processes get to disappear
PROGRESS_EVERY_S = 5.0
RSS_EVERY_S = 0.2
STATS_EVERY_S = 1.0


# ---------------------------------------------------------------------- the cohort under test


@dataclass(frozen=True)
class GroupShape:
    name: str
    count: int
    sample: tuple[int, ...]   # one input without the batch dimension
    classes: int


MLP = GroupShape("mlp", 8, (16,), 10)
CNN = GroupShape("cnn", 4, (3, 32, 32), 10)
GROUPS = (MLP, CNN)


def soak_groups() -> list[dict[str, Any]]:
    return [
        {
            "name": MLP.name,
            "factory": "examples.models:mlp",
            "kwargs": {"d_in": MLP.sample[0], "hidden": 32, "d_out": MLP.classes},
            "count": MLP.count,
            "input": {"shape": [-1, *MLP.sample], "dtype": "float32"},
            "loss": "cross_entropy",
            "optimizer": {"name": "sgd", "lr": [0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001]},
            "init": {"seed": 0},
        },
        {
            "name": CNN.name,
            "factory": "examples.models:cnn",
            "kwargs": {"channels": CNN.sample[0], "width": 4, "classes": CNN.classes},
            "count": CNN.count,
            "input": {"shape": [-1, *CNN.sample], "dtype": "float32"},
            "loss": "cross_entropy",
            "optimizer": {"name": "adam", "lr": 1e-3},
            "init": {"seed": 100},
        },
    ]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def config_text(coordinator: dict[str, Any], groups: list[dict[str, Any]]) -> str:
    lines = ["[coordinator]", *(f"{k} = {toml_value(v)}" for k, v in coordinator.items())]
    for group in groups:
        lines += ["", "[[group]]", *(f"{k} = {toml_value(v)}" for k, v in group.items())]
    return "\n".join(lines) + "\n"


def coordinator_settings(address: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"address": address, "workers": args.workers, "device": args.device, "mps": args.mps,
            "snapshot_interval_s": 1.0}


@dataclass
class Started:
    """A coordinator this tool started, in its own temporary directory."""

    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path
    address: str

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_coordinator(args: argparse.Namespace) -> Started:
    directory = Path(tempfile.mkdtemp(prefix="cohort-soak-"))
    address = f"ipc://{directory}/coordinator.sock"
    config = directory / "soak.toml"
    config.write_text(config_text(coordinator_settings(address, args), soak_groups()))
    log_path = directory / "coordinator.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.worker_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.worker_threads)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "run", "--config", str(config)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Started(process, directory, log_path, address)


def wait_until_up(address: str, process: subprocess.Popen[bytes] | None, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with Client(address, timeout=2) as c:
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the coordinator exited with code {process.returncode} during start-up")
            try:
                return c.stats(timeout=2)
            except CohortError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the coordinator did not answer within {timeout:.0f} s") from None
                time.sleep(0.2)


def stop_coordinator(started: Started) -> dict[str, Any]:
    """SIGINT, then SIGKILL of its process group: what it took and the exit code."""
    process = started.process
    out: dict[str, Any] = {"exit_code": process.poll(), "needed_sigkill": False, "stop_s": 0.0,
                           "was_running": process.poll() is None}
    if process.poll() is None:
        t0 = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            out["needed_sigkill"] = True
            kill_group(process.pid)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        out["stop_s"] = round(time.monotonic() - t0, 3)
        out["exit_code"] = process.poll()
    kill_group(process.pid)  # anything left in its group
    return out


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------- counting


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))], 4)

    return {"min": round(v[0], 4), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(v[-1], 4)}


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


# ---------------------------------------------------------------------- the load


def batch(rng: random.Random, low: int = 1, high: int = 8) -> int:
    return rng.randint(low, high)


def inputs(g: GroupShape, b: int) -> torch.Tensor:
    return torch.randn(b, *g.sample)


def labels(g: GroupShape, *shape: int) -> torch.Tensor:
    return torch.randint(0, g.classes, shape)


def pick_group(rng: random.Random) -> GroupShape:
    return MLP if rng.random() < 0.75 else CNN


def shape_check(value: Any, shape: tuple[int, ...]) -> str:
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor of shape {list(shape)}, got {type(value).__name__}"
    if tuple(value.shape) != shape:
        return f"expected shape {list(shape)}, got {list(value.shape)}"
    return ""


def loss_check(value: Any, n: int | None = None) -> str:
    if n is None:
        return "" if isinstance(value, float) else f"expected a float loss, got {type(value).__name__}"
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, float) for v in value)):
        return f"expected {n} float losses, got {value!r}"[:200]
    return ""


class Load:
    """One client thread's mix of calls."""

    def __init__(self, client: Client, rng: random.Random, tally: Tally) -> None:
        self.c = client
        self.rng = rng
        self.tally = tally
        self.actions: list[tuple[Callable[[], None], int]] = [
            (self.infer, 30), (self.train_step, 20), (self.burst, 12), (self.ensemble, 8),
            (self.train_round, 8), (self.barrier, 5), (self.get_weights, 5), (self.copy_weights, 2),
            (self.bad_input, 5),
        ]
        self.weight_keys: dict[str, set[str]] = {}

    def step(self) -> None:
        fns, weights = zip(*self.actions)
        self.rng.choices(fns, weights)[0]()

    def call(self, op: str, fn: Callable[[], Any], check: Callable[[Any], str] = lambda _: "") -> None:
        token = self.tally.begin(op)
        try:
            value = fn()
        except BaseException as exc:  # counted by class; a non-CohortError fails the soak
            self.tally.end(token, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.tally.end(token, None, check(value))

    def model(self, g: GroupShape) -> str:
        return f"{g.name}/{self.rng.randrange(g.count)}"

    def infer(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng)
        self.call("infer", lambda: self.c.infer(self.model(g), inputs(g, b)),
                  lambda y: shape_check(y, (b, g.classes)))

    def train_step(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng)
        self.call("train_step", lambda: self.c.train_step(self.model(g), inputs(g, b), labels(g, b)), loss_check)

    def ensemble(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng, 1, 4)
        self.call("ensemble", lambda: self.c.ensemble(g.name, inputs(g, b)),
                  lambda y: shape_check(y, (g.count, b, g.classes)))

    def train_round(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng, 1, 4)
        xs, ts = torch.randn(g.count, b, *g.sample), labels(g, g.count, b)
        self.call("train_round", lambda: self.c.train_round(g.name, xs, ts), lambda ls: loss_check(ls, g.count))

    def barrier(self) -> None:
        r = self.rng.random()
        scope: str | list[str] | None
        if r < 0.4:
            scope = None
        elif r < 0.7:
            scope = pick_group(self.rng).name
        else:
            scope = sorted({self.model(pick_group(self.rng)) for _ in range(3)})
        self.call("barrier", lambda: self.c.barrier(scope),
                  lambda v: "" if v is None else f"expected None, got {type(v).__name__}")

    def get_weights(self) -> None:
        g = pick_group(self.rng)

        def check(sd: Any) -> str:
            if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                return f"expected a dict of tensors, got {type(sd).__name__}"
            keys = self.weight_keys.setdefault(g.name, set(sd))
            return "" if set(sd) == keys else f"keys changed: {sorted(set(sd) ^ keys)}"

        self.call("get_weights", lambda: self.c.get_weights(self.model(g)), check)

    def copy_weights(self) -> None:
        g = pick_group(self.rng)
        src, dst = self.model(g), self.model(g)
        self.call("copy_weights", lambda: self.c.copy_weights(src=src, dst=dst))

    def burst(self) -> None:
        """Pipelined submits without waiting, then every future: each one must end."""
        futures: list[Future[Any]] = []
        for _ in range(self.rng.randint(8, 48)):
            g, b = pick_group(self.rng), batch(self.rng, 1, 4)
            r = self.rng.random()
            if r < 0.6:
                op, target, args, check = "infer", self.model(g), (inputs(g, b),), self._shape(b, g.classes)
            elif r < 0.9:
                op, target, args, check = "train_step", self.model(g), (inputs(g, b), labels(g, b)), loss_check
            else:
                op, target, args, check = "ensemble", g.name, (inputs(g, b),), self._shape(g.count, b, g.classes)
            token = self.tally.begin(f"submit:{op}")
            try:
                future = self.c.submit(op, target, *args)
            except Exception as exc:
                self.tally.end(token, exc)
                continue
            future.add_done_callback(self._done(token, check))
            futures.append(future)
        wait_futures(futures, timeout=HANG_S + 5)

    @staticmethod
    def _shape(*shape: int) -> Callable[[Any], str]:
        return lambda y: shape_check(y, shape)

    def _done(self, token: int, check: Callable[[Any], str]) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            error = future.exception()
            try:
                wrong = check(future.result()) if error is None else ""
            except Exception as exc:  # a checker bug must not vanish in the client's I/O thread
                wrong = f"checking the result raised {type(exc).__name__}: {exc}"
            self.tally.end(token, error, wrong)

        return done

    def bad_input(self) -> None:
        g = pick_group(self.rng)
        cases: list[tuple[str, type[CohortError], Callable[[], Any]]] = [
            ("wrong_shape", BadInput, lambda: self.c.infer(self.model(g), torch.randn(2, *g.sample[:-1], g.sample[-1] + 1))),
            ("wrong_dtype", BadInput, lambda: self.c.infer(self.model(g), torch.zeros(2, *g.sample, dtype=torch.int64))),
            ("empty_batch", BadInput, lambda: self.c.infer(self.model(g), torch.randn(0, *g.sample))),
            ("target_batch", BadInput, lambda: self.c.train_step(self.model(g), inputs(g, 3), labels(g, 2))),
            ("round_not_stacked", BadInput, lambda: self.c.train_round(g.name, torch.randn(g.count + 1, 2, *g.sample),
                                                                       labels(g, g.count + 1, 2))),
            ("no_such_index", UnknownModel, lambda: self.c.infer(f"{g.name}/{g.count + 7}", inputs(g, 1))),
            ("no_such_group", UnknownModel, lambda: self.c.infer("nosuchgroup/0", inputs(g, 1))),
            ("ensemble_of_model", UnknownModel, lambda: self.c.ensemble(f"{g.name}/0", inputs(g, 1))),
        ]
        kind, expected, fn = self.rng.choice(cases)
        try:
            fn()
        except Exception as exc:
            self.tally.bad_input(kind, expected, exc)
            return
        self.tally.bad_input(kind, expected, None)


def load_thread(address: str, seed: int, stop: threading.Event, tally: Tally, errors: list[str]) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    try:
        with Client(address, timeout=JOB_TIMEOUT_S) as c:
            load = Load(c, rng, tally)
            while not stop.is_set():
                load.step()
    except Exception as exc:  # a load thread must never die silently
        errors.append(f"load thread {seed}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- observing and killing


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


# ---------------------------------------------------------------------- leaks


def alive(pids: dict[int, float]) -> list[int]:
    """Pids still running (not zombies) that are the same processes as when they were seen."""
    out = []
    for pid, created in pids.items():
        try:
            p = psutil.Process(pid)
            if created and abs(p.create_time() - created) > 0.5:
                continue  # the pid was reused by another process
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def leftover_shm(run_id: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"cohort-{run_id}-*")) if run_id else []


def leftover_run_dirs(run_id: str) -> list[str]:
    return sorted(str(p) for p in Path(tempfile.gettempdir()).glob(f"cohort-{run_id}-*")) if run_id else []


def check_leaks(observed: Observed, coordinator: dict[int, float]) -> dict[str, Any]:
    pids = {**coordinator, **observed.pids}
    deadline = time.monotonic() + LEAK_WAIT_S
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {
        "checked": True,
        "pids_seen": len(pids),
        "processes_left": alive(pids),
        "shm_left": leftover_shm(observed.run_id),
        "run_dirs_left": leftover_run_dirs(observed.run_id),
    }


def clean_up_leaks(leaks: dict[str, Any]) -> None:
    """After they were counted: kill what was left and remove its segments, so nothing litters the machine."""
    for pid in leaks.get("processes_left", []):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for name in leaks.get("shm_left", []):
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass
    for path in leaks.get("run_dirs_left", []):
        shutil.rmtree(path, ignore_errors=True)


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


class StartFailed(RuntimeError):
    """The coordinator could not be started or reached."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak; returns the report (``report["ok"]`` says whether it passed)."""
    report: dict[str, Any] = {
        "settings": {"duration_s": args.duration, "workers": args.workers, "kill_every_s": args.kill_every,
                     "clients": args.clients, "address": args.address, "device": args.device, "mps": args.mps,
                     "hang_s": HANG_S, "job_timeout_s": JOB_TIMEOUT_S, "seed": args.seed,
                     "max_kills_per_worker": args.max_kills_per_worker, "worker_threads": args.worker_threads,
                     "allow_crash_loop": args.allow_crash_loop},
    }
    started: Started | None = None
    observed = Observed()
    tally = Tally()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    load_errors: list[str] = []
    coordinator_pids: dict[int, float] = {}
    interrupted = False
    try:
        if args.address:
            address = args.address
            first = check_external(address)
        else:
            started = start_coordinator(args)
            address = started.address
            report["coordinator_log"] = str(started.log_path)
            try:
                first = wait_until_up(address, started.process, READY_TIMEOUT_S)
            except RuntimeError as exc:
                raise StartFailed(f"{exc}\n{started.log_tail()}") from None
        observed.run_id, observed.coordinator_pid = first["run_id"], first["pid"]
        with observed.lock:
            observed.stats = first
        observed.see(first)
        if started is not None:
            coordinator_pids[started.process.pid] = psutil.Process(started.process.pid).create_time()
        try:
            observed.rss_baseline = observed.rss_peak = psutil.Process(observed.coordinator_pid).memory_info().rss
        except psutil.Error:
            pass
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
            report["stop"] = stop_coordinator(started)
            if observed.run_id:
                report["leaks"] = check_leaks(observed, coordinator_pids)
                clean_up_leaks(report["leaks"])
            report["coordinator_log_tail"] = started.log_tail(2000)
    report["interrupted"] = interrupted
    finish_report(report, observed, tally, load_errors, started is not None)
    if started is not None and report["ok"]:
        shutil.rmtree(started.directory, ignore_errors=True)
        report.pop("coordinator_log", None)
    return report


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_config:
        address = args.address or "ipc:///tmp/cohort-soak.sock"
        Path(args.write_config).write_text(config_text(coordinator_settings(address, args), soak_groups()))
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
