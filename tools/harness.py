"""Start a real coordinator tree, stop it, and prove that it left nothing behind.

The one place that starts ``python -m scheduler run`` for the system tests (through
``tests/system/cohort_harness.py``), ``tools/soak.py`` and ``tools/bench_cohort.py``::

    config_text(coordinator, groups)    TOML: a [coordinator] table and a [[group]] table per group
    start(groups, settings) -> Cohort   write the config, start the coordinator on a private
                                        ipc:// path, wait until it answers stats()
    cohort.address / process / log_path / info (the first stats()) / client()
    cohort.stop(sig) -> Stopped         sig (SIGINT), a grace, then SIGKILL of its process group;
                                        afterwards no process of the tree is left, whatever it took
    cohort.leaks() -> Leaks             processes that outlived the stop, /dev/shm/cohort-<run_id>-*,
                                        run directories cohort-<run_id>-* under the temporary directory
    cohort.close() -> Leaks             stop, count what leaked, then remove it (also ``with``'s exit)

Workers run in sessions of their own (a Ctrl-C reaches the coordinator only), so the
coordinator's process group is not the whole tree: the harness remembers every pid of
the tree it sees (the coordinator, the workers in ``stats()``, their descendants when
it stops) with its start time, and kills only those, never a reused pid.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from scheduler import Client, CohortError

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90.0  # start-up: the config read, the workers started and ready
STOP_GRACE_S = 20.0     # after SIGINT, before SIGKILL of the process group
LEAK_WAIT_S = 10.0      # how long the rest of the tree gets to go once the coordinator is gone
POLL_S = 0.1
IPC_PATH_MAX = 107      # sun_path holds 108 bytes with the terminating NUL


# ---------------------------------------------------------------------- TOML


class TomlError(ValueError):
    """A value TOML cannot hold: NaN or infinity, None, a lone surrogate, an integer past 64 bits."""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def toml_string(text: str, where: str = "value") -> str:
    """A TOML basic string, all ASCII: anything else is a \\u or \\U escape, so the text reads
    the same whatever encoding the file is written in."""
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif 0xD800 <= code <= 0xDFFF:
            raise TomlError(f"{where}: TOML strings cannot hold a lone surrogate (U+{code:04X})")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    return '"' + "".join(out) + '"'


def toml_key(key: Any, where: str = "key") -> str:
    """A bare key when TOML allows one, else a quoted one."""
    if not isinstance(key, str):
        raise TypeError(f"{where}: TOML keys are strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else toml_string(key, where)


def toml_value(value: Any, where: str = "value") -> str:
    """One TOML value: booleans, integers, finite floats, strings (and paths), lists, and
    mappings as inline tables, nested to any depth. ``where`` names the value in errors."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise TomlError(f"{where}: TOML integers are 64-bit, got {value}")
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TomlError(f"{where}: TOML has no NaN or infinity, got {value!r}")
        return repr(float(value))
    if isinstance(value, str):
        return toml_string(value, where)
    if isinstance(value, os.PathLike):
        return toml_string(str(os.fspath(value)), where)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        pairs = (f"{toml_key(k, where)} = {toml_value(v, f'{where}.{k}')}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    if value is None:
        raise TomlError(f"{where}: TOML has no null; leave the key out")
    raise TypeError(f"{where}: no TOML form for {type(value).__name__} {value!r}")


def _pairs(table: Mapping[str, Any], where: str) -> list[str]:
    return [f"{toml_key(k, where)} = {toml_value(v, f'{where}.{k}')}" for k, v in table.items()]


def toml_document(document: Mapping[str, Any]) -> str:
    """A TOML file: plain top-level keys first, then a ``[table]`` for each mapping and a
    ``[[table]]`` for each mapping in a list of mappings; deeper mappings are inline tables."""
    head: list[str] = []
    tables: list[list[str]] = []
    for key, value in document.items():
        name = toml_key(key)
        if isinstance(value, Mapping):
            tables.append([f"[{name}]", *_pairs(value, key)])
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            tables += [[f"[[{name}]]", *_pairs(item, f"{key}[{i}]")] for i, item in enumerate(value)]
        else:
            head.append(f"{name} = {toml_value(value, key)}")
    blocks = ([head] if head else []) + tables
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def config_text(coordinator: Mapping[str, Any], groups: Sequence[Mapping[str, Any]]) -> str:
    """A cohort config: one ``[coordinator]`` table and one ``[[group]]`` per group."""
    return toml_document({"coordinator": coordinator, "group": list(groups)})


def write_config(path: Path, coordinator: Mapping[str, Any], groups: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text(config_text(coordinator, groups), encoding="ascii")
    return path


# ---------------------------------------------------------------------- processes and leaks


def kill_group(pid: int) -> None:
    """SIGKILL the process group that ``pid`` leads (a coordinator starts a session of its own)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same(process: psutil.Process, created: float) -> bool:
    """Still the process that was seen (its pid not reused since), and not a zombie."""
    try:
        return abs(process.create_time() - created) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def alive(pids: Mapping[int, float] | Iterable[int]) -> list[int]:
    """Pids still running, zombies not counted. With a mapping pid -> start time, a pid
    now used by another process is not counted either."""
    seen = pids if isinstance(pids, Mapping) else dict.fromkeys(pids, 0.0)
    out = []
    for pid, created in seen.items():
        try:
            process = psutil.Process(pid)
            if _same(process, created or process.create_time()):
                out.append(pid)
        except psutil.Error:
            pass
    return out


def wait_gone(pids: Mapping[int, float], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` runs, for at most ``timeout_s``; returns those still there."""
    deadline = time.monotonic() + timeout_s
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = alive(pids)
    return left


def kill_processes(pids: Mapping[int, float], wait_s: float = 5.0) -> list[int]:
    """SIGKILL those of ``pids`` that are still the processes seen; returns any that survived."""
    targets = []
    for pid in alive(pids):
        try:
            process = psutil.Process(pid)
            if _same(process, pids[pid]):
                process.kill()
                targets.append(process)
        except psutil.Error:
            pass
    psutil.wait_procs(targets, timeout=wait_s)
    return alive({p.pid: pids[p.pid] for p in targets})


def shm_dir() -> Path:
    path = Path("/dev/shm")
    return path if path.is_dir() else Path(tempfile.gettempdir())


def leftover_shm(run_id: str) -> list[str]:
    """Shared-memory segments of a run: ``cohort-<run_id>-*``."""
    return sorted(p.name for p in shm_dir().glob(f"cohort-{run_id}-*")) if run_id else []


def leftover_run_dirs(run_id: str, temp_dir: str | Path | None = None) -> list[str]:
    """The run's private directories (worker sockets): ``cohort-<run_id>-*`` under the temporary directory."""
    if not run_id:
        return []
    root = Path(temp_dir) if temp_dir else Path(tempfile.gettempdir())
    return sorted(str(p) for p in root.glob(f"cohort-{run_id}-*"))


@dataclass
class Stopped:
    """How a coordinator stopped."""

    was_running: bool
    exit_code: int | None
    needed_sigkill: bool = False       # it did not exit within the grace after the signal
    stop_s: float = 0.0
    processes_left: list[int] = field(default_factory=list)  # outlived it by LEAK_WAIT_S; killed since

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Leaks:
    """What a stopped coordinator tree left behind (before ``clean_up`` removed it)."""

    checked: bool
    pids_seen: int = 0
    processes_left: list[int] = field(default_factory=list)
    shm_left: list[str] = field(default_factory=list)
    run_dirs_left: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.processes_left or self.shm_left or self.run_dirs_left)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- one coordinator tree


class StartFailed(RuntimeError):
    """The coordinator exited or did not answer during start-up. The message is one line
    (ending in the log's last lines); ``log_tail`` holds more of the log."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        lines = [line.strip() for line in log_tail.splitlines() if line.strip()][-3:]
        super().__init__(f"{reason}: {' | '.join(lines)[-600:] or '(empty log)'}" if log_tail else reason)
        self.reason = reason
        self.log_tail = log_tail


def wait_until_up(address: str, process: subprocess.Popen[bytes] | None = None,
                  timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll ``stats()`` until the coordinator at ``address`` answers; returns that answer.

    Raises ``StartFailed`` when ``process`` (the coordinator, if this process started it)
    exits first or nothing answers within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with Client(address, timeout=2) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise StartFailed(f"the coordinator exited with code {process.returncode} during start-up")
            try:
                return client.stats(timeout=2)
            except CohortError:
                if time.monotonic() > deadline:
                    raise StartFailed(f"the coordinator did not answer within {timeout_s:.0f} s") from None
                time.sleep(0.2)


class Cohort:
    """One coordinator process and its workers, started by ``start``."""

    def __init__(self, process: subprocess.Popen[bytes], address: str, directory: Path, config_path: Path,
                 log_path: Path, temp_dir: str, owns_directory: bool) -> None:
        self.process = process
        self.address = address
        self.directory = directory
        self.config_path = config_path
        self.log_path = log_path
        self.temp_dir = temp_dir          # where the coordinator makes its run directory
        self.owns_directory = owns_directory
        self.info: dict[str, Any] = {}    # the first stats() answer: run_id, pid, workers, device, ...
        self.pids: dict[int, float] = {}  # every process of the tree seen -> its start time
        self.stopped: Stopped | None = None
        self._leaks: Leaks | None = None
        # A Cohort dropped without stop() (or an interpreter exit) still takes the coordinator down.
        self._finalizer = weakref.finalize(self, kill_group, process.pid)
        self.remember([process.pid])

    # -------------------------------------------------------------- using it

    @property
    def run_id(self) -> str:
        return str(self.info.get("run_id", ""))

    def client(self, **kwargs: Any) -> Client:
        return Client(self.address, **kwargs)

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """``stats()`` from the coordinator; its worker pids are remembered."""
        with self.client(timeout=timeout) as c:
            stats = c.stats()
        self.see(stats)
        return stats

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"] if w.get("pid")]

    def see(self, stats: Mapping[str, Any]) -> None:
        """Remember the worker pids in a ``stats()`` answer."""
        self.remember(w["pid"] for w in stats.get("workers", []) if w.get("pid"))

    def remember(self, pids: Mapping[int, float] | Iterable[int]) -> None:
        """Count these processes as part of the tree: they must be gone after ``stop``."""
        if isinstance(pids, Mapping):
            items = [(pid, created) for pid, created in pids.items() if created]
        else:
            items = [(pid, _start_time(pid)) for pid in pids]
        for pid, created in items:
            if created is not None and pid not in self.pids:
                self.pids[pid] = created

    def _remember_descendants(self, pids: Iterable[int]) -> None:
        for pid in pids:
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                try:
                    self.pids.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    # -------------------------------------------------------------- stopping

    def stop(self, sig: int = signal.SIGINT, grace_s: float = STOP_GRACE_S,
             wait_s: float = LEAK_WAIT_S) -> Stopped:
        """``sig`` to the coordinator; after ``grace_s`` SIGKILL to its process group; then wait
        ``wait_s`` for the rest of the tree to go and SIGKILL what did not (recorded as left).
        Calling it again returns the first record."""
        if self.stopped is not None:
            return self.stopped
        process = self.process
        self._remember_descendants(alive(self.pids))
        was_running = process.poll() is None
        needed_sigkill = False
        began = time.monotonic()
        if was_running:
            try:
                process.send_signal(sig)
                process.wait(grace_s)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                needed_sigkill = True
        kill_group(process.pid)  # the coordinator if it hung, and anything else left in its group
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._finalizer.detach()
        stop_s = round(time.monotonic() - began, 3)
        left = wait_gone(self.pids, wait_s)
        if left:
            self._remember_descendants(left)
            kill_processes(self.pids)
        self.stopped = Stopped(was_running, process.returncode, needed_sigkill, stop_s, left)
        return self.stopped

    def leaks(self) -> Leaks:
        """What the tree left behind (stopping it first if needed); counted once."""
        stopped = self.stop()
        if self._leaks is None:
            self._leaks = Leaks(True, len(self.pids), list(stopped.processes_left), leftover_shm(self.run_id),
                                leftover_run_dirs(self.run_id, self.temp_dir))
        return self._leaks

    def clean_up(self, remove_directory: bool | None = None) -> None:
        """Remove the run's leftovers (after ``leaks`` counted them) and, by default, the
        directory ``start`` made for it (never one the caller passed)."""
        kill_processes(self.pids)
        for name in leftover_shm(self.run_id):
            try:
                (shm_dir() / name).unlink()
            except OSError:
                pass
        for path in leftover_run_dirs(self.run_id, self.temp_dir):
            shutil.rmtree(path, ignore_errors=True)
        if self.owns_directory if remove_directory is None else remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def close(self, sig: int = signal.SIGINT, remove_directory: bool | None = None) -> Leaks:
        """Stop, count the leaks, remove them; returns what was found."""
        self.stop(sig)
        leaks = self.leaks()
        self.clean_up(remove_directory)
        return leaks

    def __enter__(self) -> Cohort:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def start(
    groups: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any] | None = None,
    *,
    directory: Path | None = None,
    prefix: str = "cohort-",
    env: Mapping[str, str] | None = None,
    pythonpath: Sequence[str | Path] = (),
    args: Sequence[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
    config_name: str = "cohort.toml",
) -> Cohort:
    """Write a config and start ``python -m scheduler run`` on it; return once it answers ``stats()``.

    ``settings`` are the ``[coordinator]`` keys, over ``address`` (``ipc://`` in the
    directory), ``workers = 1``, ``device = "cpu"`` and ``mps = "off"``. ``directory``
    holds the config, the log and the socket; without one a private temporary directory
    is made (named ``prefix...``) and removed by ``close``. ``env`` is added to this
    process's environment, ``pythonpath`` put after the repository root, ``args`` after
    ``--config FILE``. On failure everything started is stopped and ``StartFailed`` raised.
    """
    owns = directory is None
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        directory.mkdir(parents=True, exist_ok=True)
    config = {"address": f"ipc://{directory}/coordinator.sock", "workers": 1, "device": "cpu", "mps": "off",
              **(settings or {})}
    address = str(config["address"])
    if address.startswith("ipc://") and len(address[len("ipc://"):].encode()) > IPC_PATH_MAX:
        raise ValueError(f"ipc:// path longer than {IPC_PATH_MAX} bytes: {address}; use a shorter directory")
    config_path = write_config(directory / config_name, config, groups)
    log_path = directory / "coordinator.log"
    child_env = {**os.environ, **(env or {})}
    paths = [str(ROOT), *map(str, pythonpath), *filter(None, child_env.get("PYTHONPATH", "").split(os.pathsep))]
    child_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "run", "--config", str(config_path), *args],
            cwd=ROOT, env=child_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group; a Ctrl-C meant for the caller does not reach it
        )
    # A coordinator bound to every interface is reached through loopback.
    address = address.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
    cohort = Cohort(process, address, directory, config_path, log_path,
                    child_env.get("TMPDIR") or tempfile.gettempdir(), owns)
    try:
        cohort.info = wait_until_up(address, process, ready_timeout_s)
    except BaseException as exc:
        cohort.stop()
        tail = cohort.log_tail(4000)  # before close() removes a directory of its own
        cohort.close()
        if isinstance(exc, StartFailed):
            raise StartFailed(exc.reason, tail) from None
        raise
    cohort.see(cohort.info)
    return cohort
