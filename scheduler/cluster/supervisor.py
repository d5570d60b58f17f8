"""The Ray actor that runs one coordinator, and brings it back after a death.

``cohort cluster`` creates one ``Supervisor`` per coordinator, each in its own bundle of
a placement group (one GPU, or CPUs only). Ray runs ``__init__`` again whenever the
actor's process dies, up to ``max_restarts`` times, so ``__init__`` is the whole
start-up of an incarnation:

1. ask the directory for the last incarnation's entry; if its coordinator still runs on
   this node (it got SIGTERM when its supervisor died and may still be shutting down),
   wait for it to go, then kill its process group;
2. the GPU Ray gave this actor (``CUDA_VISIBLE_DEVICES`` holds Ray's id for it, an NVML
   index or a UUID) resolved through NVML to its UUID, without touching CUDA: the
   coordinator starts with ``CUDA_VISIBLE_DEVICES=<uuid>`` and
   ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so everything it keys by device (its MPS daemon's
   pipe directory, shared memory) is that GPU's whatever index others use for it;
3. the address: the last incarnation's when it can be bound again (clients reconnect by
   themselves), else a new free port;
4. after a death, the restore point: the dead coordinator's host copies when they are on this
   node (weights, optimizer state, hyperparameters and step counts as of its last barrier:
   ``coordinator.restore_run``), else the newest snapshot file of every model (its own
   periodic snapshots, the cluster's snapshots), read as the group's ``init``;
5. write the coordinator's config, start it (``scheduler.cluster.child``: it dies with
   this actor), wait until it answers ``stats()``, register it in the directory;
6. a thread waits on the coordinator: its death ends this process, so Ray restarts it.

A coordinator that cannot start is a failure for good: ``__init__`` raises (Ray does not
restart an actor whose constructor raised) after marking it failed in the directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from core.errors import CohortError, ConfigError
from scheduler.cluster import DIRECTORY_NAME, NAMESPACE
from scheduler.cluster.layout import (
    Layout,
    coordinator_config,
    init_files,
    link_models,
    restore_files,
    toml_text,
)
from scheduler.gpu import VISIBLE, Gpu, probe_gpus, visible_gpus
from scheduler.leftovers import KEEP_HOST_COPIES_ENV, host_copies_whole, remove_stale

log = logging.getLogger("cohort.cluster")

START_TIMEOUT_S = 180.0
RETIRE_GRACE_S = 30.0  # how long a former incarnation's coordinator may take to shut down
STOP_GRACE_S = 60.0
IPC_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL  # Ctrl-C: the coordinator finishes snapshot files being written


class CoordinatorStartFailed(RuntimeError):
    """The coordinator exited or did not answer while starting; the message ends with its log."""


def new_cluster_id() -> str:
    """``<host>-<pid>-<random>`` of the ``cohort cluster`` process: its leftovers can be told dead."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def cluster_home(cluster_id: str) -> Path:
    """The cluster's directory on this node (configs, logs, links, default snapshots)."""
    return Path(tempfile.gettempdir()) / f"cohort-cluster-{cluster_id}"


def remove_stale_homes(temp_dir: Path | None = None) -> list[str]:
    """Directories of clusters whose ``cohort cluster`` ran on this host and is gone (killed with SIGKILL:
    its coordinators went with it, their files stayed); what was removed."""
    pattern = re.compile(rf"^cohort-cluster-{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    for path in (temp_dir or Path(tempfile.gettempdir())).glob("cohort-cluster-*"):
        match = pattern.match(path.name)
        if match and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


class Supervisor:
    """One coordinator's life on its node; see the module docstring."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import ray

        self.spec = spec
        self.index: int = spec["index"]
        self.stopping = False
        self._own_client: Any = None  # a client of this node's coordinator, for copies from and to other nodes
        self.home = cluster_home(spec["cluster_id"]) / f"c{self.index}"
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
        previous, self.incarnation = ray.get(self.directory.begin.remote(self.index), timeout=30)
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        retire(previous, self.node)
        self.gpu = assigned_gpu(os.environ, probe_gpus()) if spec["use_gpu"] else None
        bind, advertised = choose_address(spec["address"], previous, ray.util.get_node_ip_address(), self.home)
        self.address = advertised
        self.restored_run = host_copies_left(previous, self.node) if self.incarnation > 1 else ""
        self.restored = self._restore_point() if self.incarnation > 1 and not self.restored_run else {}
        config_path = self.home / "cohort.toml"
        config_path.write_text(toml_text(self._config(bind)), encoding="utf-8")
        self.log_path = self.home / "coordinator.log"
        self.child = start_child(config_path, self.log_path, self._environment(), spec.get("cwd"),
                                 spec.get("log_level", "INFO"), self.incarnation)
        entry = {"state": "starting", "address": advertised, "incarnation": self.incarnation, "node": self.node,
                 "node_ip": ray.util.get_node_ip_address(), "gpu": self.gpu.uuid if self.gpu else "",
                 "pid": self.child.pid, "pid_created": _created(self.child.pid), "actor_pid": os.getpid(),
                 "log": str(self.log_path), "restored": self.restored, "restored_run": self.restored_run, "reason": ""}
        ray.get(self.directory.register.remote(self.index, entry), timeout=30)
        try:
            self.stats = wait_until_up(advertised, self.child, self.log_path,
                                       float(spec.get("start_timeout_s", START_TIMEOUT_S)))
        except CoordinatorStartFailed as exc:
            ray.get(self.directory.register.remote(self.index, {"state": "failed", "reason": str(exc)[-2000:]}),
                    timeout=30)
            self.stopping = True
            stop_child(self.child, 10.0)
            raise
        workers = [w.get("pid") for w in self.stats.get("workers", [])]
        ray.get(self.directory.register.remote(self.index, {"state": "up", "run_id": self.stats.get("run_id", ""),
                                                            "workers": workers, "device": self.stats.get("device")}),
                timeout=30)
        threading.Thread(target=self._watch, name="cohort-coordinator-watch", daemon=True).start()

    # ------------------------------------------------------------------ start-up

    def _config(self, bind: str) -> dict[str, Any]:
        config = block_config(self.spec, self.index, bind, self.gpu, self.restored, self.home)
        if self.restored_run:
            config["coordinator"]["restore_run"] = self.restored_run
        return config

    def _own_snapshots(self) -> str:
        return own_snapshots(self.spec, self.index, self.home)

    def _restore_point(self) -> dict[str, dict[int, str]]:
        """Per group of this block: the newest snapshot file of each model, when every model has one."""
        import ray

        table = ray.get(self.directory.table.remote(), timeout=30)
        layout = Layout.from_dict(self.spec["layout"])
        own = self._own_snapshots() if self.spec.get("snapshot_interval_s", 0) > 0 else ""
        chosen = {}
        for group, (start, count) in layout.blocks_of(self.index).items():
            files = restore_files(group, start, count, own, table.get("snapshots", []), table.get("started", 0.0))
            if files is not None:
                chosen[group] = files
        return chosen

    def _environment(self) -> dict[str, str]:
        import scheduler

        root = str(Path(scheduler.__file__).resolve().parents[1])  # the cohort this actor runs, for its child
        return child_environment(dict(os.environ), self.spec, self.gpu, root)

    # ------------------------------------------------------------------ life

    def _watch(self) -> None:
        """The coordinator died (not asked to stop): end this process, so Ray restarts the actor."""
        code = self.child.wait()
        if not self.stopping:
            log.error("coordinator %d exited with code %s; the supervisor exits so that Ray restarts it", self.index,
                      code)
            # A coordinator killed hard leaves its run directory and shared memory; with no
            # restarts left no new coordinator on this node would remove them at its start. Its
            # host copies stay for the next incarnation, which restores from them and removes them.
            restarts = int(self.spec.get("max_restarts", 0))
            run_id = self.stats.get("run_id", "")
            keep = run_id if restarts < 0 or self.incarnation <= restarts else ""
            # Only this coordinator's run: another one's on this node may be waiting for its restart.
            for removed in remove_stale(run=run_id, keep=keep) if run_id else []:
                log.info("coordinator %d: removed %s", self.index, removed)
            os._exit(1)  # ray.actor.exit_actor() would be a clean exit, which Ray does not restart

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "address": self.address, "incarnation": self.incarnation, "pid": self.child.pid,
                "actor_pid": os.getpid(), "gpu": self.gpu.uuid if self.gpu else "", "log": str(self.log_path),
                "restored": self.restored, "restored_run": self.restored_run, "node": self.node}

    def stop(self, remove_files: bool = True) -> dict[str, Any]:
        """Stop the coordinator as Ctrl-C does (SIGINT, then SIGKILL of its group after a grace);
        remove this coordinator's files on the node (not snapshots in a directory the user chose)."""
        self.stopping = True
        if self._own_client is not None:
            self._own_client.close()
        code = stop_child(self.child, STOP_GRACE_S)
        if remove_files:
            shutil.rmtree(self.home, ignore_errors=True)
        return {"index": self.index, "exit_code": code}

    def publish_snapshot(self, staging: str, final: str) -> int:
        """Move a snapshot this coordinator wrote to ``staging`` (its own indices) to ``final`` under the
        cluster's indices; the number of files moved."""
        layout = Layout.from_dict(self.spec["layout"])
        moved = 0
        for group, (start, _) in layout.blocks_of(self.index).items():
            source = Path(staging) / group
            if not source.is_dir():
                continue
            (Path(final) / group).mkdir(parents=True, exist_ok=True)
            for path in source.glob("*.safetensors"):
                if path.stem.isdigit():
                    path.replace(Path(final) / group / f"{start + int(path.stem)}.safetensors")
                    moved += 1
        shutil.rmtree(staging, ignore_errors=True)
        return moved

    def read_weights(self, model: str, timeout: float) -> dict[str, Any]:
        """Model ``model`` (this coordinator's id for it): weights and optimizer state, for a copy to another node."""
        return self._client().get_weights(model, optimizer_state=True, timeout=timeout)

    def write_weights(self, model: str, weights: dict[str, Any], timeout: float) -> None:
        """Set model ``model`` (this coordinator's id) from another node's ``read_weights``."""
        self._client().set_weights(model, weights, optimizer_state=True, timeout=timeout)

    def _client(self) -> Any:
        """A client of this node's coordinator, made on first use (it reconnects by itself after a restart)."""
        from scheduler.client import Client

        if self._own_client is None:
            self._own_client = Client(self.address, timeout=60)
        return self._own_client

    def log_tail(self, chars: int = 4000) -> str:
        return _tail(self.log_path, chars)

    def gpu_sample(self) -> dict[str, Any] | None:
        """This coordinator's GPU through NVML (utilization, memory, power, temperature); None on the CPU."""
        if self.gpu is None:
            return None
        return nvml_sample(self.gpu.uuid)


# ---------------------------------------------------------------------- pieces (tested without Ray)


def host_copies_left(previous: dict[str, Any] | None, node: str) -> str:
    """The run id of the last incarnation's coordinator when it ran on this node and its host copies
    are still here, whole (it died hard, and not while writing one), else ""."""
    run_id = str((previous or {}).get("run_id", ""))
    if not run_id or (previous or {}).get("node") != node:
        return ""
    return run_id if host_copies_whole(run_id) else ""


def own_snapshots(spec: dict[str, Any], index: int, home: Path) -> str:
    """Where coordinator ``index`` writes its periodic snapshots (its own indices)."""
    root = spec.get("snapshot_dir") or str(home.parent / "snapshots")
    return os.path.join(root, f"c{index}")


def block_config(spec: dict[str, Any], index: int, bind: str, gpu: Gpu | None, restored: dict[str, dict[int, str]],
                 home: Path) -> dict[str, Any]:
    """Coordinator ``index``'s config: its blocks, its address, its device (``cuda:0``: the one GPU its
    ``CUDA_VISIBLE_DEVICES`` shows; else the CPU, never a GPU Ray did not give it), its snapshots, and
    each group's init (links to the files of its models, or to its restore point)."""
    layout = Layout.from_dict(spec["layout"])
    settings: dict[str, Any] = {"address": bind, "device": "cuda:0" if gpu is not None else "cpu"}
    if spec.get("snapshot_interval_s", 0) > 0:
        settings["snapshot_interval_s"] = float(spec["snapshot_interval_s"])
        settings["snapshot_dir"] = own_snapshots(spec, index, home)
    inits: dict[str, dict[str, Any]] = {}
    for group in spec["raw"].get("group", []):
        name = group["name"]
        block = layout.blocks_of(index).get(name)
        if block is None:
            continue
        if name in restored:
            inits[name] = link_models(home / "restore", name, restored[name])
        elif "safetensors" in group.get("init", {}):
            files = init_files(group["init"]["safetensors"], name, *block, spec.get("cwd") or os.getcwd())
            inits[name] = link_models(home / "init", name, files)
    return coordinator_config(spec["raw"], layout, index, settings, inits)


def child_environment(env: dict[str, str], spec: dict[str, Any], gpu: Gpu | None, root: str) -> dict[str, str]:
    """The coordinator's environment: this cohort (``root``) and the driver's directory importable; the GPU
    by UUID (``CUDA_DEVICE_ORDER=PCI_BUS_ID``: indices, where anything uses them, are NVML's); threads per
    worker from the bundle's CPUs unless the user set them; none of Ray's variables."""
    env = {k: v for k, v in env.items() if not k.startswith("RAY_")}  # the coordinator is no Ray process
    paths = [root, *(p for p in [spec.get("cwd")] if p), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env[KEEP_HOST_COPIES_ENV] = "1"  # a dead neighbour's host copies wait for its restart to adopt them
    if gpu is not None:
        env[VISIBLE] = gpu.uuid
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if spec.get("omp_num_threads"):
        env["OMP_NUM_THREADS"] = spec["omp_num_threads"]
    else:  # Ray set it for this actor; the coordinator's workers share the bundle's CPUs
        workers = int(spec["raw"].get("coordinator", {}).get("workers", 1))
        env["OMP_NUM_THREADS"] = str(max(1, int(spec.get("cpus", 1)) // workers))
    return env


def assigned_gpu(env: dict[str, str] | os._Environ[str], gpus: list[Gpu]) -> Gpu:
    """The one GPU Ray assigned (its id in ``CUDA_VISIBLE_DEVICES``: an NVML index or a UUID), by NVML."""
    entries = [e.strip() for e in env.get(VISIBLE, "").split(",") if e.strip()]
    if len(entries) != 1:
        raise ConfigError(f"a coordinator needs exactly one GPU from Ray, got {VISIBLE}={env.get(VISIBLE, '')!r}")
    shown = visible_gpus(gpus, {VISIBLE: entries[0]})
    if not shown:
        raise ConfigError(f"Ray assigned GPU {entries[0]!r}, which NVML does not show "
                          f"({len(gpus)} GPU(s): {', '.join(g.uuid for g in gpus) or 'none'})")
    return shown[0]


def choose_address(configured: str, previous: dict[str, Any] | None, node_ip: str, home: Path) -> tuple[str, str]:
    """``(bind, advertised)`` for a coordinator: ``ipc://`` in its home on this node; for ``tcp://HOST:PORT``
    the host configured (``0.0.0.0`` is advertised as the node's IP) and the last incarnation's port if it
    is free again, else a free one."""
    if configured.startswith("ipc://"):
        path = f"ipc://{home}/coordinator.sock"
        if len(path.encode()) - len("ipc://") > IPC_PATH_MAX:
            raise ConfigError(f"{path} is longer than a socket path may be ({IPC_PATH_MAX} bytes); set TMPDIR to a "
                              "shorter directory, or use a tcp:// address")
        return path, path
    host = configured[len("tcp://"):].rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
    bind_host = "0.0.0.0" if host == "*" else host
    shown = node_ip if bind_host in ("0.0.0.0", "::") else bind_host
    port = None
    old = (previous or {}).get("address", "")
    if old.startswith("tcp://"):
        old_port = int(old.rsplit(":", 1)[1])
        if port_free(bind_host, old_port):
            port = old_port
    if port is None:
        port = free_port(bind_host)
    return f"tcp://{bind_host}:{port}", f"tcp://{shown}:{port}"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def retire(previous: dict[str, Any] | None, node: str, grace_s: float = RETIRE_GRACE_S) -> None:
    """The last incarnation's coordinator, if it still runs on this node: wait for it to go, then kill it."""
    if not previous or previous.get("node") != node or not previous.get("pid"):
        return
    pid, created = int(previous["pid"]), previous.get("pid_created")
    try:
        process = psutil.Process(pid)
        if created is not None and abs(process.create_time() - float(created)) > 0.5:
            return  # the pid was reused
    except psutil.Error:
        return
    log.warning("coordinator pid %d of the last incarnation is still running; waiting up to %.0f s", pid, grace_s)
    try:
        process.wait(grace_s)
    except psutil.TimeoutExpired:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    except psutil.Error:
        pass


def start_child(config: Path, log_path: Path, env: dict[str, str], cwd: str | None, log_level: str,
                incarnation: int) -> subprocess.Popen[bytes]:
    """The coordinator, as ``scheduler.cluster.child`` (it dies with this process), in a session of its own."""
    workdir = cwd if cwd and os.path.isdir(cwd) else None
    with open(log_path, "ab") as out:
        out.write(f"\n==== incarnation {incarnation} at {time.strftime('%F %T')} ====\n".encode())
        out.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "scheduler.cluster.child", str(os.getpid()), "run", "--config", str(config),
             "--log-level", log_level],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_up(address: str, child: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Poll ``stats()`` until the coordinator answers; ``CoordinatorStartFailed`` if it exits or stays silent."""
    from scheduler.client import Client

    deadline = time.monotonic() + timeout_s
    with Client(address, timeout=2) as client:
        while True:
            if child.poll() is not None:
                raise CoordinatorStartFailed(f"the coordinator exited with code {child.returncode} while starting: "
                                             f"{_tail(log_path, 3000)}")
            try:
                return client.stats(timeout=1.0)
            except CohortError:
                if time.monotonic() > deadline:
                    raise CoordinatorStartFailed(f"the coordinator did not answer within {timeout_s:.0f} s: "
                                                 f"{_tail(log_path, 3000)}") from None
                time.sleep(0.1)


def stop_child(child: subprocess.Popen[bytes], grace_s: float) -> int | None:
    if child.poll() is None:
        try:
            child.send_signal(signal.SIGINT)
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            child.wait(10)
        except ProcessLookupError:
            pass
    return child.returncode


def nvml_sample(uuid: str) -> dict[str, Any]:
    """One GPU's figures by UUID; what NVML cannot read is left out."""
    try:
        import pynvml
    except ImportError as exc:
        return {"uuid": uuid, "error": f"NVML not available: {exc}"}
    out: dict[str, Any] = {"uuid": uuid}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver: say so
        return {"uuid": uuid, "error": f"NVML: {exc}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        reads = {
            "name": lambda: pynvml.nvmlDeviceGetName(handle),
            "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "memory_used": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used,
            "memory_total": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total,
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, read in reads.items():
            try:
                value = read()
                out[key] = value.decode() if isinstance(value, bytes) else value
            except Exception:  # noqa: BLE001, S112 - a figure this GPU does not give
                continue
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"NVML: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return out


def _created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return "(no log)"
