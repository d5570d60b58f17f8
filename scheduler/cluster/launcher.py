"""``cohort cluster --config FILE [--ray-address auto] [--coordinators N]``: one coordinator per GPU, on Ray.

The steps, each undone in reverse order on the way out (Ctrl-C, SIGTERM, or a failure):

1. the config is read and checked as ``cohort run`` checks it, and its groups cut into one
   block per coordinator (``layout.plan_layout``);
2. Ray: the cluster at ``--ray-address`` (``auto``: ``$RAY_ADDRESS`` or the address file of
   a running ``ray start``); when none runs, a local head started as ``ray start --head``
   does (``raylocal.LocalHead``), said so, and stopped on exit;
3. the directory (``cohort-directory``, detached, namespace ``cohort``) claimed, and the
   layout written into it;
4. a placement group of one bundle per coordinator (one GPU each, or ``--cpus-per-coordinator``
   CPUs on machines without GPUs), packed: as few nodes as possible, so a node's GPUs fill up
   before the next node's;
5. one ``Supervisor`` actor per bundle (named ``cohort-coordinator-<i>``), each starting its
   coordinator; Ray restarts a supervisor whose process dies, up to ``--max-restarts``;
6. until stopped, a line for every coordinator that restarts or fails; from step 3 on, a
   heartbeat into the directory every second (a directory whose owner went silent is a dead
   cluster's).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.definition import build_definition
from core.errors import CohortError, ConfigError
from scheduler.cluster import DIRECTORY_NAME, NAMESPACE, SUPERVISOR_NAME
from scheduler.cluster.layout import Layout, plan_layout
from scheduler.cluster.raylocal import (
    LocalHead,
    answers,
    existing_address,
    remove_session,
    session_dir,
)
from scheduler.cluster.supervisor import (
    STOP_GRACE_S,
    cluster_home,
    new_cluster_id,
    remove_stale_homes,
)
from scheduler.config import Config, parse_config

log = logging.getLogger("cohort.cluster")

PLACEMENT_TIMEOUT_S = 120.0
HEARTBEAT_S = 1.0
ALIVE_EVERY = 5  # heartbeats between checks that every supervisor still lives
RAY_CALL_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML config file (as for `cohort run`)")
    parser.add_argument("--ray-address", default="auto",
                        help="Ray cluster to join (default: auto, a running `ray start`; when none runs, a local "
                             "one is started and stopped on exit)")
    parser.add_argument("--coordinators", type=int, default=None,
                        help="coordinators to run (default: one per GPU of the Ray cluster; needed without GPUs)")
    parser.add_argument("--cpus-per-coordinator", type=float, default=1.0,
                        help="Ray CPUs each coordinator reserves (default 1; fractions allowed)")
    parser.add_argument("--snapshot-interval", type=float, default=None,
                        help="seconds between each coordinator's snapshots, its restore point after a restart "
                             "(default: coordinator.snapshot_interval_s of the config; 0: only the cluster's own "
                             "snapshots, ClusterClient.snapshot)")
    parser.add_argument("--snapshot-dir", default="",
                        help="where those snapshots go, DIR/c<index>/<group>/<index>.safetensors (default: "
                             "coordinator.snapshot_dir of the config, else a private directory on each node, removed "
                             "on exit); use a shared file system to survive the loss of a node")
    parser.add_argument("--max-restarts", type=int, default=10, help="restarts of each coordinator (default 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


@dataclass
class Cluster:
    """What ``cohort cluster`` started, to be stopped in reverse order."""

    cluster_id: str
    owner: dict[str, Any]
    head: LocalHead | None = None
    session: str | None = None
    ray_started: bool = False
    directory: Any = None
    claimed: bool = False
    placement_group: Any = None
    supervisors: list[Any] = field(default_factory=list)
    heartbeat: Heartbeat | None = None


class Heartbeat(threading.Thread):
    """Tells the directory every second that its owner lives, from the claim on (start-up included)."""

    def __init__(self, directory: Any, owner_id: str) -> None:
        super().__init__(name="cohort-cluster-heartbeat", daemon=True)
        self.directory, self.owner_id = directory, owner_id
        self.lost = False  # the table was taken over
        self.halt = threading.Event()

    def run(self) -> None:
        import ray

        while not self.halt.wait(HEARTBEAT_S):
            try:
                self.lost = not ray.get(self.directory.heartbeat.remote(self.owner_id), timeout=RAY_CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a slow beat is retried; a lost table is reported
                log.warning("heartbeat to the directory failed: %s", exc)


def say(message: str) -> None:
    print(f"cohort cluster: {message}", flush=True)


def cluster_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s cohort %(levelname)s %(message)s", stream=sys.stderr)
    # A process started in the background by a non-interactive shell ignores SIGINT: re-arm Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = Cluster(new_cluster_id(), {})
    try:
        raw, config = read_config(args.config)
        for removed in remove_stale_homes():
            log.warning("removed the directory of a cohort cluster that was killed: %s", removed)
        run(cluster, args, raw, config)
        return 0
    except KeyboardInterrupt:
        return 0
    except CohortError as exc:
        say(f"{type(exc).__name__}: {exc}")
        return 2
    except ClusterFailed as exc:
        say(str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - Ray's own errors: said in one line, then everything stopped
        log.debug("cohort cluster failed", exc_info=True)
        say(f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:2000]}")
        return 1
    finally:
        stop(cluster)


class ClusterFailed(RuntimeError):
    """Ray could not do what the cluster needs (placement, a coordinator's start)."""


def read_config(path: str) -> tuple[dict[str, Any], Config]:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(raw, path)
    for group in config.groups:  # a factory that cannot build fails here, before Ray and the coordinators
        build_definition(group)
    return raw, config


def run(cluster: Cluster, args: argparse.Namespace, raw: dict[str, Any], config: Config) -> None:
    use_gpu_requested = config.coordinator.device != "cpu"
    address = join_or_start(cluster, args, use_gpu_requested)
    import ray

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    cluster.ray_started = True
    cluster.session = session_dir() if cluster.head is not None else None
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
    count, use_gpu = coordinator_count(args.coordinators, config, ray.cluster_resources())
    layout = plan_layout(config, count)
    claim_directory(cluster, args.config, layout)
    bundles = make_placement_group(cluster, count, use_gpu, args.cpus_per_coordinator)
    interval = config.coordinator.snapshot_interval_s if args.snapshot_interval is None else args.snapshot_interval
    root = args.snapshot_dir or config.coordinator.snapshot_dir
    snapshot_root = os.path.abspath(root) if root else ""  # each coordinator writes to <root>/c<index>
    specs = [{
        "cluster_id": cluster.cluster_id, "index": i, "raw": raw, "layout": layout.as_dict(),
        "address": config.coordinator.address, "use_gpu": use_gpu, "cpus": args.cpus_per_coordinator,
        "cwd": os.getcwd(), "snapshot_dir": snapshot_root,
        "snapshot_interval_s": float(interval), "start_timeout_s": config.coordinator.start_timeout_s + 60,
        "log_level": args.log_level, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "max_restarts": args.max_restarts,
    } for i in range(count)]
    start_supervisors(cluster, specs, bundles, use_gpu, args)
    wait_until_up(cluster, layout, config.coordinator.start_timeout_s + 90)
    total = sum(g.count for g in layout.groups.values())
    say(f"ready: {count} coordinators, {total} models; clients: ClusterClient(ray_address={address!r}) "
        f"(Ctrl-C stops everything)")
    watch(cluster, layout)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def join_or_start(cluster: Cluster, args: argparse.Namespace, use_gpu: bool) -> str:
    requested = args.ray_address or "auto"
    address = existing_address(requested)
    if address is not None:
        if ":" in address and not address.startswith("ray://") and not answers(address, 3.0):
            raise ConfigError(f"no Ray cluster answers at {address} (--ray-address or $RAY_ADDRESS)")
        say(f"joining the Ray cluster at {address}")
        return address
    home = cluster_home(cluster.cluster_id)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if args.coordinators is not None:
        wanted = args.coordinators
    else:
        from scheduler.gpu import probe_gpus

        wanted = len(probe_gpus()) if use_gpu else 1
    cpus = max(float(os.cpu_count() or 1), max(1, wanted) * args.cpus_per_coordinator)
    cluster.head = LocalHead(cpus, home / "ray-head.log")
    began = time.monotonic()
    address = cluster.head.start()
    say(f"no Ray cluster running: started a local one at {address} as `ray start --head` does, in "
        f"{time.monotonic() - began:.1f} s (other processes join it with ray_address='auto'; it stops with this "
        "command)")
    return address


def coordinator_count(requested: int | None, config: Config, resources: dict[str, float]) -> tuple[int, bool]:
    """How many coordinators, and whether each takes a GPU."""
    gpus = int(resources.get("GPU", 0))
    device = config.coordinator.device
    use_gpu = device != "cpu" and gpus > 0
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"coordinator.device = {device!r}, but the Ray cluster has no GPU")
    if requested is None:
        if not use_gpu:
            raise ConfigError("the Ray cluster has no GPU (or the config asks for the CPU): say how many coordinators "
                              "to run with --coordinators N")
        return gpus, True
    if requested < 1:
        raise ConfigError(f"--coordinators must be at least 1, got {requested}")
    if use_gpu and requested > gpus:
        raise ConfigError(f"--coordinators {requested}: each coordinator takes one GPU, and the Ray cluster has "
                          f"{gpus}; set coordinator.device = 'cpu' to run them on CPUs")
    return requested, use_gpu


def claim_directory(cluster: Cluster, config_path: str, layout: Layout) -> None:
    import ray

    from scheduler.cluster.directory import STALE_AFTER_S, directory_actor

    cluster.owner = {"id": cluster.cluster_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "config": os.path.abspath(config_path), "started": time.time()}
    cluster.directory = directory_actor().options(name=DIRECTORY_NAME, namespace=NAMESPACE, lifetime="detached",
                                                  get_if_exists=True).remote()
    other = ray.get(cluster.directory.claim.remote(cluster.owner, STALE_AFTER_S), timeout=RAY_CALL_TIMEOUT_S)
    if other is not None:
        raise ConfigError(f"a cohort cluster already runs on this Ray cluster (pid {other.get('pid')} on "
                          f"{other.get('host')}, config {other.get('config')}); stop it first")
    cluster.claimed = True
    cluster.heartbeat = Heartbeat(cluster.directory, cluster.cluster_id)
    cluster.heartbeat.start()
    ray.get(cluster.directory.set_layout.remote(layout.as_dict()), timeout=RAY_CALL_TIMEOUT_S)


def make_placement_group(cluster: Cluster, count: int, use_gpu: bool, cpus: float) -> list[dict[str, float]]:
    """One bundle per coordinator, packed; waits for the resources with a deadline, saying what it waits for."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    bundles = [dict(bundle) for _ in range(count)]
    cluster.placement_group = placement_group(bundles, strategy="PACK", name=f"cohort-{cluster.cluster_id}")
    began = time.monotonic()
    wait = 2.0
    while not cluster.placement_group.wait(timeout_seconds=wait):
        waited = time.monotonic() - began
        if waited > PLACEMENT_TIMEOUT_S:
            raise ClusterFailed(f"the Ray cluster could not place {count} x {bundle} within {PLACEMENT_TIMEOUT_S:.0f} "
                                f"s; it has {ray.available_resources()} free of {ray.cluster_resources()}")
        say(f"waiting for {count} x {bundle} ({waited:.0f} s); the Ray cluster has {ray.available_resources()} free")
        wait = min(wait * 2, 20.0)
    return bundles


def start_supervisors(cluster: Cluster, specs: list[dict[str, Any]], bundles: list[dict[str, float]], use_gpu: bool,
                      args: argparse.Namespace) -> None:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from scheduler.cluster.supervisor import Supervisor

    remote = ray.remote(Supervisor)
    for spec in specs:
        i = spec["index"]
        cluster.supervisors.append(remote.options(
            name=SUPERVISOR_NAME.format(index=i), namespace=NAMESPACE, num_cpus=bundles[i]["CPU"],
            num_gpus=1 if use_gpu else 0, max_restarts=args.max_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=cluster.placement_group,
                                                                 placement_group_bundle_index=i),
        ).remote(spec))


def wait_until_up(cluster: Cluster, layout: Layout, timeout_s: float) -> None:
    """Each coordinator's line as it comes up; ``ClusterFailed`` with its log if one cannot start."""
    import ray

    began = time.monotonic()
    pending = {s.info.remote(): i for i, s in enumerate(cluster.supervisors)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, began + timeout_s - time.monotonic()))
        if not ready:
            raise ClusterFailed(f"coordinator(s) {sorted(pending.values())} did not start within {timeout_s:.0f} s")
        index = pending.pop(ready[0])
        try:
            info = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            raise ClusterFailed(f"coordinator {index} could not start: {_cause(exc)}") from None
        blocks = ", ".join(f"{g}/{start}..{start + n - 1}" for g, (start, n) in layout.blocks_of(index).items())
        where = f"GPU {info['gpu']}" if info["gpu"] else "CPU"
        say(f"coordinator {index} up at {info['address']} ({where}, node {info['node'][:8]}, pid {info['pid']}) "
            f"after {time.monotonic() - began:.1f} s: {blocks}")


def _cause(exc: BaseException) -> str:
    text = str(exc)
    marker = "CoordinatorStartFailed:"
    return text[text.index(marker):].strip() if marker in text else " ".join(text.split())[-2000:]


def watch(cluster: Cluster, layout: Layout) -> None:
    """Say when a coordinator restarts or fails; until interrupted."""
    import ray

    seen: dict[int, tuple[int, str]] = {}
    turns = 0
    while True:
        time.sleep(HEARTBEAT_S)
        if cluster.heartbeat is not None and cluster.heartbeat.lost:
            raise ClusterFailed("the directory no longer belongs to this cluster")
        turns += 1
        if turns % ALIVE_EVERY == 0:
            mark_dead_supervisors(cluster)
        table = ray.get(cluster.directory.table.remote(), timeout=RAY_CALL_TIMEOUT_S)
        for index, entry in sorted(table["coordinators"].items()):
            now = (int(entry.get("incarnation", 1)), str(entry.get("state")))
            before = seen.get(index)
            seen[index] = now
            if before is None or before == now:
                continue
            if now[1] == "up" and now[0] > before[0] or (now[1] == "up" and before[1] != "up"):
                restored = entry.get("restored") or {}
                source = (f"restored from its last host copies (weights, optimizer state, hyperparameters; run "
                          f"{entry['restored_run']})" if entry.get("restored_run")
                          else f"restored from snapshots ({', '.join(sorted(restored))})" if restored
                          else "started from its initial weights (no snapshot yet)")
                say(f"coordinator {index} restarted (incarnation {now[0]}) at {entry.get('address')}; {source}")
            elif now[1] == "failed":
                say(f"coordinator {index} failed for good: {str(entry.get('reason', ''))[-500:]}")
            elif now[1] == "starting" and now[0] > before[0]:
                say(f"coordinator {index} died; Ray is restarting it (incarnation {now[0]})")
        if table["coordinators"] and all(e.get("state") == "failed" for e in table["coordinators"].values()):
            raise ClusterFailed("every coordinator has failed")


def mark_dead_supervisors(cluster: Cluster) -> None:
    """A supervisor Ray will not restart (its restarts spent) cannot say so itself: mark it failed in the
    directory, so clients fail its models' calls at once instead of waiting for it."""
    import ray

    pings = {s.info.remote(): i for i, s in enumerate(cluster.supervisors)}
    done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=5.0)
    table = None
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError:
            index = pings[ref]
            table = table or ray.get(cluster.directory.table.remote(), timeout=RAY_CALL_TIMEOUT_S)
            if table["coordinators"].get(index, {}).get("state") != "failed":
                ray.get(cluster.directory.register.remote(index, {
                    "state": "failed", "reason": "its supervisor died and Ray will not restart it again "
                                                 "(--max-restarts spent)"}), timeout=RAY_CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001, S112 - restarting (unavailable for now): the directory says so
            continue


def stop(cluster: Cluster) -> None:
    """Undo what was started, in reverse order; a second Ctrl-C does not cut this short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if cluster.ray_started:
        import ray
        from ray.util.placement_group import remove_placement_group

        if cluster.heartbeat is not None:
            cluster.heartbeat.halt.set()
            cluster.heartbeat.join(RAY_CALL_TIMEOUT_S)
        if cluster.supervisors:
            say("stopping the coordinators")
        local = _local_coordinators(cluster)
        stops = [s.stop.remote() for s in cluster.supervisors]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_GRACE_S + 15)
        for supervisor in cluster.supervisors:
            _quietly(lambda s=supervisor: ray.kill(s, no_restart=True))
        if cluster.placement_group is not None:
            _quietly(lambda: remove_placement_group(cluster.placement_group))
        if cluster.claimed:
            _quietly(lambda: ray.kill(cluster.directory, no_restart=True))
        _wait_gone(local, 30.0)  # a coordinator whose supervisor was killed stops on its own (SIGTERM)
        _quietly(ray.shutdown)
    if cluster.head is not None:
        cluster.head.stop()
        remove_session(cluster.session)
        say("stopped the local Ray cluster")
    shutil.rmtree(cluster_home(cluster.cluster_id), ignore_errors=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _local_coordinators(cluster: Cluster) -> dict[int, float]:
    """Pids (and start times) of this cluster's coordinators on this machine, from the directory."""
    import ray

    if not cluster.claimed:
        return {}
    try:
        table = ray.get(cluster.directory.table.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - then there is nothing to wait for
        return {}
    host_ip = ray.util.get_node_ip_address()
    return {int(e["pid"]): float(e.get("pid_created") or 0.0) for e in table["coordinators"].values()
            if e.get("pid") and e.get("node_ip") == host_ip}


def _wait_gone(pids: dict[int, float], timeout_s: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    for pid, created in pids.items():
        try:
            process = psutil.Process(pid)
            if created and abs(process.create_time() - created) > 0.5:
                continue
            process.wait(max(0.1, deadline - time.monotonic()))
        except psutil.TimeoutExpired:
            _quietly(lambda p=process: os.killpg(p.pid, signal.SIGKILL))
        except psutil.Error:
            continue


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - cleanup goes on past any one failure
        log.debug("cleanup step failed: %s", exc)
