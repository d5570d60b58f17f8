#!/usr/bin/env python
"""Compiled fused calls: how long until they serve, cold and warm, and what they give in steady state.

    python tools/bench_compile.py [--device cpu|cuda] [--mode default] [--workers 2] [--out FILE.json]

One run, one machine, a fresh cache directory:

1. **cold**: a coordinator starts on an empty compile cache; seconds from its start to the
   first compiled calls answered (an ensemble, a joined stacked inference, a shared-batch
   training round, an evaluation, at the group's call shapes), and the compile time the
   workers report. With W workers the shapes are compiled once, not W times (reported).
2. **replacement**: a worker is killed (SIGKILL); seconds from the kill, and from its
   replacement being ready, to those calls answered again.
3. **restart**: the coordinator is stopped and started again on the same cache.
4. **steady**: batch sizes drawn at random from 1..64 (padded to power-of-two buckets), compiled
   against eager, in models*samples/s, and how many shapes that took.

Writes JSON (``--out``) and prints a table. The compiler is Inductor unless
``COHORT_COMPILE_BACKEND`` says otherwise (the tests use ``aot_eager``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools.harness import start  # noqa: E402

K = 8
GROUP = {"name": "m", "factory": "examples.models:mlp", "kwargs": {"d_in": 64, "hidden": 128, "d_out": 10},
         "count": K, "input": {"shape": [-1, 64], "dtype": "float32"}, "loss": "cross_entropy",
         "optimizer": {"name": "adam", "lr": 1e-3}, "init": {"seed": 0}}


def first_calls(c: Any, batch: int = 32) -> float:
    """The calls whose shapes a group compiles; seconds until all are answered."""
    began = time.monotonic()
    x, t = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    c.ensemble("m", x)
    for f in [c.submit("infer", f"m/{k}", x) for k in range(0, K, 2)]:  # joined into a stacked call
        f.result()
    c.train_round("m", x, t)
    c.evaluate("m", x, t)
    return time.monotonic() - began


def compile_report(c: Any) -> dict[str, Any]:
    time.sleep(0.6)  # the workers' counts come with their next report
    workers = c.stats()["workers"]
    return {"loaded": sum(w["compile"]["loaded"] for w in workers),
            "compiled": sum(w["compile"]["compiled"] for w in workers),
            "compile_s": round(sum(w["compile"]["seconds"] for w in workers), 2),
            "shapes": sorted({s for w in workers for s in w["compile"]["shapes"]})}


def wait_replaced(c: Any, pid: int, timeout: float = 300.0) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        workers = c.stats()["workers"]
        if all(w["state"] == "ready" for w in workers) and pid not in [w["pid"] for w in workers]:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("the replacement worker did not come up")


def steady(c: Any, seconds: float, seed: int = 0) -> float:
    """models x samples per second over calls with random batch sizes (each bucket made first)."""
    for batch in (1, 2, 4, 8, 16, 32, 64):  # the power-of-two buckets 1..64 fall into
        c.ensemble("m", torch.randn(batch, 64))
    rng = random.Random(seed)
    done, began = 0, time.monotonic()
    while time.monotonic() - began < seconds:
        batch = rng.randint(1, 64)
        c.ensemble("m", torch.randn(batch, 64))
        done += K * batch
    return done / (time.monotonic() - began)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix="cohort-bench-compile-"))
    settings = {"workers": args.workers, "device": args.device, "compile_cache_dir": str(cache),
                "heartbeat_timeout_s": 600, "start_timeout_s": 900}
    group = {**GROUP, "batching": {"compile": args.mode, "plan": "vmap"}}  # compiled calls, not a measured choice
    report: dict[str, Any] = {"device": args.device, "mode": args.mode, "workers": args.workers, "models": K,
                              "backend": os.environ.get("COHORT_COMPILE_BACKEND", "inductor"),
                              "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    began = time.monotonic()
    with start([group], settings, ready_timeout_s=900) as cold:
        up = time.monotonic() - began
        with cold.client(timeout=900) as c:
            calls = first_calls(c)
            report["cold"] = {"ready_s": round(up, 2), "first_calls_s": round(calls, 2),
                              "start_to_served_s": round(up + calls, 2), **compile_report(c)}
            print(f"cold: ready in {up:.1f} s, first compiled calls {calls:.1f} s", flush=True)
            pid = c.stats()["workers"][0]["pid"]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            ready = wait_replaced(c, pid)
            calls = first_calls(c)
            report["replacement"] = {"kill_to_ready_s": round(ready - killed, 2), "first_calls_s": round(calls, 2),
                                     "kill_to_served_s": round(ready - killed + calls, 2), **compile_report(c)}
            print(f"replacement: ready {ready - killed:.1f} s after the kill, first calls {calls:.2f} s", flush=True)
            report["steady"] = {"compiled_models_samples_per_s": round(steady(c, args.seconds)),
                                "shapes_after": len(compile_report(c)["shapes"])}
    began = time.monotonic()
    with start([group], settings, ready_timeout_s=900) as again, again.client(timeout=900) as c:
        up = time.monotonic() - began
        calls = first_calls(c)
        report["restart"] = {"ready_s": round(up, 2), "first_calls_s": round(calls, 2),
                             "start_to_served_s": round(up + calls, 2), **compile_report(c)}
        print(f"restart: ready in {up:.1f} s, first compiled calls {calls:.2f} s", flush=True)
    with start([{**GROUP, "batching": {"plan": "vmap"}}], settings) as eager, eager.client(timeout=300) as c:
        first_calls(c)
        report["steady"]["eager_models_samples_per_s"] = round(steady(c, args.seconds))
    cold_compile = report["cold"]["first_calls_s"]
    report["ratios"] = {"replacement_first_calls_vs_cold": round(report["replacement"]["first_calls_s"] / cold_compile, 4),
                        "restart_first_calls_vs_cold": round(report["restart"]["first_calls_s"] / cold_compile, 4),
                        "replacement_kill_to_served_vs_cold_start_to_served":
                            round(report["replacement"]["kill_to_served_s"] / report["cold"]["start_to_served_s"], 4)}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_compile.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--mode", default="default", help="torch.compile mode (batching.compile)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each steady-state measurement")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
