#!/usr/bin/env python
"""The per-call path against its floors, side by side in one run (issue 15's figures).

    python tools/bench_path.py [--out FILE.json] [--seconds S]

1. **tiny jobs**: the p50 round trip of a tiny ``infer`` through cohort (a local client, over
   the coordinator's Unix socket, and the same call over ZeroMQ, as a client on another host
   makes it) against a raw two-hop ZeroMQ echo (client -> broker -> echo worker) and against
   the same three processes in Python doing nothing but forward over ZeroMQ,
   and pipelined tiny jobs/s (64 in flight, with ``Client.map`` and with ``submit``) against
   ``ProcessPoolExecutor`` running a no-op (64 in flight);
2. **CPU per call**: user+system CPU of the client, the coordinator and the worker per tiny
   job, sequential and pipelined (what each process spends, whatever the machine's load);
3. **calls in flight**: 32 MLPs (64-128-10), batch 64, ensembles kept 4 deep with ``Client.map``,
   against the raw in-process ``torch.func.vmap`` of the same models;
4. **bulk tensors**: a local client's 16 MB input and 16 MB result through shared memory
   (an ordinary input tensor, and one filled in the client's shared memory with
   ``Client.shared``), in the messages over the Unix socket, and over ZeroMQ (a remote
   client), against a plain memcpy of the same bytes
   (libc, one thread) and against torch's ``copy_`` (its intra-op threads), timed in turns; the
   ``*_path_over_*`` ratios leave out the model's own pass over the data (the same model run in
   this process, timed in the same turns), so they weigh the moving of the bytes alone.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from examples.models import scale  # noqa: E402
from scheduler import Client  # noqa: E402
from tools.bench_control import (  # noqa: E402
    EchoClient,
    echo_servers,
    mapped,
    measure_pool,
    pipelined,
    round_trips,
)
from tools.bench_relay import relay_round_trips, unix_relay_round_trips  # noqa: E402
from tools.bench_workloads import ControlPlane  # noqa: E402
from tools.harness import start  # noqa: E402

TINY = {"name": "cp", "factory": "examples.models:mlp", "kwargs": {"d_in": 16, "hidden": 16, "d_out": 4, "depth": 1},
        "count": 4, "input": {"shape": [-1, 16], "dtype": "float32"}, "loss": "mse",
        "optimizer": {"name": "sgd", "lr": 0.01}, "init": {"seed": 0}}
MLPS = {"name": "mlp", "factory": "examples.models:mlp", "kwargs": {"d_in": 64, "hidden": 128, "d_out": 10},
        "count": 32, "input": {"shape": [-1, 64], "dtype": "float32"}, "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.01}, "init": {"seed": 0}}
SCALE = {"name": "bulk", "factory": "examples.models:scale", "kwargs": {"d": 1024}, "count": 1,
         "input": {"shape": [-1, 1024], "dtype": "float32"}, "loss": "mse", "optimizer": {"name": "sgd", "lr": 0.01}}


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def p50_ms(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2] * 1000, 4)


def tiny_jobs(seconds: float) -> dict[str, Any]:
    cp = ControlPlane(name="path", round_trips=2000, pipelined=20000, warmup=200, window=64, budget_s=seconds)
    x = torch.randn(1, 16)
    out: dict[str, Any] = {}
    with start([TINY], {"workers": 1}) as running, Client(running.address, timeout=60) as c:
        c.infer("cp/0", x)
        me, coord = psutil.Process(), psutil.Process(running.process.pid)
        worker = psutil.Process(c.stats()["workers"][0]["pid"])
        before = [cpu_s(p) for p in (me, coord, worker)]
        latencies = round_trips(lambda: c.infer("cp/0", x), cp.round_trips, cp.warmup, cp.budget_s)
        after = [cpu_s(p) for p in (me, coord, worker)]
        calls = len(latencies) + cp.warmup
        out["cohort_p50_ms"] = p50_ms(latencies)
        out["cpu_us_per_call_sequential"] = {name: round((a - b) / calls * 1e6, 1) for name, a, b in
                                             zip(("client", "coordinator", "worker"), after, before)}
        before = [cpu_s(p) for p in (me, coord, worker)]
        jobs, took = pipelined(lambda: c.submit("infer", "cp/0", x), cp.pipelined, cp.window, cp.budget_s)
        after = [cpu_s(p) for p in (me, coord, worker)]
        out["cohort_submit_jobs_s"] = round(jobs / took)
        out["cpu_us_per_call_submit"] = {name: round((a - b) / jobs * 1e6, 1) for name, a, b in
                                         zip(("client", "coordinator", "worker"), after, before)}
        before = [cpu_s(p) for p in (me, coord, worker)]
        jobs, took = mapped(c, itertools.repeat("cp/0"), x, cp)
        after = [cpu_s(p) for p in (me, coord, worker)]
        out["cohort_jobs_s"] = round(jobs / took)  # Client.map: the way to keep calls in flight
        out["cpu_us_per_call_pipelined"] = {name: round((a - b) / jobs * 1e6, 1) for name, a, b in
                                            zip(("client", "coordinator", "worker"), after, before)}
        with Client(running.address, timeout=60, local_link=False) as over_zeromq:  # as a client on another host
            over_zeromq.infer("cp/0", x)
            latencies = round_trips(lambda: over_zeromq.infer("cp/0", x), cp.round_trips, cp.warmup, cp.budget_s)
            out["cohort_zeromq_p50_ms"] = p50_ms(latencies)
    with echo_servers() as address:
        echo = EchoClient(address, bytes(cp.payload_bytes))
        try:
            echo.wait_ready()
            out["echo_p50_ms"] = p50_ms(round_trips(echo.call, cp.round_trips, cp.warmup, cp.budget_s))
        finally:
            echo.close()
    out["python_relay_p50_ms"] = p50_ms(relay_round_trips(cp.round_trips, cp.warmup, cp.budget_s))
    out["python_unix_relay_p50_ms"] = p50_ms(unix_relay_round_trips(cp.round_trips, cp.warmup, cp.budget_s))
    pool = measure_pool(cp, 1)
    out["pool_jobs_s"] = round(pool["jobs_s"])
    out["p50_over_echo"] = round(out["cohort_p50_ms"] / out["echo_p50_ms"], 2)
    out["zeromq_p50_over_echo"] = round(out["cohort_zeromq_p50_ms"] / out["echo_p50_ms"], 2)
    out["python_relay_over_echo"] = round(out["python_relay_p50_ms"] / out["echo_p50_ms"], 2)
    out["python_unix_relay_over_echo"] = round(out["python_unix_relay_p50_ms"] / out["echo_p50_ms"], 2)
    out["jobs_s_over_pool"] = round(out["cohort_jobs_s"] / out["pool_jobs_s"], 2)
    out["submit_jobs_s_over_pool"] = round(out["cohort_submit_jobs_s"] / out["pool_jobs_s"], 2)
    return out


def calls_in_flight(seconds: float) -> dict[str, Any]:
    from torch.func import functional_call, stack_module_state, vmap

    from examples.models import mlp

    x = torch.randn(64, 64)
    models = []
    for k in range(32):
        torch.manual_seed(k)
        models.append(mlp(64, 128, 10))
    params, buffers = stack_module_state(models)
    base = mlp(64, 128, 10).to("meta")

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xx: torch.Tensor) -> torch.Tensor:
        return functional_call(base, {**p, **b}, (xx,))

    fused = vmap(one, in_dims=(0, 0, None))
    # The worker computes with (cores - 1) // workers intra-op threads (one here): so does the reference.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (psutil.cpu_count() or 1) - 1))
    with torch.no_grad():
        for _ in range(20):
            fused(params, buffers, x)
        began, calls = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            fused(params, buffers, x)
            calls += 1
    raw = calls / (time.perf_counter() - began)
    torch.set_num_threads(threads)
    with start([MLPS], {"workers": 1}) as running, Client(running.address, timeout=60) as c:
        for _ in range(20):
            c.ensemble("mlp", x)
        began, calls = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            for _ in c.map("ensemble", "mlp", [x] * 64, depth=4):
                calls += 1
        cohort = calls / (time.perf_counter() - began)
    return {"raw_vmap_calls_s": round(raw, 1), "cohort_map_depth4_calls_s": round(cohort, 1),
            "cohort_over_raw_vmap": round(cohort / raw, 3)}


def bulk_tensors(repeats: int = 50) -> dict[str, Any]:
    """Each round trip timed between two copies of the same 16 MB, so the machine's load weighs on
    both alike: a plain memcpy (libc, one thread) and torch's ``copy_`` (its intra-op threads)."""
    x = torch.randn(4096, 1024)  # 16 MB
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    dst.copy_(x)  # its pages are in place before anything is timed

    def timed(fn: Any) -> float:
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began

    def memcpy() -> None:
        ctypes.memmove(dst.data_ptr(), x.data_ptr(), nbytes)

    model = scale(**SCALE["kwargs"]).requires_grad_(False)  # the worker's model, run here for its own time

    out: dict[str, Any] = {"bytes_each_way": nbytes, "torch_threads": torch.get_num_threads()}
    copies: dict[str, list[float]] = {"memcpy": [], "torch_copy": []}
    passes: list[float] = []
    with start([SCALE], {"workers": 1}) as running:
        # A local client's ordinary tensor (copied once into shared memory), one it filled in its shared
        # memory (``Client.shared``: no copy on the way in), the tensors in the messages over the Unix
        # socket, and over ZeroMQ (as a client on another host). The result comes back as a tensor over
        # the worker's shared memory: the worker copies it there once.
        for key, shm, local_link in (("shared_memory", True, True), ("shared_input", True, True),
                                     ("unix_socket", False, True), ("sockets", False, False)):
            with Client(running.address, timeout=120, shm=shm, local_link=local_link) as c:
                inputs = x
                if key == "shared_input":
                    inputs = c.shared(x.shape)
                    inputs.copy_(x)
                for _ in range(3):
                    if not torch.equal(c.infer("bulk/0", inputs), model(x)):
                        raise RuntimeError(f"bulk tensors ({key}): cohort's result differs from the model's own")
                calls = []
                for _ in range(repeats):
                    copies["memcpy"].append(timed(memcpy))
                    calls.append(timed(lambda c=c, inputs=inputs: c.infer("bulk/0", inputs)))
                    copies["torch_copy"].append(timed(lambda: dst.copy_(x)))
                    passes.append(timed(lambda: model(x)))
            took = sum(calls) / len(calls)
            out[f"{key}_round_trip_ms"] = round(took * 1000, 3)
            # The round trip moves the bytes twice (in and out) and runs the model once; the path's own
            # part is the round trip less the model's pass (timed here, in turns, with the same threads).
            path = took - sum(passes[-repeats:]) / repeats
            for name, times in copies.items():
                out[f"{key}_over_{name}"] = round(2 * sum(times[-repeats:]) / repeats / took, 3)
                # None when the machine's noise made the model's pass here outlast the whole round trip
                out[f"{key}_path_over_{name}"] = round(2 * sum(times[-repeats:]) / repeats / path, 3) if path > 0 else None
    for name, times in copies.items():
        out[f"{name}_ms"] = round(sum(times) / len(times) * 1000, 3)
    out["model_pass_ms"] = round(sum(passes) / len(passes) * 1000, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_path.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed part")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                              "cpus": psutil.cpu_count(), "load_before": list(psutil.getloadavg())}
    for name, part in (("tiny_jobs", lambda: tiny_jobs(args.seconds)), ("calls_in_flight", lambda: calls_in_flight(
            args.seconds)), ("bulk_tensors", bulk_tensors)):
        print(f"{name} ...", flush=True)
        report[name] = part()
        print(json.dumps(report[name], indent=1), flush=True)
    report["load_after"] = list(psutil.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
