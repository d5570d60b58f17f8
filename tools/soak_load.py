"""The soak's client load: the groups it drives and one client thread's mix of calls.

``soak_groups()`` is the cohort under test (8 MLPs and 4 small CNNs from
``examples.models``). Each load thread owns one ``Client`` and draws, by weight,
``infer``, ``train_step``, pipelined ``submit`` bursts, ``ensemble``, ``train_round``,
``barrier``, ``get_weights``, ``copy_weights`` and bad inputs that must be refused with
``BadInput`` or ``UnknownModel``; every call is counted in a ``Tally``
(``soak_report``) with a check of the answer's shape.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch

from scheduler import BadInput, Client, CohortError, UnknownModel
from tools.soak_report import HANG_S, Tally

JOB_TIMEOUT_S = HANG_S + 5  # the client's own timeout: longer than HANG_S, so a lost answer shows as HUNG


# ---------------------------------------------------------------------- the cohort under test


@dataclass(frozen=True)
class GroupShape:
    name: str
    count: int
    sample: tuple[int, ...]   # one input without the batch dimension
    classes: int


MLP = GroupShape("mlp", 8, (16,), 10)
CNN = GroupShape("cnn", 4, (3, 32, 32), 10)
GROUPS = (MLP, CNN)


def soak_groups() -> list[dict[str, Any]]:
    return [
        {
            "name": MLP.name,
            "factory": "examples.models:mlp",
            "kwargs": {"d_in": MLP.sample[0], "hidden": 32, "d_out": MLP.classes},
            "count": MLP.count,
            "input": {"shape": [-1, *MLP.sample], "dtype": "float32"},
            "loss": "cross_entropy",
            "optimizer": {"name": "sgd", "lr": [0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001]},
            "init": {"seed": 0},
        },
        {
            "name": CNN.name,
            "factory": "examples.models:cnn",
            "kwargs": {"channels": CNN.sample[0], "width": 4, "classes": CNN.classes},
            "count": CNN.count,
            "input": {"shape": [-1, *CNN.sample], "dtype": "float32"},
            "loss": "cross_entropy",
            "optimizer": {"name": "adam", "lr": 1e-3},
            "init": {"seed": 100},
        },
    ]



# ---------------------------------------------------------------------- the load


def batch(rng: random.Random, low: int = 1, high: int = 8) -> int:
    return rng.randint(low, high)


def inputs(g: GroupShape, b: int) -> torch.Tensor:
    return torch.randn(b, *g.sample)


def labels(g: GroupShape, *shape: int) -> torch.Tensor:
    return torch.randint(0, g.classes, shape)


def pick_group(rng: random.Random) -> GroupShape:
    return MLP if rng.random() < 0.75 else CNN


def shape_check(value: Any, shape: tuple[int, ...]) -> str:
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor of shape {list(shape)}, got {type(value).__name__}"
    if tuple(value.shape) != shape:
        return f"expected shape {list(shape)}, got {list(value.shape)}"
    return ""


def loss_check(value: Any, n: int | None = None) -> str:
    if n is None:
        return "" if isinstance(value, float) else f"expected a float loss, got {type(value).__name__}"
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, float) for v in value)):
        return f"expected {n} float losses, got {value!r}"[:200]
    return ""


class Load:
    """One client thread's mix of calls."""

    def __init__(self, client: Client, rng: random.Random, tally: Tally) -> None:
        self.c = client
        self.rng = rng
        self.tally = tally
        self.actions: list[tuple[Callable[[], None], int]] = [
            (self.infer, 30), (self.train_step, 20), (self.burst, 12), (self.ensemble, 8),
            (self.train_round, 8), (self.barrier, 5), (self.get_weights, 5), (self.copy_weights, 2),
            (self.bad_input, 5),
        ]
        self.weight_keys: dict[str, set[str]] = {}

    def step(self) -> None:
        fns, weights = zip(*self.actions)
        self.rng.choices(fns, weights)[0]()

    def call(self, op: str, fn: Callable[[], Any], check: Callable[[Any], str] = lambda _: "") -> None:
        token = self.tally.begin(op)
        try:
            value = fn()
        except BaseException as exc:  # counted by class; a non-CohortError fails the soak
            self.tally.end(token, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.tally.end(token, None, check(value))

    def model(self, g: GroupShape) -> str:
        return f"{g.name}/{self.rng.randrange(g.count)}"

    def infer(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng)
        self.call("infer", lambda: self.c.infer(self.model(g), inputs(g, b)),
                  lambda y: shape_check(y, (b, g.classes)))

    def train_step(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng)
        self.call("train_step", lambda: self.c.train_step(self.model(g), inputs(g, b), labels(g, b)), loss_check)

    def ensemble(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng, 1, 4)
        self.call("ensemble", lambda: self.c.ensemble(g.name, inputs(g, b)),
                  lambda y: shape_check(y, (g.count, b, g.classes)))

    def train_round(self) -> None:
        g, b = pick_group(self.rng), batch(self.rng, 1, 4)
        xs, ts = torch.randn(g.count, b, *g.sample), labels(g, g.count, b)
        self.call("train_round", lambda: self.c.train_round(g.name, xs, ts), lambda ls: loss_check(ls, g.count))

    def barrier(self) -> None:
        r = self.rng.random()
        scope: str | list[str] | None
        if r < 0.4:
            scope = None
        elif r < 0.7:
            scope = pick_group(self.rng).name
        else:
            scope = sorted({self.model(pick_group(self.rng)) for _ in range(3)})
        self.call("barrier", lambda: self.c.barrier(scope),
                  lambda v: "" if v is None else f"expected None, got {type(v).__name__}")

    def get_weights(self) -> None:
        g = pick_group(self.rng)

        def check(sd: Any) -> str:
            if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                return f"expected a dict of tensors, got {type(sd).__name__}"
            keys = self.weight_keys.setdefault(g.name, set(sd))
            return "" if set(sd) == keys else f"keys changed: {sorted(set(sd) ^ keys)}"

        self.call("get_weights", lambda: self.c.get_weights(self.model(g)), check)

    def copy_weights(self) -> None:
        g = pick_group(self.rng)
        src, dst = self.model(g), self.model(g)
        self.call("copy_weights", lambda: self.c.copy_weights(src=src, dst=dst))

    def burst(self) -> None:
        """Pipelined submits without waiting, then every future: each one must end."""
        futures: list[Future[Any]] = []
        for _ in range(self.rng.randint(8, 48)):
            g, b = pick_group(self.rng), batch(self.rng, 1, 4)
            r = self.rng.random()
            if r < 0.6:
                op, target, args, check = "infer", self.model(g), (inputs(g, b),), self._shape(b, g.classes)
            elif r < 0.9:
                op, target, args, check = "train_step", self.model(g), (inputs(g, b), labels(g, b)), loss_check
            else:
                op, target, args, check = "ensemble", g.name, (inputs(g, b),), self._shape(g.count, b, g.classes)
            token = self.tally.begin(f"submit:{op}")
            try:
                future = self.c.submit(op, target, *args)
            except Exception as exc:
                self.tally.end(token, exc)
                continue
            future.add_done_callback(self._done(token, check))
            futures.append(future)
        wait_futures(futures, timeout=HANG_S + 5)

    @staticmethod
    def _shape(*shape: int) -> Callable[[Any], str]:
        return lambda y: shape_check(y, shape)

    def _done(self, token: int, check: Callable[[Any], str]) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            error = future.exception()
            try:
                wrong = check(future.result()) if error is None else ""
            except Exception as exc:  # a checker bug must not vanish in the client's I/O thread
                wrong = f"checking the result raised {type(exc).__name__}: {exc}"
            self.tally.end(token, error, wrong)

        return done

    def bad_input(self) -> None:
        g = pick_group(self.rng)
        cases: list[tuple[str, type[CohortError], Callable[[], Any]]] = [
            ("wrong_shape", BadInput, lambda: self.c.infer(self.model(g), torch.randn(2, *g.sample[:-1], g.sample[-1] + 1))),
            ("wrong_dtype", BadInput, lambda: self.c.infer(self.model(g), torch.zeros(2, *g.sample, dtype=torch.int64))),
            ("empty_batch", BadInput, lambda: self.c.infer(self.model(g), torch.randn(0, *g.sample))),
            ("target_batch", BadInput, lambda: self.c.train_step(self.model(g), inputs(g, 3), labels(g, 2))),
            ("round_not_stacked", BadInput, lambda: self.c.train_round(g.name, torch.randn(g.count + 1, 2, *g.sample),
                                                                       labels(g, g.count + 1, 2))),
            ("no_such_index", UnknownModel, lambda: self.c.infer(f"{g.name}/{g.count + 7}", inputs(g, 1))),
            ("no_such_group", UnknownModel, lambda: self.c.infer("nosuchgroup/0", inputs(g, 1))),
            ("ensemble_of_model", UnknownModel, lambda: self.c.ensemble(f"{g.name}/0", inputs(g, 1))),
        ]
        kind, expected, fn = self.rng.choice(cases)
        try:
            fn()
        except Exception as exc:
            self.tally.bad_input(kind, expected, exc)
            return
        self.tally.bad_input(kind, expected, None)


def load_thread(address: str, seed: int, stop: threading.Event, tally: Tally, errors: list[str]) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    try:
        with Client(address, timeout=JOB_TIMEOUT_S) as c:
            load = Load(c, rng, tally)
            while not stop.is_set():
                load.step()
    except Exception as exc:  # a load thread must never die silently
        errors.append(f"load thread {seed}: {type(exc).__name__}: {exc}")
