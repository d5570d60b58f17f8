"""What the coordinator knows of a job while it is queued and in flight.

A job on one model is one ``Part``; a job on a whole group (``ensemble``,
``train_round``) has one part per worker that holds some of the group's models. The
coordinator never decodes tensor bytes: a stacked input is split by slicing its
frames, and stacked results are joined by concatenating theirs. The coordinator's own
bank operations are jobs too (``on_done`` answers them instead of a reply to a client).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import CohortError
from core.spec import ModelKey
from core.tensors import TensorTree, slice_rows
from scheduler.barrier import Barrier


@dataclass(slots=True)
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
    answered_here: bool = False  # its worker answers the client itself (``RunJob.reply_to``)
    hparams: dict[str, list[float]] = field(default_factory=dict)  # set_hparams: values for this part's slots


@dataclass(slots=True)
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
    on_done: Callable[[Job, CohortError | None], None] | None = None  # the coordinator's own job: called, no reply
    blocked: bool = False  # waits for another job's result before it may be sent
    option: str = ""  # bank operations: see core.messages.RunJob
    source: list[int] = field(default_factory=list)
    shared: bool = False  # one batch for every model of a group call
    shm_results: bool = False  # a local client: large results may come back in the worker's arena
    client_pid: int = 0  # that client's process (the worker holds such a result for it)
    seed: int | None = None  # reset
    error: CohortError | None = None  # a part's failure, answered once no other part reads the client's memory

    def in_client_memory(self) -> bool:
        """Whether its tensors lie in the client's memory (its arena, its GPU), not in frames here."""
        return any(tree.shm or tree.cuda for part in self.parts for tree in (part.inputs, part.targets))

    def fenced(self) -> bool:
        """True while a barrier accepted before this job has not completed."""
        if self.fences and all(b.done for b in self.fences):
            self.fences = []
        return bool(self.fences)


def split(job: Job, slot_of: dict[ModelKey, tuple[int, int]], inputs: TensorTree, in_buffers: list[Any],
          targets: TensorTree, t_buffers: list[Any], stacked: int | None) -> None:
    """One part per worker holding some of the job's models, its slots in ascending order."""
    if len(job.models) == 1 and stacked is None:  # most jobs: one model, one part, nothing to cut
        worker, slot = slot_of[job.models[0]]
        job.parts.append(Part(job, worker, [slot], [job.models[0][1]], inputs, targets, [*in_buffers, *t_buffers]))
        job.open_parts = 1
        return
    by_worker: dict[int, list[tuple[int, int]]] = {}
    for model in job.models:
        worker, slot = slot_of[model]
        by_worker.setdefault(worker, []).append((slot, model[1]))
    for worker, pairs in by_worker.items():
        pairs.sort()
        slots, indices = [s for s, _ in pairs], [i for _, i in pairs]
        tree_in, buf_in, tree_t, buf_t = inputs, in_buffers, targets, t_buffers
        if stacked is not None:
            lo, hi = indices[0], indices[-1] + 1
            tree_in, buf_in = slice_rows(inputs, in_buffers, lo, hi)
            tree_t, buf_t = slice_rows(targets, t_buffers, lo, hi)
        job.parts.append(Part(job, worker, slots, indices, tree_in, tree_t, [*buf_in, *buf_t]))
    if len(job.parts) > 1:
        job.parts.sort(key=lambda p: p.indices[0])
    job.open_parts = len(job.parts)
