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
    """One per-model tensor of a bank: a parameter, a buffer or optimizer state."""

    name: str
    role: Literal["param", "buffer", "state"]
    shape: tuple[int, ...]
    dtype: str


class InputSpec(msgspec.Struct, array_like=True, frozen=True):
    """One model input; ``-1`` in ``shape`` is the batch dimension (or any size)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class BatchingSpec(msgspec.Struct, frozen=True):
    """A group's batching policy (the ``batching`` table of its config)."""

    fuse: bool = True  # ensemble, train_round and coalesced jobs as one vmap'd call over the bank
    max_jobs: int = 64  # at most this many waiting jobs joined into one call; 1 turns coalescing off
    max_wait_ms: float = 0.0  # how long a worker may hold a lone job for others to join it
    compile: str = ""  # torch.compile mode for fused calls ("default", "reduce-overhead", ...); "" = eager


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
