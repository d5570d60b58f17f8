"""What the coordinator knows of a job while it is queued and in flight.

A job on one model is one ``Part``; a job on a whole group (``ensemble``,
``train_round``) has one part per worker that holds some of the group's models. The
coordinator never decodes tensor bytes: a stacked input is split by slicing its
frames, and stacked results are joined by concatenating theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.barrier import Barrier
from scheduler.protocol import TensorMeta, TensorTree, tensor_nbytes

ModelKey = tuple[str, int]


@dataclass
class Part:
    """The piece of a job that one worker runs."""

    job: Job
    worker: int
    slots: list[int]
    indices: list[int]
    inputs: TensorTree
    targets: TensorTree
    buffers: list[Any]
    sent: bool = False


@dataclass
class Job:
    id: int
    client: bytes
    req_id: int
    op: str
    group: str
    models: list[ModelKey]
    accepted: float
    deadline: float | None
    fences: list[Barrier] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    results: dict[int, tuple[TensorTree, list[Any], list[float] | None]] = field(default_factory=dict)
    open_parts: int = 0
    answered: bool = False
    started: bool = False

    def fenced(self) -> bool:
        """True while a barrier accepted before this job has not completed."""
        if self.fences and all(b.done for b in self.fences):
            self.fences = []
        return bool(self.fences)


def slice_rows(tree: TensorTree, buffers: list[Any], lo: int, hi: int) -> tuple[TensorTree, list[Any]]:
    """Rows ``lo:hi`` of dim 0 of every tensor, as zero-copy views of the frames."""
    metas, out = [], []
    for meta, buf in zip(tree.metas, buffers):
        rows = meta.shape[0]
        row_bytes = tensor_nbytes(meta) // rows if rows else 0
        metas.append(TensorMeta(meta.dtype, (hi - lo, *meta.shape[1:])))
        out.append(memoryview(buf)[lo * row_bytes : hi * row_bytes])
    return TensorTree(tree.layout, tuple(metas), tree.keys), out


def join_rows(pieces: list[tuple[TensorTree, list[Any]]]) -> tuple[TensorTree, list[Any]]:
    """Concatenate stacked results along dim 0, in the order given."""
    first = pieces[0][0]
    metas, out = [], []
    for i, meta in enumerate(first.metas):
        rows = sum(tree.metas[i].shape[0] for tree, _ in pieces)
        metas.append(TensorMeta(meta.dtype, (rows, *meta.shape[1:])))
        out.append(b"".join(bytes(bufs[i]) for _, bufs in pieces))
    return TensorTree(first.layout, tuple(metas), first.keys), out
