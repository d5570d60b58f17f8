"""Coalescing: jobs waiting in a worker joined into fewer, larger calls.

Jobs are taken in arrival order and only neighbours are joined, so every model's jobs
keep their order. A run of neighbouring jobs of one group joins when:

- ``infer`` on one model, inputs alike but for the batch size: concatenated along the
  batch dimension (dynamic batching), one call, outputs split back by rows;
- ``infer`` on several models, inputs of one shape: stacked ``[n, B, ...]`` and run as
  one vmap'd call over those models' weights;
- ``train_step`` on distinct models, inputs and targets of one shape: one fused
  training step over those models (a model appearing twice ends the run: its second
  step must see the first one's weights).

Nothing ever waits for company unless the group's policy says so (``max_wait_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.spec import BatchingSpec


@dataclass
class Ready:
    """One decoded, checked job."""

    job_id: int
    op: str
    group: str
    slots: list[int]
    inputs: Any
    targets: Any
    option: str = ""
    source: list[int] = field(default_factory=list)
    shared: bool = False
    hparams: dict[str, list[float]] = field(default_factory=dict)
    seed: int | None = None


@dataclass
class Run:
    """Jobs joined into one call; ``kind`` says how."""

    kind: str  # "single" | "concat" | "stack_infer" | "stack_train"
    jobs: list[Ready] = field(default_factory=list)


def _signature(value: Any, skip_batch: bool) -> Any:
    def one(t: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(t.shape[1:]) if skip_batch else tuple(t.shape), t.dtype)

    if isinstance(value, dict):
        return tuple((k, one(v)) for k, v in sorted(value.items()))
    if isinstance(value, torch.Tensor):
        return one(value)
    return None


def _joins(run: Run, job: Ready, policy: BatchingSpec) -> str | None:
    """How ``job`` joins ``run`` (the new kind), or None."""
    first = run.jobs[0]
    if len(run.jobs) >= policy.max_jobs or job.group != first.group or job.op != first.op:
        return None
    if job.op == "infer":
        same_model = all(j.slots == job.slots for j in run.jobs)
        if run.kind in ("single", "concat") and same_model and \
                _signature(job.inputs, True) == _signature(first.inputs, True):
            return "concat"
        if run.kind in ("single", "stack_infer") and policy.fuse and \
                _signature(job.inputs, False) == _signature(first.inputs, False):
            return "stack_infer"
        return None
    if job.op == "train_step" and policy.fuse and run.kind in ("single", "stack_train"):
        if any(j.slots == job.slots for j in run.jobs):
            return None
        if _signature(job.inputs, False) == _signature(first.inputs, False) and \
                _signature(job.targets, False) == _signature(first.targets, False):
            return "stack_train"
    return None


def plan(jobs: list[Ready], policies: dict[str, BatchingSpec]) -> list[Run]:
    """Split jobs, in order, into runs of neighbours that can share one call."""
    runs: list[Run] = []
    for job in jobs:
        if runs and job.op in ("infer", "train_step"):
            kind = _joins(runs[-1], job, policies[job.group])
            if kind is not None:
                runs[-1].kind = kind
                runs[-1].jobs.append(job)
                continue
        runs.append(Run("single", [job]))
    return runs


def concat_rows(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


def stack(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {k: torch.stack([v[k] for v in values]) for k in values[0]}
    return torch.stack(values)


def split_rows(outputs: Any, sizes: list[int]) -> list[Any]:
    """Undo ``concat_rows`` on a model's outputs (a tensor, tuple or dict of tensors)."""
    if isinstance(outputs, torch.Tensor):
        return list(outputs.split(sizes))
    if isinstance(outputs, dict):
        parts = {k: v.split(sizes) for k, v in outputs.items()}
        return [{k: parts[k][i] for k in outputs} for i in range(len(sizes))]
    parts_t = [v.split(sizes) for v in outputs]
    return [tuple(p[i] for p in parts_t) for i in range(len(sizes))]


def unstack(outputs: Any, n: int) -> list[Any]:
    if isinstance(outputs, torch.Tensor):
        return list(outputs.unbind(0))
    if isinstance(outputs, dict):
        return [{k: v[i] for k, v in outputs.items()} for i in range(n)]
    return [tuple(v[i] for v in outputs) for i in range(n)]


def batch_size(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0])


def run_joined(runtime: Any, run: Run) -> list[tuple[Any, torch.Tensor | None]]:
    """Execute a run of several jobs; per job ``(outputs, losses [1] or None)``, in order."""
    jobs = run.jobs
    if run.kind == "concat":
        sizes = [batch_size(j.inputs) for j in jobs]
        outputs = runtime.infer(jobs[0].slots[0], concat_rows([j.inputs for j in jobs]))
        return [(o, None) for o in split_rows(outputs, sizes)]
    slots = [j.slots[0] for j in jobs]
    if run.kind == "stack_infer":
        outputs = runtime.infer_stacked(slots, stack([j.inputs for j in jobs]))
        return [(o, None) for o in unstack(outputs, len(jobs))]
    losses = runtime.train_round(slots, stack([j.inputs for j in jobs]), torch.stack([j.targets for j in jobs]))
    return [(None, losses[i].reshape(1)) for i in range(len(jobs))]
