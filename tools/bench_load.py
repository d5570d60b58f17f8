#!/usr/bin/env python
"""The load curve: what one job costs as more jobs are kept in flight, per plan and as chosen.

    python tools/bench_load.py [--quick] [--out FILE.json]      # also: tools/bench.py --workload load_curve

Three groups (a batch-norm CNN, small MLPs, the tiny transformer), inference (``infer``)
and training (``train_step``), each model in turn, kept 1, 8, 32 and 128 jobs deep. A job's
cost is the wall time per finished job at that depth. Each plan runs on a coordinator
of its own (``batching.plan`` pinned: ``one_by_one``, ``concat``, ``vmap``) and once
measured and chosen by the workers (``auto``, the default). What cohort promises: with
``auto``, a job under load never costs more than 1.2x a job alone, and where fusion pays
load makes jobs cheaper.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools.bench_control import pipelined  # noqa: E402

PLANS = ("auto", "one_by_one", "concat", "vmap")
DEPTHS = (1, 8, 32, 128)
QUICK_DEPTHS = (1, 32)
GOAL_UNDER_LOAD = 1.2  # auto: per-job cost at any depth / alone, at most
GOAL_WHERE_FUSION_PAYS = 0.8  # auto on the MLPs at the deepest depth / alone, at most


@dataclass(frozen=True)
class LoadGroup:
    name: str
    factory: str
    kwargs: dict[str, Any]
    count: int
    batch: int
    sample: tuple[int, ...]
    dtype: str
    classes: int
    target: tuple[int, ...] = ()

    def config(self, plan: str) -> dict[str, Any]:
        return {"name": self.name, "factory": self.factory, "kwargs": self.kwargs, "count": self.count,
                "input": {"shape": [-1, *self.sample], "dtype": self.dtype}, "loss": "cross_entropy",
                "optimizer": {"name": "sgd", "lr": 0.01}, "init": {"seed": 0}, "batching": {"plan": plan}}

    def data(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch, *self.sample)
        x = torch.randint(0, self.classes, shape, generator=g) if self.dtype == "int64" else torch.randn(shape, generator=g)
        return x, torch.randint(0, self.classes, (self.batch, *self.target), generator=g)


GROUPS = (
    LoadGroup("bn_cnn", "examples.models:bn_cnn", {}, 8, 16, (3, 32, 32), "float32", 10),
    LoadGroup("mlp", "examples.models:mlp", {"d_in": 64, "hidden": 128, "d_out": 10}, 32, 64, (64,), "float32", 10),
    LoadGroup("transformer", "examples.models:tiny_transformer",
              {"vocab": 128, "d_model": 64, "heads": 4, "layers": 2, "seq_len": 32}, 8, 16, (32,), "int64", 128, (32,)),
)


def measure(client: Any, group: LoadGroup, op: str, depth: int, seconds: float) -> float:
    """Seconds per finished job with ``depth`` jobs of ``op`` in flight, models taken in turn."""
    data = [group.data(k) for k in range(group.count)]
    turn = iter(range(1 << 62))

    def submit() -> Any:
        k = next(turn) % group.count
        x, t = data[k]
        return client.submit(op, f"{group.name}/{k}", x, t if op == "train_step" else None)

    for _ in range(2 * group.count):  # every model once or twice: first calls pay one-off costs (autograd's start)
        submit().result()
    pipelined(submit, 1 << 30, depth, seconds / 2)  # warm-up: the workers learn their plans here
    jobs, took = pipelined(submit, 1 << 30, depth, seconds)
    return took / jobs


def run_load_curve(quick: bool = False, device: str = "cpu", progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every plan, group, op and depth; per-job milliseconds, ratios to a job alone, and what ``auto`` chose."""
    from scheduler import Client
    from tools.harness import start

    depths = QUICK_DEPTHS if quick else DEPTHS
    groups = GROUPS[1:2] if quick else GROUPS
    plans = ("auto", "one_by_one") if quick else PLANS
    seconds = 0.4 if quick else 2.0
    curves: dict[str, Any] = {}
    chosen: list[dict[str, Any]] = []
    for plan in plans:
        with start([g.config(plan) for g in groups], {"workers": 2, "device": device, "max_queued_per_model": 4096},
                   prefix="cohort-load-") as running, Client(running.address, timeout=120) as client:
            for group in groups:
                for op in ("infer", "train_step"):
                    per_job = {}
                    for depth in depths:
                        per_job[depth] = measure(client, group, op, depth, seconds)
                        progress(f"[load] {plan:>10} {group.name:>11} {op:>10} depth {depth:>3}: "
                                 f"{per_job[depth] * 1e3:8.3f} ms/job")
                    alone = per_job[depths[0]]
                    curves.setdefault(f"{group.name} {op}", {})[plan] = {
                        "per_job_ms": {str(d): round(v * 1e3, 4) for d, v in per_job.items()},
                        "vs_alone": {str(d): round(v / alone, 3) for d, v in per_job.items()}}
            if plan == "auto":
                chosen = [{"worker": w["id"], **p} for w in client.stats()["workers"] for p in w.get("plans", [])]
    return {"depths": list(depths), "plans": list(plans), "seconds_per_point": seconds,
            "groups": [{"name": g.name, "factory": g.factory, "count": g.count, "batch": g.batch} for g in groups],
            "curves": curves, "auto_chose": chosen, "goals": goals(curves, depths)}


def goals(curves: dict[str, Any], depths: tuple[int, ...]) -> dict[str, Any]:
    """The promises, checked on what was measured."""
    auto = {name: by_plan["auto"]["vs_alone"] for name, by_plan in curves.items() if "auto" in by_plan}
    worst = max((ratio for ratios in auto.values() for ratio in ratios.values()), default=None)
    deepest = str(depths[-1])
    mlp = [ratios[deepest] for name, ratios in auto.items() if name.startswith("mlp")]
    return {"auto_worst_vs_alone": worst, "under_load_met": worst is not None and worst <= GOAL_UNDER_LOAD,
            "mlp_deepest_vs_alone": mlp, "fusion_pays_met": bool(mlp) and all(r <= GOAL_WHERE_FUSION_PAYS for r in mlp)}


# ---------------------------------------------------------------------- report


def render_load_curve(record: dict[str, Any]) -> list[str]:
    """Markdown: per-job ms at each depth for every plan, and the ratio to alone for ``auto``."""
    depths = [str(d) for d in record["depths"]]
    lines = ["## Load curve: per-job cost as jobs in flight grow", "",
             "Milliseconds of wall time per finished job, models taken in turn, kept *N* deep; `auto` is the plan the "
             "workers choose by measuring (the default), the others are pinned with `batching.plan`; "
             "(× alone) is auto's cost over its cost at depth 1.", "",
             "| Group, op | Plan | " + " | ".join(f"N = {d}" for d in depths) + " |",
             "|---|---|" + "---:|" * len(depths)]
    for name, by_plan in record["curves"].items():
        for plan, curve in by_plan.items():
            cells = []
            for d in depths:
                cell = f"{curve['per_job_ms'][d]:.3f}"
                if plan == "auto":
                    cell += f" ({curve['vs_alone'][d]:.2f}×)"
                cells.append(cell)
            lines.append(f"| {name} | {plan} | " + " | ".join(cells) + " |")
    g = record["goals"]
    lines += ["", f"- auto, worst per-job cost under load over a job alone: {g['auto_worst_vs_alone']:.2f}× "
              f"(goal ≤ {GOAL_UNDER_LOAD}×: {'met' if g['under_load_met'] else 'not met'}).",
              f"- auto, MLPs at N = {depths[-1]} over alone: "
              + ", ".join(f"{r:.2f}×" for r in g["mlp_deepest_vs_alone"])
              + f" (goal ≤ {GOAL_WHERE_FUSION_PAYS}×: {'met' if g['fusion_pays_met'] else 'not met'})."]
    if record.get("auto_chose"):
        lines += ["", "What `auto` chose (jobs at once -> plan), per worker:", ""]
        for p in record["auto_chose"]:
            in_use = ", ".join(f"{n}: {label}" for n, label in p["in_use"].items())
            lines.append(f"- worker {p['worker']}, {p['group']} {p['op']} ({p['inputs']}): {in_use}")
    return lines


def plot_load_curve(axes: list[Any], record: dict[str, Any]) -> None:
    """One panel per group and op: per-job ms against depth, a line per plan (auto drawn thick)."""
    for axis, (name, by_plan) in zip(axes, record["curves"].items()):
        for plan, curve in by_plan.items():
            depths = [int(d) for d in curve["per_job_ms"]]
            axis.plot(depths, list(curve["per_job_ms"].values()), marker="o", label=plan,
                      linewidth=3 if plan == "auto" else 1)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("jobs in flight")
        axis.set_ylabel("ms per job (log)")
        axis.set_title(name, fontsize=9)
        axis.legend(fontsize=7)


def write_plot(record: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"status": "skipped", "reason": f"matplotlib is not installed ({exc}); pip install 'cohort[bench]'"}
    n = len(record["curves"])
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    figure, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    plot_load_curve(flat, record)
    for axis in flat[n:]:
        axis.set_visible(False)
    figure.suptitle("cohort: per-job cost against jobs in flight")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return {"status": "ok", "path": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_load.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the MLPs only, depths 1 and 32, two plans")
    parser.add_argument("--out", help="JSON file to write (with .md and .png beside it)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    began = time.monotonic()
    record = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "command": " ".join(["python", "tools/bench_load.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": device,
              **run_load_curve(args.quick, device, lambda line: print(line, file=sys.stderr, flush=True))}
    record["duration_s"] = round(time.monotonic() - began, 1)
    markdown = "\n".join(render_load_curve(record)) + "\n"
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record["plot"] = write_plot(record, out.with_suffix(".png"))
        out.write_text(json.dumps(record, indent=2) + "\n")
        out.with_suffix(".md").write_text(f"# Load curve, {record['date']}\n\nProduced by `{record['command']}`.\n\n"
                                          + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
