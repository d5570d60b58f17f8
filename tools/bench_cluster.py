"""What a cohort cluster costs: a per-model call through ``ClusterClient`` against ``Client``, and the rest.

    python tools/bench_cluster.py [--calls N] [--out FILE.json]          # starts its own cluster (local Ray)
    python tools/bench_cluster.py --ray-address auto --group G --input-shape 32,64   # a cluster that runs

On its own it starts ``python -m scheduler cluster --coordinators 2`` on the CPU under a
private ``RAY_TMPDIR`` (a local Ray head, as ``cohort cluster`` starts one when none runs)
and stops it at the end. It measures, interleaving the contenders in rounds so that a
loaded machine slows them alike:

- ``infer`` on one model: ``Client`` straight to the model's coordinator, against
  ``ClusterClient`` (the same socket path, plus routing), ``AsyncClient`` against
  ``AsyncClusterClient``, and ``Client`` on a plain coordinator holding the whole group;
  and the routing alone (what ``ClusterClient`` adds to a call, without I/O);
- ``ensemble`` of the whole group through ``ClusterClient`` (both coordinators at once),
  against ``Client.ensemble`` of one coordinator's block and of the plain coordinator;
- what is paid once: the cluster's start (to its ready line), ``ClusterClient()`` (joining
  Ray, reading the directory), a coordinator's restart after SIGKILL (to answering again),
  and the memory of the processes Ray adds.

Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from tools.harness import config_text  # noqa: E402

GROUPS = [{"name": "m", "factory": "examples.models:mlp", "kwargs": {"d_in": 64, "hidden": 128, "d_out": 10},
           "count": 8, "input": {"shape": [-1, 64], "dtype": "float32"}, "init": {"seed": 0}}]
SETTINGS = {"address": "tcp://127.0.0.1:5555", "workers": 1, "device": "cpu", "mps": "off"}
READY = "cohort cluster: ready:"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_us": round(pick(0.5) * 1e6, 1), "p90_us": round(pick(0.9) * 1e6, 1),
            "mean_us": round(statistics.fmean(ordered) * 1e6, 1), "calls": len(ordered)}


def timed(call: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        call()
        out.append(time.perf_counter() - began)
    return out


class OwnCluster:
    """``python -m scheduler cluster`` on a private RAY_TMPDIR; stopped by ``close``."""

    def __init__(self, directory: Path, coordinators: int) -> None:
        self.directory = directory
        self.ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        os.environ.update({"RAY_TMPDIR": self.ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
        os.environ.pop("RAY_ADDRESS", None)
        config = directory / "cluster.toml"
        config.write_text(config_text(SETTINGS, GROUPS), encoding="ascii")
        self.log = directory / "cluster.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        began = time.monotonic()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "scheduler", "cluster", "--config", str(config),
                                             "--coordinators", str(coordinators), "--snapshot-interval", "0"],
                                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        while READY not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() - began > 300:
                raise RuntimeError(f"the cluster did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        self.start_s = time.monotonic() - began

    def memory(self) -> dict[str, float]:
        """RSS in MB of what Ray adds: the Ray head's processes, the supervisors, the directory."""
        out = {"ray_head_mb": 0.0, "supervisors_mb": 0.0, "directory_mb": 0.0}
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return out
        for p in tree:
            try:
                name, rss = " ".join(p.cmdline()), p.memory_info().rss / 1e6
            except psutil.Error:
                continue
            if "ray::Supervisor" in name:
                out["supervisors_mb"] += rss
            elif "ray::DirectoryState" in name:
                out["directory_mb"] += rss
            elif "ray" in name and "scheduler" not in name and "workers" not in name:
                out["ray_head_mb"] += rss
        return {k: round(v) for k, v in out.items()}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def measure(args: argparse.Namespace, own: OwnCluster | None, single: Any) -> dict[str, Any]:
    from scheduler import AsyncClient, AsyncClusterClient, Client, ClusterClient

    began = time.monotonic()
    cluster = ClusterClient(args.ray_address)
    connect_s = time.monotonic() - began
    try:
        models = [m for m in cluster.models() if m.group == args.group]
        first = models[0]
        address = cluster.coordinators()[first.coordinator].address
        local = f"{first.group}/{first.index - min(m.index for m in models if m.coordinator == first.coordinator)}"
        block = [m for m in models if m.coordinator == first.coordinator]
        x = torch.randn(*args.input_shape)
        loop = asyncio.new_event_loop()
        direct, adirect = Client(address), AsyncClient(address)
        acluster = AsyncClusterClient(args.ray_address)
        alone = Client(single.address) if single is not None else None
        contenders: dict[str, tuple[Any, int]] = {
            "client_infer": (lambda: direct.infer(local, x), 1),
            "cluster_infer": (lambda: cluster.infer(first.id, x), 1),
            "async_client_infer": (lambda: loop.run_until_complete(adirect.infer(local, x)), 1),
            "async_cluster_infer": (lambda: loop.run_until_complete(acluster.infer(first.id, x)), 1),
            "client_ensemble_block": (lambda: direct.ensemble(first.group, x), 4),
            "cluster_ensemble": (lambda: cluster.ensemble(args.group, x), 4),
        }
        if alone is not None:
            contenders["one_coordinator_infer"] = (lambda: alone.infer(first.id, x), 1)
            contenders["one_coordinator_ensemble"] = (lambda: alone.ensemble(args.group, x), 4)
        try:
            for call, _ in contenders.values():  # warm-up: sockets connected, first calls paid
                for _ in range(20):
                    call()
            results: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(max(1, args.calls // args.round)):
                for name, (call, fewer) in contenders.items():
                    results[name] += timed(call, max(1, args.round // fewer))
        finally:
            for client in (direct, alone):
                if client is not None:
                    client.close()
            loop.run_until_complete(adirect.close())
            loop.run_until_complete(acluster.close())
            loop.close()
        report: dict[str, Any] = {name: percentiles(samples) for name, samples in results.items()}
        route = timed(lambda: cluster._route("infer", (first.id, x), {}), 20000)  # what ClusterClient adds, no I/O
        report["routing_only"] = percentiles(route)
        report["models"] = {"group": args.group, "count": len(models), "block_on_coordinator": len(block),
                            "coordinators": len(cluster.coordinators()), "input_shape": list(args.input_shape)}
        report["once"] = {"cluster_client_connect_s": round(connect_s, 3)}
        if own is not None:
            report["memory"] = own.memory()
            report["once"]["cluster_start_s"] = round(own.start_s, 2)
            report["once"]["coordinator_restart_s"] = round(restart(cluster, models[-1].id, x), 2)
        return report
    finally:
        cluster.close()


def restart(cluster: Any, model: str, x: torch.Tensor) -> float:
    """SIGKILL the coordinator of ``model``; seconds until it answers again (restarted by Ray)."""
    from scheduler import ProtocolError

    index = next(m.coordinator for m in cluster.models() if m.id == model)
    pid = cluster.stats()["coordinators"][index]["stats"]["pid"]
    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    while True:
        try:
            cluster.infer(model, x, timeout=120)
            return time.monotonic() - began
        except ProtocolError:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ray-address", default=None, help="measure a running cluster instead of starting one")
    parser.add_argument("--group", default="m")
    parser.add_argument("--calls", type=int, default=2000, help="calls per contender (default 2000)")
    parser.add_argument("--round", type=int, default=100, help="calls per contender per round (default 100)")
    parser.add_argument("--input-shape", type=lambda t: tuple(int(d) for d in t.split(",")), default=(32, 64),
                        help="one model's input, float32 (default 32,64: the started cluster's MLPs, batch 32)")
    parser.add_argument("--out", default=None, help="JSON file (default: docs/bench/<date>-cluster-cpu.json)")
    args = parser.parse_args(argv)
    own = single = None
    work = Path(tempfile.mkdtemp(prefix="cohort-bench-cluster-"))
    try:
        if args.ray_address is None:
            from scheduler.cluster.supervisor import free_port
            from tools import harness

            # As the cluster's coordinators: TCP on loopback, one thread per worker (a bundle of 1 CPU).
            single = harness.start(GROUPS, {**SETTINGS, "address": f"tcp://127.0.0.1:{free_port('127.0.0.1')}"},
                                   directory=work / "one", env={"OMP_NUM_THREADS": "1"})
            own = OwnCluster(work, 2)
            args.ray_address = "auto"
        report = measure(args, own, single)
    finally:
        if own is not None:
            own.close()
        if single is not None:
            single.close()
        shutil.rmtree(work, ignore_errors=True)
    report["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
                         "torch": torch.__version__, "ray": _version("ray"), "date": time.strftime("%F %T")}
    out = Path(args.out or ROOT / "docs" / "bench" / f"{time.strftime('%F')}-cluster-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'contender':<24}{'p50 us':>10}{'p90 us':>10}{'mean us':>10}")
    for name, r in report.items():
        if not isinstance(r, dict) or "p50_us" not in r:
            continue
        print(f"{name:<24}{r['p50_us']:>10}{r['p90_us']:>10}{r['mean_us']:>10}")
    print(json.dumps({k: report[k] for k in ("models", "once", "memory") if k in report}))
    print(f"written to {out}")
    return 0


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return ""


if __name__ == "__main__":
    sys.exit(main())
