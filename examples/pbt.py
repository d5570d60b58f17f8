"""Population-based training (PBT) of small MLPs, against the same population without PBT.

    python examples/pbt.py [--rounds N] [--population K] [--interval N] [--seed S] [--address ADDR]

The data set is made here, in code: inputs drawn from a Gaussian, labelled by a fixed
random "teacher" network (4 classes); 30% of the training labels are replaced by random
ones (as real labels are noisy), the validation and test splits are clean.

Two groups of K identical MLPs start from the same weights with the same learning rates,
drawn log-uniformly from [0.01, 3] (SGD, momentum 0.9): the large ones keep their models
bouncing around on the noisy labels (with the default seed, 5 of 16 end below 70% test
accuracy). Every round both groups take one step on the same batch
(``train_round(group, x, t)``: the batch is sent once for all K models). Every
``--interval`` rounds the PBT group is evaluated on the validation split (``evaluate``);
its worst quarter takes the weights and optimizer state of a model from its best quarter
(``copy_weights``, exploit) and that model's learning rate times 0.8 or 1.25
(``set_hparams``, explore). The baseline group trains on, untouched. At the end both are
scored on the test split, which neither saw.

Without ``--address`` the example starts its own coordinator (two workers, on the GPU
if there is one) on a private ipc:// path and stops it at the end, on Ctrl-C and on
errors too. With ``--address`` it uses a running one that has the groups ``pbt`` and
``baseline`` (``python -m scheduler run --config examples/pbt.toml``); it resets their
weights and learning rates first, so every run starts from the same state.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from dataclasses import dataclass
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

PBT, BASELINE = "pbt", "baseline"
D_IN, HIDDEN, CLASSES = 8, 64, 4
TRAIN, VALIDATION, TEST = 8192, 4096, 4096
LABEL_NOISE = 0.3      # share of training labels replaced by random ones
BATCH = 64
LR_RANGE = (1e-2, 3.0)  # initial learning rates: log-uniform in this range
MOMENTUM = 0.9
PERTURB = (0.8, 1.25)  # explore: the copied learning rate times one of these


def group(name: str, population: int) -> dict[str, Any]:
    """One ``[[group]]`` of the config; both groups are this, by name (examples/pbt.toml too)."""
    return {
        "name": name,
        "factory": "examples.models:mlp",
        "kwargs": {"d_in": D_IN, "hidden": HIDDEN, "d_out": CLASSES},
        "count": population,
        "input": {"shape": [-1, D_IN], "dtype": "float32"},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": MOMENTUM},  # the run sets every lr itself
        "init": {"seed": 0},
    }


# ---------------------------------------------------------------------- data


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def dataset(seed: int) -> tuple[Split, Split, Split]:
    """Train, validation and test splits labelled by a fixed random teacher network."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(D_IN, 8, generator=g) / math.sqrt(D_IN)
    w2 = torch.randn(8, CLASSES, generator=g) / math.sqrt(8)

    def split(n: int, noise: float) -> Split:
        x = torch.randn(n, D_IN, generator=g)
        y = (torch.tanh(2 * x @ w1) @ w2).argmax(-1)
        noisy = torch.rand(n, generator=g) < noise
        return Split(x, torch.where(noisy, torch.randint(0, CLASSES, (n,), generator=g), y))

    return split(TRAIN, LABEL_NOISE), split(VALIDATION, 0.0), split(TEST, 0.0)


def initial_lrs(population: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    low, high = map(math.log, LR_RANGE)
    return [math.exp(rng.uniform(low, high)) for _ in range(population)]


# ---------------------------------------------------------------------- the population


def check_groups(c: Client, population: int | None) -> int:
    """The population size of the running groups; both must be there, equally large."""
    counts = {g: sum(1 for m in c.models() if m.group == g) for g in (PBT, BASELINE)}
    if not all(counts.values()) or counts[PBT] != counts[BASELINE]:
        raise SystemExit(f"the coordinator needs groups {PBT!r} and {BASELINE!r} of equal size, has {counts}; "
                         f"start one with `python -m scheduler run --config examples/pbt.toml`")
    if population is not None and population != counts[PBT]:
        raise SystemExit(f"--population {population}, but the coordinator's groups hold {counts[PBT]} models each")
    return counts[PBT]


def start_both(c: Client, lrs: list[float], seed: int) -> None:
    """Model k of both groups: the same fresh weights (seed + k), learning rate and momentum."""
    for name in (PBT, BASELINE):
        c.set_hparams(name, lr=lrs, momentum=MOMENTUM)
        for k in range(len(lrs)):
            c.reset(f"{name}/{k}", seed=seed + k)


# ---------------------------------------------------------------------- PBT


def ranked(losses: list[float]) -> list[int]:
    """Model indices from the lowest validation loss to the highest; a diverged model (NaN) last."""
    return sorted(range(len(losses)), key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)


def exploit_and_explore(c: Client, losses: list[float], lrs: list[float], rng: random.Random) -> int:
    """The worst quarter takes a best-quarter model's weights and optimizer state, and its
    learning rate perturbed. Returns how many models were replaced."""
    order = ranked(losses)
    quarter = max(1, len(order) // 4)
    for dst in order[-quarter:]:
        src = rng.choice(order[:quarter])
        c.copy_weights(f"{PBT}/{src}", f"{PBT}/{dst}")  # weights and optimizer state; hyperparameters stay
        lrs[dst] = lrs[src] * rng.choice(PERTURB)
    c.set_hparams(PBT, lr=lrs)  # one value per model, from each model's next step on
    return quarter


def train(c: Client, args: argparse.Namespace, data: tuple[Split, Split, Split], lrs: list[float],
          console: Console) -> int:
    """``args.rounds`` rounds of both groups on shared batches; PBT every ``args.interval`` rounds."""
    train_split, val, _ = data
    batches = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 2)
    replaced = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("training", total=args.rounds)
        for r in range(1, args.rounds + 1):
            rows = torch.randint(0, len(train_split.y), (BATCH,), generator=batches)
            x, t = train_split.x[rows], train_split.y[rows]
            steps = [c.submit("train_round", name, x, t) for name in (PBT, BASELINE)]  # both at once
            for step in steps:
                step.result()
            if r % args.interval == 0 or r == args.rounds:
                pbt_val, base_val = (c.evaluate(name, val.x, val.y) for name in (PBT, BASELINE))
                if r < args.rounds:
                    replaced += exploit_and_explore(c, pbt_val, lrs, rng)
                best = [min((v for v in losses if math.isfinite(v)), default=math.nan) for losses in (pbt_val, base_val)]
                bar.update(task, description=f"round {r}: best validation loss PBT {best[0]:.3f}, "
                                             f"baseline {best[1]:.3f}")
            bar.advance(task)
    return replaced


# ---------------------------------------------------------------------- results


@dataclass
class Scores:
    lrs: list[float]
    val_loss: list[float]
    test_acc: list[float]

    @property
    def best(self) -> int:
        """The model one would keep: the lowest validation loss."""
        return ranked(self.val_loss)[0]

    @property
    def mean_acc(self) -> float:
        return sum(self.test_acc) / len(self.test_acc)

    @property
    def diverged(self) -> int:
        return sum(not math.isfinite(v) for v in self.val_loss)


def score(c: Client, name: str, population: int, val: Split, test: Split) -> Scores:
    lrs = [c.get_hparams(f"{name}/{k}")["lr"] for k in range(population)]
    val_loss = c.evaluate(name, val.x, val.y)
    logits = c.ensemble(name, test.x)  # [K, N, classes]
    test_acc = (logits.argmax(-1) == test.y).float().mean(-1).tolist()
    return Scores(lrs, val_loss, test_acc)


def show(console: Console, initial: list[float], pbt: Scores, base: Scores) -> None:
    table = Table(title="Per model (test accuracy on the held-out test split)")
    for column in ("model", "initial lr", "baseline val loss", "baseline acc", "PBT final lr", "PBT val loss",
                   "PBT acc"):
        table.add_column(column, justify="right")
    for k in range(len(initial)):
        table.add_row(str(k), f"{initial[k]:.3g}", f"{base.val_loss[k]:.3f}", f"{base.test_acc[k]:.1%}",
                      f"{pbt.lrs[k]:.3g}", f"{pbt.val_loss[k]:.3f}", f"{pbt.test_acc[k]:.1%}")
    console.print(table)
    for label, s in (("PBT", pbt), ("baseline", base)):
        console.print(f"{label + ':':<10} best model (lowest validation loss) {label}/{s.best}: test accuracy "
                      f"{s.test_acc[s.best]:.1%}, validation loss {s.val_loss[s.best]:.3f}; population mean test "
                      f"accuracy {s.mean_acc:.1%}; diverged {s.diverged}")
    console.print(f"PBT over the baseline: best model {100 * (pbt.test_acc[pbt.best] - base.test_acc[base.best]):+.1f} "
                  f"points, population mean {100 * (pbt.mean_acc - base.mean_acc):+.1f} points")


SUMMARY = re.compile(r"^(PBT|baseline):\s+best model .*test accuracy ([\d.]+)%.*validation loss ([\d.naif]+); "
                     r"population mean test accuracy ([\d.]+)%", re.MULTILINE)


def parse_summary(text: str) -> dict[str, dict[str, float]]:
    """The two summary lines as figures (for tests and scripts): best_acc, best_val_loss, mean_acc."""
    return {m[1]: {"best_acc": float(m[2]) / 100, "best_val_loss": float(m[3]), "mean_acc": float(m[4]) / 100}
            for m in SUMMARY.finditer(text)}


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive, default=600, help="training rounds (steps of every model)")
    parser.add_argument("--population", type=positive, default=None, help="models per group (default 16)")
    parser.add_argument("--interval", type=positive, default=25, help="rounds between exploit/explore")
    parser.add_argument("--seed", type=int, default=0, help="data, initial weights and lrs, PBT's choices")
    parser.add_argument("--address", help="a running coordinator with groups pbt and baseline "
                                          "(default: start one here and stop it at the end)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, console: Console) -> None:
    began = time.monotonic()
    groups = [group(name, args.population or 16) for name in (PBT, BASELINE)]
    with coordinator(args.address, groups, console) as address, Client(address, timeout=120) as c:
        population = check_groups(c, args.population if args.address else None)
        lrs = initial_lrs(population, args.seed)
        data = dataset(args.seed)
        start_both(c, lrs, args.seed)
        console.print(f"{population} models per group, learning rates {min(lrs):.3g} .. {max(lrs):.3g}; "
                      f"{args.rounds} rounds of batch {BATCH}, PBT every {args.interval} rounds")
        trained = time.monotonic()
        replaced = train(c, args, data, list(lrs), console)
        seconds = time.monotonic() - trained
        console.print(f"Trained 2 x {population} models for {args.rounds} rounds in {seconds:.1f} s "
                      f"({2 * population * args.rounds / seconds:,.0f} model-steps/s); PBT replaced {replaced} models")
        _, val, test = data
        pbt, base = (score(c, name, population, val, test) for name in (PBT, BASELINE))
        show(console, lrs, pbt, base)
    console.print(f"Done in {time.monotonic() - began:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda console: run(args, console))


if __name__ == "__main__":
    sys.exit(main())
