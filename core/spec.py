"""A group's definition as data: its inputs, bank entries, batching policy and settings.

The coordinator derives a ``GroupSpec`` once from the group's ``GroupConfig`` (see
``core.definition``) and sends each worker the spec of the models placed on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

ModelKey = tuple[str, int]  # (group, index): one model


class EntrySpec(msgspec.Struct, array_like=True, frozen=True):
    """One per-model tensor of a bank: a parameter, a buffer, optimizer state or a hyperparameter.

    Hyperparameters live in the bank (``hparam.<name>``, float64) so that one set at run time
    survives a worker's replacement like the weights do."""

    name: str
    role: Literal["param", "buffer", "state", "hparam"]
    shape: tuple[int, ...]
    dtype: str


class InputSpec(msgspec.Struct, array_like=True, frozen=True):
    """One model input; ``-1`` in ``shape`` is the batch dimension (or any size)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


# How a worker may run a group's calls (``batching.plan``): "auto" measures each and picks the
# cheapest; the others pin one (workers/plans.py).
PINNABLE_PLANS = ("auto", "one_by_one", "concat", "vmap")


class BatchingSpec(msgspec.Struct, frozen=True):
    """A group's batching policy (the ``batching`` table of its config)."""

    fuse: bool = True  # ensemble, train_round and coalesced jobs as one vmap'd call over the bank
    max_jobs: int = 64  # at most this many waiting jobs joined into one call; 1 turns coalescing off
    max_wait_ms: float = 0.0  # how long a worker may hold a lone job for others to join it
    compile: str = ""  # torch.compile mode for fused calls ("default", "reduce-overhead", ...); "" = eager
    buckets: list[int] | None = None  # compiled calls: batch sizes padded up to these; None: powers of two
    plan: str = "auto"  # how calls run: measured ("auto"), or pinned: "one_by_one" | "concat" | "vmap"


class ScheduleSpec(msgspec.Struct, frozen=True):
    """A learning-rate schedule (the ``schedule`` table); each model follows its own step count.

    The learning rate a model's step ``t`` (0 for its first) uses, from its base ``lr``:

    - ``constant``: ``lr``;
    - ``cosine``: linear warm-up over ``warmup_steps`` (``lr * (t + 1) / warmup_steps``), then
      ``min_lr + (lr - min_lr) * (1 + cos(pi * t' / T)) / 2`` with ``t' = t - warmup_steps``,
      ``T = total_steps - warmup_steps``: without warm-up, ``CosineAnnealingLR(T_max=total_steps,
      eta_min=min_lr)`` stepped after every optimizer step;
    - ``step``: ``lr * gamma ** (t // step_size)`` (``StepLR``);
    - ``linear``: ``lr * (start_factor + (end_factor - start_factor) * min(t, total_steps) /
      total_steps)`` (``LinearLR``).
    """

    name: str = "constant"
    total_steps: int = 0
    min_lr: float = 0.0
    warmup_steps: int = 0
    step_size: int = 1
    gamma: float = 0.1
    start_factor: float = 1.0
    end_factor: float = 0.0


PRECISIONS = ("fp32", "bf16-mixed", "bf16")


class GroupSpec(msgspec.Struct, frozen=True):
    """A group's compiled definition as a worker receives it, for the models placed there."""

    name: str
    factory: str
    kwargs: dict[str, Any]
    inputs: list[InputSpec]
    single_input: bool
    entries: list[EntrySpec]
    loss: str
    optimizer: str
    hparams: dict[str, list[float]]
    indices: list[int]
    init_seed: int | None = None
    init_safetensors: str | None = None
    batching: BatchingSpec = BatchingSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    precision: str = "fp32"  # fp32: as the factory makes it | bf16-mixed | bf16 (see PRECISIONS)


@dataclass(frozen=True)
class GroupConfig:
    """A group as its config describes it (checked by ``scheduler.config``)."""

    name: str
    factory: str
    kwargs: dict[str, Any]
    count: int
    inputs: list[InputSpec]
    single_input: bool
    loss: str
    optimizer: str
    hparams: dict[str, list[float]]
    init_seed: int | None
    init_safetensors: str | None
    batching: BatchingSpec = BatchingSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    precision: str = "fp32"
