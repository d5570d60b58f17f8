"""Jobs waiting in a worker, joined into fewer, larger calls where that is measured to pay.

Jobs are taken in arrival order and cut into *segments* of neighbours that could share a
call: ``infer`` jobs of one group whose inputs are alike but for the batch size, or
``train_step`` jobs of one group on distinct models with inputs and targets of one shape
(a model appearing twice ends the segment: its second step must see the first one's
weights). Every other job is a segment of its own. Each segment is then cut into calls
as the group's ``PlanChooser`` says (``workers.plans``):

- ``one_by_one``: each job alone;
- ``concat``: the ``infer`` jobs of each model concatenated along the batch dimension
  (dynamic batching), one call per model, outputs split back by rows;
- ``vmap@n`` / ``vmap_compiled@n``: ``n`` jobs stacked ``[n, B, ...]`` and run as one vmap'd
  call over those models' weights (one fused training step for ``train_step``).

An ensemble, training round or evaluation over n models is one job; the chooser says
whether it runs as one vmap'd call or model by model. Only ``infer`` jobs of different
models ever change order (they change nothing), so every model's jobs keep theirs.
Nothing ever waits for company unless the group's policy says so (``max_wait_ms``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.plans import CONCAT, ONE_BY_ONE, VMAP, VMAP_COMPILED, Candidate, Choice, bucket_down

MULTI_MODEL_OPS = ("ensemble", "train_round", "evaluate")
ALONE = Candidate(ONE_BY_ONE)


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
    """Jobs run as one call; ``kind`` says how, ``choice`` why (None: not a call the chooser weighs)."""

    kind: str  # "single" | "concat" | "stack_infer" | "stack_train"
    jobs: list[Ready] = field(default_factory=list)
    choice: Choice | None = None
    measured_as: Candidate | None = None  # what the call's time is recorded under

    @property
    def plan(self) -> str:
        """How a multi-model job runs: ``one_by_one``, ``vmap`` or ``vmap_compiled``."""
        return ONE_BY_ONE if self.choice is None else self.choice.candidate.plan


def _signature(value: Any, skip_batch: bool) -> Any:
    def one(t: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(t.shape[1:]) if skip_batch else tuple(t.shape), t.dtype)

    if isinstance(value, dict):
        return tuple((k, one(v)) for k, v in sorted(value.items()))
    if isinstance(value, torch.Tensor):
        return one(value)
    return None


def _key(job: Ready) -> tuple[Any, ...]:
    """What neighbours must share to be joined: group, op, and the shapes of their data (an ``infer``'s
    but for the batch size)."""
    if job.op == "infer":
        return (job.group, job.op, _signature(job.inputs, True))
    return (job.group, job.op, _signature(job.inputs, False), _signature(job.targets, False))


def segments(jobs: list[Ready]) -> list[list[Ready]]:
    """Jobs, in order, as runs of neighbours that could share a call (a ``train_step`` on a model already
    in the run starts a new one: its step must see the first one's weights)."""
    out: list[list[Ready]] = []
    last: tuple[Any, ...] | None = None
    for job in jobs:
        key = _key(job) if job.op in ("infer", "train_step") else None
        if key is not None and key == last and not (job.op == "train_step" and any(j.slots == job.slots for j in out[-1])):
            out[-1].append(job)
        else:
            out.append([job])
            last = key
    return out


def plan(jobs: list[Ready], runtimes: dict[str, Any]) -> list[Run]:
    """The calls to make for jobs that arrived together, in order, each as its group's chooser says."""
    runs: list[Run] = []
    for segment in segments(jobs):
        first = segment[0]
        runtime = runtimes[first.group]
        if first.op in ("infer", "train_step"):
            runs += _cut(segment, runtime)
        elif first.op in MULTI_MODEL_OPS:
            runs.append(_multi_model(first, runtime))
        else:
            runs.append(Run("single", segment))
    return runs


def _batch_bucket(t: torch.Tensor, dim: int) -> int:
    return 1 << max(0, (int(t.shape[dim]) - 1).bit_length())


def _case(job: Ready, n_models: int) -> tuple[Hashable, Callable[[], str]]:
    """What a choice is about: the op on inputs of one shape, the batch rounded up to a power of two."""
    inputs = job.inputs
    lead = 2 if job.op in MULTI_MODEL_OPS and not job.shared else 1  # stacked: [n, B, ...]
    if isinstance(inputs, torch.Tensor):  # the common case, on every call: kept short
        key: Hashable = (job.op, job.shared, n_models, tuple(inputs.shape[lead:]), tuple(inputs.shape[:lead - 1]),
                         _batch_bucket(inputs, lead - 1), inputs.dtype)
    else:
        key = (job.op, job.shared, n_models, tuple((k, tuple(t.shape[lead:]), tuple(t.shape[:lead - 1]),
                                                    _batch_bucket(t, lead - 1), t.dtype)
                                                   for k, t in sorted(inputs.items())))
    return key, lambda: _describe(job, n_models, lead)


def _describe(job: Ready, n_models: int, lead: int) -> str:
    """A case as the plan report shows it: ``16x3x32x32 float32``, the batch rounded up."""
    leaves = sorted(job.inputs.items()) if isinstance(job.inputs, dict) else [("", job.inputs)]
    parts = []
    for name, t in leaves:
        shape = "x".join(str(d) for d in (*t.shape[:lead - 1], _batch_bucket(t, lead - 1), *t.shape[lead:]))
        parts.append(f"{name + ' ' if name else ''}{shape} {str(t.dtype).removeprefix('torch.')}")
    suffix = f" over {n_models} models" + (", one shared batch" if job.shared else "") if n_models > 1 else ""
    return ", ".join(parts) + suffix


def _multi_model(job: Ready, runtime: Any) -> Run:
    """An ensemble, round or evaluation over n models: as one vmap'd call, or model by model."""
    n = len(job.slots)
    candidates = [ALONE]
    if n >= 2 and runtime.fused.enabled:  # a group that compiles has its fused calls compiled
        candidates.append(Candidate(VMAP if runtime.fused.compiled is None else VMAP_COMPILED, n))
    key, describe = _case(job, n)
    choice = runtime.plans.choose(key, job.op, describe, candidates, n)
    return Run("single", [job], choice, choice.candidate)


def _cut(segment: list[Ready], runtime: Any) -> list[Run]:
    """A segment of joinable jobs as calls: the chooser picks a candidate for what is left, again
    and again, until every job has its call."""
    if len(segment) == 1 and runtime.plans.skip_lone():
        return [Run("single", segment)]
    runs: list[Run] = []
    key, describe = _case(segment[0], 1)
    policy = runtime.spec.batching
    rest = segment
    while rest:
        choice = runtime.plans.choose(key, rest[0].op, describe, _candidates(rest, runtime, policy.max_jobs), len(rest))
        candidate = choice.candidate
        if candidate.plan == ONE_BY_ONE:
            taken = rest[:1] if choice.learning else rest
            # One of them timed is sample enough: timing each would cost more than a tiny job's call.
            runs += [Run("single", [job], choice, candidate if i == 0 else None) for i, job in enumerate(taken)]
        elif candidate.plan == CONCAT:
            taken = rest
            runs += _concat(rest, choice, policy.max_jobs)
        else:
            taken = rest[:candidate.size]
            runs.append(Run("stack_infer" if rest[0].op == "infer" else "stack_train", taken, choice, candidate))
        rest = rest[len(taken):]
    return runs


def _candidates(rest: list[Ready], runtime: Any, max_jobs: int) -> list[Candidate]:
    """The ways ``rest`` (a segment's jobs not yet given a call) can run next."""
    out = [ALONE]
    if len(rest) < 2 or max_jobs < 2:
        return out
    if rest[0].op == "infer":
        per_model: dict[int, int] = {}
        for job in rest:
            per_model[job.slots[0]] = per_model.get(job.slots[0], 0) + 1
        if max(per_model.values()) >= 2:
            out.append(Candidate(CONCAT, bucket_down(min(max_jobs, max(2, len(rest) // len(per_model))))))
    if not (runtime.spec.batching.fuse and runtime.fused.enabled):
        return out
    alike = len(rest)
    if rest[0].op == "infer":  # one vmap'd call needs one shape; the segment only shares all but the batch
        shape = _signature(rest[0].inputs, False)
        alike = next((i for i, j in enumerate(rest) if _signature(j.inputs, False) != shape), len(rest))
    if runtime.fused.compiled is None:
        name, most = VMAP, min(alike, max_jobs)
    else:  # the group compiles its fused calls; each is made for the bank's count of models
        name, most = VMAP_COMPILED, min(alike, max_jobs, len(runtime.spec.indices))
    size = 2
    while size <= most:
        out.append(Candidate(name, size))
        size *= 2
    return out


def _concat(jobs: list[Ready], choice: Choice, max_jobs: int) -> list[Run]:
    """Each model's jobs as one batch (at most ``max_jobs`` jobs a call), models in first-seen order."""
    per_model: dict[int, list[Ready]] = {}
    for job in jobs:
        per_model.setdefault(job.slots[0], []).append(job)
    runs = []
    for own in per_model.values():
        for i in range(0, len(own), max_jobs):
            part = own[i:i + max_jobs]
            measured = Candidate(CONCAT, bucket_down(len(part))) if len(part) > 1 else Candidate(ONE_BY_ONE)
            runs.append(Run("concat" if len(part) > 1 else "single", part, choice, measured))
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
    plan = None if run.measured_as is None else run.measured_as.plan
    if run.kind == "stack_infer":
        outputs = runtime.infer_stacked(slots, stack([j.inputs for j in jobs]), plan=plan)
        return [(o, None) for o in unstack(outputs, len(jobs))]
    losses = runtime.train_round(slots, stack([j.inputs for j in jobs]), torch.stack([j.targets for j in jobs]),
                                 plan=plan)
    return [(None, losses[i].reshape(1)) for i in range(len(jobs))]
