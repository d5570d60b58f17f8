"""The benchmark workloads: which models, how many, what data, how many steps.

Every mode builds its models and data from the same ``Workload`` with the same seeds,
so all modes do the same arithmetic and their numbers compare directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCALING_COUNTS = (8, 32, 128)
QUICK_SCALING_COUNTS = (4, 16, 64)


@dataclass(frozen=True)
class Workload:
    """K models of one architecture doing one kind of step (inference or training)."""

    name: str
    task: str  # "infer" | "train"
    factory: str  # "package.module:callable" returning an nn.Module
    kwargs: dict[str, Any]
    count: int  # K
    batch: int
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    input_dtype: str  # "float32" | "int64"
    classes: int  # targets (and integer inputs) are drawn from [0, classes)
    target_shape: tuple[int, ...]  # one sample's target, no batch dimension
    loss: str  # a cohort loss name or "package.module:fn"
    optimizer: dict[str, Any]
    warmup: int
    steps: int  # at most this many timed steps per mode ...
    budget_s: float  # ... and no more once this many seconds of timed steps have passed
    seed: int = 0
    shared: bool = False  # a sweep: every model trains on the same batch (``Batch.x``, ``Batch.t``)

    @property
    def samples_per_step(self) -> int:
        """Samples processed by one step of every model: what throughput counts."""
        return self.count * self.batch


@dataclass(frozen=True)
class ControlPlane:
    """Tiny jobs that measure the cost of the path around the model, not the model."""

    name: str
    round_trips: int  # sequential, one outstanding: latency
    pipelined: int  # jobs kept ``window`` deep: throughput
    window: int
    warmup: int
    budget_s: float  # each of the two measurements stops early once this has passed
    models: int = 8  # cohort spreads pipelined jobs over these, far below its per-model bound
    payload_bytes: int = 64
    factory: str = "examples.models:mlp"
    kwargs: dict[str, Any] = field(
        default_factory=lambda: {"d_in": 4, "hidden": 4, "d_out": 4, "depth": 0}
    )


@dataclass(frozen=True)
class Batch:
    """One step's data: ``x`` shared by all models (inference), ``xs``/``ts`` one per model.

    For a shared-batch workload (a sweep) ``t`` is the one batch's targets, and ``xs``/``ts``
    hold K real copies of ``x``/``t``: what a client that stacks inputs has to send.
    """

    x: torch.Tensor  # [B, *input_shape]
    xs: torch.Tensor  # [K, B, *input_shape]
    ts: torch.Tensor  # [K, B, *target_shape]
    t: torch.Tensor | None = None  # [B, *target_shape], shared-batch workloads only


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: [B, C] with [B], or [B, T, V] with [B, T]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _mlp_infer(name: str, count: int, quick: bool) -> Workload:
    return Workload(
        name=name,
        task="infer",
        factory="examples.models:mlp",
        kwargs={"d_in": 64, "hidden": 128, "d_out": 10},
        count=count,
        batch=64,
        input_shape=(64,),
        input_dtype="float32",
        classes=10,
        target_shape=(),
        loss="cross_entropy",
        optimizer={"name": "sgd", "lr": 0.01},
        warmup=3 if quick else 10,
        steps=20 if quick else 200,
        budget_s=0.5 if quick else 5.0,
    )


def _cnn_train(quick: bool) -> Workload:
    return Workload(
        name="w2_cnn_train",
        task="train",
        factory="examples.models:cnn",
        kwargs={"channels": 3, "width": 16, "classes": 10},
        count=4 if quick else 16,
        batch=64,
        input_shape=(3, 32, 32),
        input_dtype="float32",
        classes=10,
        target_shape=(),
        loss="cross_entropy",
        optimizer={"name": "sgd", "lr": 0.01},
        warmup=1 if quick else 3,
        steps=3 if quick else 100,
        budget_s=1.0 if quick else 20.0,
    )


def _transformer_train(quick: bool) -> Workload:
    return Workload(
        name="w3_transformer_train",
        task="train",
        factory="examples.models:tiny_transformer",
        kwargs={"vocab": 128, "d_model": 64, "heads": 4, "layers": 2, "seq_len": 32},
        count=4 if quick else 8,
        batch=16,
        input_shape=(32,),
        input_dtype="int64",
        classes=128,
        target_shape=(32,),
        loss="cross_entropy",  # cohort's builtin: [B, T, V] logits with [B, T] targets
        optimizer={"name": "adam", "lr": 1e-3},
        warmup=1 if quick else 3,
        steps=4 if quick else 100,
        budget_s=1.0 if quick else 20.0,
    )


def _sweep_train(quick: bool) -> Workload:
    """A learning-rate sweep's step: K CNNs, every one on the same CIFAR-sized batch."""
    return Workload(
        name="w4_sweep_train",
        task="train",
        factory="examples.models:cnn",
        kwargs={"channels": 3, "width": 16, "classes": 10},
        count=4 if quick else 16,
        batch=32 if quick else 128,
        input_shape=(3, 32, 32),
        input_dtype="float32",
        classes=10,
        target_shape=(),
        loss="cross_entropy",
        optimizer={"name": "sgd", "lr": 0.01},
        warmup=1 if quick else 2,
        steps=3 if quick else 60,
        budget_s=1.0 if quick else 12.0,
        shared=True,
    )


def _control_plane(quick: bool) -> ControlPlane:
    return ControlPlane(
        name="control_plane",
        round_trips=200 if quick else 3000,
        pipelined=500 if quick else 20000,
        window=64,
        warmup=20 if quick else 200,
        budget_s=1.0 if quick else 6.0,
    )


def all_workloads(quick: bool) -> dict[str, list[Workload | ControlPlane]]:
    """Every selectable name and the workloads it stands for, in run order.

    ``--quick`` shrinks steps everywhere, and K for the training workloads and the
    scaling sweep, so that a smoke run of everything stays short on a small CPU.
    """
    counts = QUICK_SCALING_COUNTS if quick else SCALING_COUNTS
    return {
        "w1_mlp_infer": [_mlp_infer("w1_mlp_infer", 32, quick)],
        "w1_scaling": [_mlp_infer(f"w1_scaling_k{k}", k, quick) for k in counts],
        "w2_cnn_train": [_cnn_train(quick)],
        "w3_transformer_train": [_transformer_train(quick)],
        "w4_sweep_train": [_sweep_train(quick)],
        "control_plane": [_control_plane(quick)],
    }


def select(names: Iterable[str] | None, quick: bool) -> list[Workload | ControlPlane]:
    """The workloads for the names asked for (all when none), without duplicates."""
    table = all_workloads(quick)
    chosen = list(names) if names else list(table)
    unknown = [name for name in chosen if name not in table]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {sorted(table)}")
    return [workload for name in dict.fromkeys(chosen) for workload in table[name]]


def import_callable(path: str) -> Callable[..., Any]:
    """Resolve ``"package.module:name"``, the same spelling cohort's config uses."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)  # type: ignore[no-any-return]


def build_model(workload: Workload, index: int, device: str) -> nn.Module:
    """Model ``index`` of the workload, seeded by its index so every mode gets the same weights."""
    torch.manual_seed(workload.seed + index)
    model: nn.Module = import_callable(workload.factory)(**workload.kwargs)
    return model.to(device).train(workload.task == "train")


def build_models(workload: Workload, indices: Iterable[int], device: str) -> list[nn.Module]:
    """The models with the given indices (a process's shard, or all of them)."""
    return [build_model(workload, index, device) for index in indices]


def loss_function(workload: Workload) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss as a callable; cohort's built-in names map onto the same functions."""
    builtin: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "cross_entropy": token_cross_entropy,
        "mse": F.mse_loss,
    }
    return builtin.get(workload.loss) or import_callable(workload.loss)


def make_optimizer(workload: Workload, model: nn.Module) -> torch.optim.Optimizer:
    """The per-model optimizer a user would write for the plain PyTorch baselines."""
    settings = dict(workload.optimizer)
    name = settings.pop("name")
    kinds: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    return kinds[name](model.parameters(), **settings)


def _draw(shape: tuple[int, ...], dtype: str, classes: int, generator: torch.Generator) -> torch.Tensor:
    if dtype == "int64":
        return torch.randint(0, classes, shape, generator=generator)
    return torch.randn(shape, generator=generator)


def make_batches(workload: Workload, device: str, count: int = 2) -> list[Batch]:
    """A few seeded batches, made before timing starts and reused in turn by every step.

    A shared-batch workload's ``xs``/``ts`` are K copies of its ``x``/``t``, so every mode
    (each model on ``xs[k]``, or all on ``x``) does the same arithmetic.
    """
    generator = torch.Generator().manual_seed(workload.seed + 10_000)
    k, b = workload.count, workload.batch
    batches = []
    for _ in range(count):
        x = _draw((b, *workload.input_shape), workload.input_dtype, workload.classes, generator)
        if workload.shared:
            t = torch.randint(0, workload.classes, (b, *workload.target_shape), generator=generator)
            xs, ts = torch.stack([x] * k), torch.stack([t] * k)
            batches.append(Batch(x.to(device), xs.to(device), ts.to(device), t.to(device)))
            continue
        xs = _draw((k, b, *workload.input_shape), workload.input_dtype, workload.classes, generator)
        ts = torch.randint(0, workload.classes, (k, b, *workload.target_shape), generator=generator)
        batches.append(Batch(x.to(device), xs.to(device), ts.to(device)))
    return batches
