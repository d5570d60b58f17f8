"""A learning-rate sweep: K models, one learning rate each, a cosine schedule with warm-up.

    python examples/sweep.py [--steps N] [--models K] [--seed S] [--address ADDR]

The data set is made here, in code: three interleaved spirals in the plane (a point's
class is its arm), with a train, a validation and a test split. K MLPs start from the
same weights (``reset(model, seed)``) and differ only in their learning rate, spaced
log-evenly over [1e-4, 0.3] (AdamW, gradients clipped to norm 1 per model). The group's
schedule warms each learning rate up linearly over the first tenth of the steps, then
decays it along a cosine to 0 (``schedule = { name = "cosine", ... }`` in the config).
Every step trains all K models on the same batch (``train_round(group, x, t)``: sent once).
At the end every model is evaluated on the validation split (``evaluate``), the best
learning rate is the one with the lowest validation loss, and its accuracy is taken on
the test split.

Without ``--address`` the example starts its own coordinator (two workers) on a private
ipc:// path, with the schedule's ``total_steps`` set to ``--steps``, and stops it at the
end, on Ctrl-C and on errors too. With ``--address`` it uses a running one with a group
``sweep`` (``python -m scheduler run --config examples/sweep.toml``, made for the default
500 steps); it resets the models and sets their learning rates first.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `scheduler`, `tools` and `examples` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from examples.launch import coordinator, positive, run_main  # noqa: E402
from scheduler import Client  # noqa: E402

GROUP = "sweep"
ARMS = 3
TRAIN, VALIDATION, TEST = 8192, 4096, 4096
BATCH = 128
LR_RANGE = (1e-4, 0.3)


def group(models: int, steps: int) -> dict[str, Any]:
    """The ``[[group]]`` of the config (examples/sweep.toml is this for the defaults)."""
    return {
        "name": GROUP,
        "factory": "examples.models:mlp",
        "kwargs": {"d_in": 2, "hidden": 64, "d_out": ARMS},
        "count": models,
        "input": {"shape": [-1, 2], "dtype": "float32"},
        "loss": "cross_entropy",
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "clip_grad_norm": 1.0},
        "schedule": {"name": "cosine", "total_steps": steps, "warmup_steps": steps // 10, "min_lr": 0.0},
        "init": {"seed": 0},
    }


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on ``ARMS`` noisy spiral arms of one and a half turns; the label is the arm."""
    arm = torch.randint(0, ARMS, (n,), generator=generator)
    radius = torch.rand(n, generator=generator)
    angle = radius * 3 * math.pi + arm * (2 * math.pi / ARMS)
    x = 3 * radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return x + 0.2 * radius[:, None] * torch.randn(n, 2, generator=generator), arm


def sweep_lrs(models: int) -> list[float]:
    """``models`` learning rates spaced log-evenly over ``LR_RANGE``."""
    low, high = map(math.log10, LR_RANGE)
    return [10 ** (low + (high - low) * k / max(1, models - 1)) for k in range(models)]


def train(c: Client, steps: int, data: tuple[torch.Tensor, torch.Tensor], seed: int, console: Console) -> list[float]:
    """``steps`` rounds on shared batches; the last round's K training losses."""
    x_all, y_all = data
    batches = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("training", total=steps)
        for step in range(1, steps + 1):
            rows = torch.randint(0, len(y_all), (BATCH,), generator=batches)
            losses = c.train_round(GROUP, x_all[rows], y_all[rows])  # one batch, every model
            if step % 25 == 0 or step == steps:
                finite = [v for v in losses if math.isfinite(v)]
                bar.update(task, description=f"step {step}: training loss best {min(finite, default=math.nan):.3f}")
            bar.advance(task)
    return losses


def run(args: argparse.Namespace, console: Console) -> None:
    began = time.monotonic()
    with coordinator(args.address, [group(args.models, args.steps)], console) as address, \
            Client(address, timeout=120) as c:
        models = sum(1 for m in c.models() if m.group == GROUP)
        if not models:
            raise SystemExit(f"the coordinator has no group {GROUP!r}; start one with "
                             "`python -m scheduler run --config examples/sweep.toml`")
        lrs = sweep_lrs(models)
        c.set_hparams(GROUP, lr=lrs)  # the base learning rates that the schedule scales
        for k in range(models):
            c.reset(f"{GROUP}/{k}", seed=args.seed)  # every model from the same weights; step count 0
        g = torch.Generator().manual_seed(args.seed)
        train_split, val, test = spirals(TRAIN, g), spirals(VALIDATION, g), spirals(TEST, g)
        console.print(f"{models} models, learning rates {lrs[0]:.3g} .. {lrs[-1]:.3g}, cosine schedule with "
                      f"warm-up; {args.steps} steps of batch {BATCH}")
        trained = time.monotonic()
        last = train(c, args.steps, train_split, args.seed, console)
        seconds = time.monotonic() - trained
        console.print(f"Trained {models} models for {args.steps} steps in {seconds:.1f} s "
                      f"({models * args.steps / seconds:,.0f} model-steps/s)")
        val_loss = c.evaluate(GROUP, *val)
        accuracy = (c.ensemble(GROUP, test[0]).argmax(-1) == test[1]).float().mean(-1).tolist()
        best = min(range(models), key=lambda k: val_loss[k] if math.isfinite(val_loss[k]) else math.inf)
        table = Table(title="Learning-rate sweep (accuracy on the held-out test split)")
        for column in ("model", "lr", "last training loss", "validation loss", "test accuracy"):
            table.add_column(column, justify="right")
        for k in range(models):
            table.add_row(f"{GROUP}/{k}", f"{lrs[k]:.3g}", f"{last[k]:.3f}", f"{val_loss[k]:.3f}", f"{accuracy[k]:.1%}",
                          style="bold green" if k == best else None)
        console.print(table)
        hparams = c.get_hparams(f"{GROUP}/{best}")
        console.print(f"Best learning rate: {lrs[best]:.3g} ({GROUP}/{best}): validation loss {val_loss[best]:.3f}, "
                      f"test accuracy {accuracy[best]:.1%}; its hyperparameters now: "
                      f"lr {hparams['lr']:.3g}, weight_decay {hparams['weight_decay']:.3g}, "
                      f"clip_grad_norm {hparams['clip_grad_norm']:.3g}, step {hparams['step']}")
    console.print(f"Done in {time.monotonic() - began:.1f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=500, help="training steps of every model")
    parser.add_argument("--models", type=positive, default=8, help="models in the sweep, one lr each")
    parser.add_argument("--seed", type=int, default=0, help="data, the models' common initial weights, batches")
    parser.add_argument("--address", help="a running coordinator with a group 'sweep' "
                                          "(default: start one here and stop it at the end)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda console: run(args, console))


if __name__ == "__main__":
    sys.exit(main())
