"""A tour of cohort against the demo coordinator (`make run` in another terminal).

    python examples/demo_client.py [--address ADDR] [--steps N]

Runs inference, training steps, an ensemble and training rounds on the demo models,
with progress, and prints results and throughput.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from scheduler import Client, CohortError, default_address


def progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=default_address())
    parser.add_argument("--steps", type=int, default=50, help="training steps per model")
    args = parser.parse_args()
    console = Console(stderr=False)
    try:
        with Client(args.address, timeout=60) as c:
            return tour(c, console, args.steps)
    except CohortError as exc:
        console.print(f"[red]cohort: {type(exc).__name__}: {exc}[/red]")
        console.print(f"Is the coordinator running at {args.address}? Start it with `make run`.")
        return 1


def tour(c: Client, console: Console, steps: int) -> int:
    models = c.models(timeout=5)
    groups = sorted({m.group for m in models})
    console.print(f"[bold]{len(models)} models[/bold] in groups {', '.join(groups)} on "
                  f"{len({m.worker for m in models})} workers, device {models[0].device}")

    # 1. Inference: one model, then many models concurrently through futures.
    x = torch.randn(64, 64)
    y = c.infer("mlp/3", x)
    console.print(f"infer mlp/3: output {tuple(y.shape)}")
    t0 = time.perf_counter()
    n = 0
    with progress(console) as bar:
        task = bar.add_task("inference over mlp/0..7", total=800)
        futures = [c.submit("infer", f"mlp/{i % 8}", x) for i in range(800)]
        for f in futures:
            f.result()
            n += 1
            bar.advance(task)
    rate = n * 64 / (time.perf_counter() - t0)
    console.print(f"  {n} infer jobs, [green]{rate:,.0f} samples/s[/green]")

    # 2. Training steps: each MLP learns a fixed random labelling with its own learning rate.
    g = torch.Generator().manual_seed(0)
    data = torch.randn(256, 64, generator=g)
    labels = torch.randint(0, 10, (256,), generator=g)
    losses: dict[int, list[float]] = {k: [] for k in range(8)}
    t0 = time.perf_counter()
    with progress(console) as bar:
        task = bar.add_task("train_step on mlp/0..7", total=steps * 8)
        for _ in range(steps):
            rows = torch.randint(0, 256, (64,), generator=g)
            futures = {k: c.submit("train_step", f"mlp/{k}", data[rows], labels[rows]) for k in range(8)}
            for k, f in futures.items():
                losses[k].append(f.result())
                bar.advance(task)
    elapsed = time.perf_counter() - t0
    table = Table(title=f"train_step: {steps} steps x 8 models in {elapsed:.1f} s "
                        f"({steps * 8 * 64 / elapsed:,.0f} samples/s)")
    for col in ("model", "lr", "first loss", "last loss", "accuracy"):
        table.add_column(col)
    lrs = [0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005]
    ensemble = c.ensemble("mlp", data)
    for k in range(8):
        acc = (ensemble[k].argmax(-1) == labels).float().mean().item()
        table.add_row(f"mlp/{k}", str(lrs[k]), f"{losses[k][0]:.3f}", f"{losses[k][-1]:.3f}", f"{acc:.1%}")
    console.print(table)

    # 3. Ensemble: every model on the same batch; the averaged prediction.
    vote = ensemble.softmax(-1).mean(0).argmax(-1)
    console.print(f"ensemble mlp: outputs {tuple(ensemble.shape)}, averaged accuracy "
                  f"{(vote == labels).float().mean().item():.1%}")

    # 4. Training rounds: one step for every CNN at once, inputs stacked [K, B, ...].
    k = sum(1 for m in models if m.group == "cnn")
    t0 = time.perf_counter()
    with progress(console) as bar:
        task = bar.add_task("train_round on cnn", total=20)
        for _ in range(20):
            xs = torch.randn(k, 32, 3, 32, 32)
            ts = torch.randint(0, 10, (k, 32))
            round_losses = c.train_round("cnn", xs, ts)
            bar.advance(task)
    console.print(f"train_round cnn: {k} models, last losses {[round(v, 3) for v in round_losses]}, "
                  f"{20 * k * 32 / (time.perf_counter() - t0):,.0f} samples/s")

    # 5. The tiny language models, a barrier, and the coordinator's figures.
    tokens = torch.randint(0, 128, (8, 32))
    console.print(f"infer lm/0: logits {tuple(c.infer('lm/0', tokens).shape)}")
    c.barrier()
    stats = c.stats()
    console.print(f"stats: {stats['jobs']['completed']} jobs done, {stats['jobs_per_s']:.0f} jobs/s, "
                  f"latency p50 {stats['latency_ms']['p50']:.2f} ms, p99 {stats['latency_ms']['p99']:.2f} ms, "
                  f"MPS {stats['mps']['mode']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
