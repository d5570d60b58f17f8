"""Weights, host copies, snapshots and barriers: requests that become jobs on the workers.

Each is a job in the owning worker's queue (``core.messages.BANK_OPS``), so it sees exactly
the jobs accepted before it and nothing after, with no barrier needed:

- ``get_weights``: ``read`` on the model's worker; its frames go back to the client as they are;
- ``set_weights``: ``write`` (checked against the group's entries from the headers first);
- ``copy_weights``: ``copy`` inside one worker, or ``read`` everything on one worker then
  ``write`` it on the other (the write holds its worker's queue until the read is done);
- host copies: ``mirror`` on every worker of the scope, at every barrier and every
  ``snapshot_interval_s``; ``snapshot``: host copies of every model, then files written on a
  thread (``scheduler.snapshots``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BadInput, CohortError, JobFailed, Overloaded, ProtocolError, UnknownModel
from core.messages import (
    Ack,
    BarrierRequest,
    CopyWeights,
    GetHparams,
    GetWeights,
    ResetModel,
    SetHparams,
    SetWeights,
    SnapshotRequest,
    WeightsReply,
)
from core.spec import GroupSpec, ModelKey
from core.tensors import TensorTree, check_buffers
from scheduler.barrier import Barrier, Barriers
from scheduler.config import CoordinatorConfig, hparam_problem
from scheduler.host_copies import HostCopies
from scheduler.jobs import Job
from scheduler.snapshots import SnapshotWriter
from scheduler.validate import parse_group, parse_model

log = logging.getLogger("cohort")

Reply = Callable[[bytes, Any, list[Any] | None], None]
ReplyError = Callable[[bytes, int, CohortError], None]


@dataclass
class JobQueue:
    """What weight operations need of the coordinator: make a bank job, and see what is queued."""

    bank_job: Callable[..., Job]  # (op, models, on_done, *, option, inputs, buffers, source, blocked, hparams,
    #                                 seed, timeout): see Coordinator.bank_job
    feed: Callable[[Job, TensorTree, list[Any]], None]  # a blocked job's inputs have come: it may run
    fail: Callable[[Job, CohortError], None]  # a blocked job will never run: answer it with this error
    given_up: Callable[[ModelKey], bool]  # the model's worker kept crashing and is not restarted
    jobs: dict[int, Job]


class WeightOps:
    def __init__(self, config: CoordinatorConfig, specs: dict[str, GroupSpec], versions: dict[ModelKey, int],
                 host: HostCopies, barriers: Barriers, queue: JobQueue, reply: Reply, reply_error: ReplyError) -> None:
        self.config = config
        self.specs = specs
        self.versions = versions
        self.host = host
        self.barriers = barriers
        self.queue = queue
        self.reply = reply
        self.reply_error = reply_error
        self.writers: list[tuple[SnapshotWriter, tuple[bytes, int] | None]] = []
        self._last_refresh = time.monotonic()
        self._refreshing = False

    # ------------------------------------------------------------------ weights

    def on_get_weights(self, client: bytes, msg: GetWeights, _: list[Any]) -> None:
        model = parse_model(msg.model, self.specs)

        def done(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            tree, buffers, _ = next(iter(job.results.values()))
            self.reply(client, WeightsReply(msg.req_id, tree), buffers)

        option = "all" if msg.optimizer_state else "weights"
        self.queue.bank_job("read", [model], done, option=option, timeout=msg.timeout_s)

    def on_set_weights(self, client: bytes, msg: SetWeights, buffers: list[Any]) -> None:
        model = parse_model(msg.model, self.specs)
        check_weights(self.specs[model[0]], msg.weights, buffers, self.config.max_message_bytes, f"set_weights {msg.model}",
                      msg.optimizer_state)

        def done(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            self.versions[model] += 1
            self.reply(client, Ack(msg.req_id, {"version": self.versions[model]}), None)

        self.queue.bank_job("write", [model], done, option="all" if msg.optimizer_state else "weights",
                            inputs=msg.weights, buffers=buffers, timeout=msg.timeout_s)

    def on_copy_weights(self, client: bytes, msg: CopyWeights, _: list[Any]) -> None:
        src, dst = parse_model(msg.src, self.specs), parse_model(msg.dst, self.specs)
        if src[0] != dst[0]:
            raise UnknownModel(f"copy_weights needs two models of one group, got {msg.src!r} and {msg.dst!r}")

        def done(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            self.versions[dst] = copied_version[0]
            self.reply(client, Ack(msg.req_id, {"version": self.versions[dst]}), None)

        copied_version = [0]
        if self.host.place[src].worker == self.host.place[dst].worker:
            def copied(job: Job, error: CohortError | None) -> None:
                copied_version[0] = self.versions[src]  # the source's jobs before the copy are all answered
                done(job, error)

            self.queue.bank_job("copy", [dst], copied, source=[src], timeout=msg.timeout_s)
            return
        write = self.queue.bank_job("write", [dst], done, option="all", blocked=True, timeout=msg.timeout_s)

        def read(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.queue.fail(write, error)
            copied_version[0] = self.versions[src]
            tree, buffers, _ = next(iter(job.results.values()))
            self.queue.feed(write, tree, buffers)

        self.queue.bank_job("read", [src], read, option="all", timeout=msg.timeout_s)

    # ------------------------------------------------------------------ hyperparameters and new trials

    def on_set_hparams(self, client: bytes, msg: SetHparams, _: list[Any]) -> None:
        """New hyperparameters from the models' next step on: a job in their queue, like a step."""
        models = self._models_of(msg.target)
        spec = self.specs[models[0][0]]
        if not msg.values:
            raise BadInput("set_hparams needs at least one value, e.g. set_hparams('mlp/0', lr=0.01)")
        per_model: dict[str, dict[ModelKey, float]] = {}
        for name, values in msg.values.items():
            if len(values) not in (1, len(models)):
                raise BadInput(f"set_hparams {msg.target}: {name} has {len(values)} values; give one, or one per "
                               f"model ({len(models)})")
            values = values * len(models) if len(values) == 1 else values
            for v in values:
                problem = hparam_problem(spec.optimizer, name, v) if math.isfinite(v) else f"{name} = {v} is not finite"
                if problem is not None:
                    raise BadInput(f"set_hparams {msg.target}: {problem}")
            per_model[name] = dict(zip(models, values))

        def done(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            self.reply(client, Ack(msg.req_id, {"models": len(models)}), None)

        self.queue.bank_job("set_hparams", models, done, hparams=per_model, timeout=msg.timeout_s)

    def on_get_hparams(self, client: bytes, msg: GetHparams, _: list[Any]) -> None:
        model = parse_model(msg.model, self.specs)
        names = list(self.specs[model[0]].hparams)

        def done(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            values = next(iter(job.results.values()))[2] or []
            detail: dict[str, Any] = dict(zip(names, values))
            detail["step"] = int(values[len(names)])
            self.reply(client, Ack(msg.req_id, detail), None)

        self.queue.bank_job("get_hparams", [model], done, timeout=msg.timeout_s)

    def on_reset(self, client: bytes, msg: ResetModel, _: list[Any]) -> None:
        model = parse_model(msg.model, self.specs)

        def done(job: Job, error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            self.versions[model] += 1
            self.reply(client, Ack(msg.req_id, {"version": self.versions[model]}), None)

        self.queue.bank_job("reset", [model], done, seed=msg.seed, timeout=msg.timeout_s)

    def _models_of(self, target: str) -> list[ModelKey]:
        """A model id's model, or a group's models in index order."""
        if target.rstrip("/") in self.specs:
            spec = self.specs[target.rstrip("/")]
            return [(spec.name, i) for i in spec.indices]
        return [parse_model(target, self.specs)]

    # ------------------------------------------------------------------ host copies, barriers, snapshots

    def refresh(self, models: list[ModelKey], then: Callable[[CohortError | None], None] | None = None) -> list[Job]:
        """Host copies of ``models``, one ``mirror`` job per group and worker; ``then`` once all are done."""
        by_block: dict[tuple[int, str], list[ModelKey]] = {}
        for m in models:
            if self.queue.given_up(m):  # nothing runs there any more: its last host copy stays
                continue
            by_block.setdefault((self.host.place[m].worker, m[0]), []).append(m)
        left = [len(by_block)]
        errors: list[CohortError] = []

        def one_done(job: Job, error: CohortError | None) -> None:
            if error is None:
                self.host.mirrored(job.models, self.versions)
            else:
                errors.append(error)
            left[0] -= 1
            if left[0] == 0 and then is not None:
                then(errors[0] if errors else None)

        self.host.copying([m for block in by_block.values() for m in block])
        jobs = [self.queue.bank_job("mirror", block, one_done) for block in by_block.values()]
        if not jobs and then is not None:
            then(None)
        return jobs

    def on_barrier(self, client: bytes, msg: BarrierRequest, _: list[Any]) -> None:
        models = None if msg.scope is None else scope_models(msg.scope, self.specs)
        scope = models if models is not None else sorted(self.versions)
        # The host copies go in the queues behind everything accepted so far; the barrier
        # waits for them too, so a replacement after it starts from this point.
        self.refresh(scope)
        frozen = None if models is None else frozenset(models)
        waiting = {j.id for j in self.queue.jobs.values() if frozen is None or any(m in frozen for m in j.models)}
        self.barriers.add(Barrier(frozen, waiting, lambda: self.reply(client, Ack(msg.req_id), None)))

    def periodic(self) -> None:
        """Every ``snapshot_interval_s``: host copies of every model, and files if asked."""
        interval = self.config.snapshot_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self._last_refresh < interval or self._refreshing:
            return
        self._last_refresh = now
        self._refreshing = True
        models = sorted(self.versions)

        def then(error: CohortError | None) -> None:
            self._refreshing = False
            # Files only when the last ones are written; the host copies (the restore point) always.
            directory = self.config.snapshot_dir
            if error is None and directory and not self.writing(Path(directory)):
                self.write_snapshot(Path(directory), [m for m in models if self.host.held(m)], None)

        self.refresh(models, then)

    def on_snapshot(self, client: bytes, msg: SnapshotRequest, _: list[Any]) -> None:
        directory = Path(msg.path)
        self.refuse_if_writing(directory)  # at once, rather than after the host copies
        models = sorted(self.versions)

        def then(error: CohortError | None) -> None:
            if error is not None:
                return self.reply_error(client, msg.req_id, error)
            try:
                self.refuse_if_writing(directory)  # one may have started meanwhile
            except CohortError as exc:
                return self.reply_error(client, msg.req_id, exc)
            self.write_snapshot(directory, models, (client, msg.req_id))

        self.refresh(models, then)

    def writing(self, directory: Path) -> bool:
        """Whether a snapshot to ``directory`` is being written (two at once would mix their files)."""
        return any(writer.directory == directory for writer, _ in self.writers)

    def refuse_if_writing(self, directory: Path) -> None:
        if self.writing(directory):
            raise Overloaded(f"a snapshot to {directory} is being written; retry once it is done (stats()['snapshots'])")

    def taking(self) -> bool:
        """Whether a snapshot is still copying out of the host copies: no worker may write them meanwhile."""
        return any(not writer.taken.is_set() for writer, _ in self.writers)

    def write_snapshot(self, directory: Path, models: list[ModelKey], asker: tuple[bytes, int] | None) -> None:
        """Write the host copies of ``models`` on a thread; ``asker`` is answered when the files are there."""
        writer = SnapshotWriter(directory, self.host.snapshot_files(directory, models)).start()
        log.info("snapshot of %d models to %s started (%.1f MB)", writer.total, directory, writer.total_bytes / 1e6)
        self.writers.append((writer, asker))

    def poll_snapshots(self) -> None:
        """Answer the snapshots whose files are written (or failed)."""
        for item in [item for item in self.writers if item[0].finished]:
            self.writers.remove(item)
            writer, asker = item
            took = (writer.finished_at or writer.started) - writer.started
            if writer.error is not None:
                log.error("snapshot to %s failed: %s", writer.directory, writer.error)
            else:
                log.info("snapshot of %d models to %s written in %.2f s", writer.total, writer.directory, took)
            if asker is None:
                continue
            if writer.error is not None:
                self.reply_error(asker[0], asker[1], JobFailed(f"snapshot to {writer.directory}: {writer.error}"))
            else:
                self.reply(asker[0], Ack(asker[1], {"path": str(writer.directory), "files": writer.total,
                                                     "bytes": writer.total_bytes, "seconds": round(took, 3)}), None)

    def finish_writing(self, timeout_s: float) -> None:
        """At shutdown: files being written are finished, not torn."""
        for writer, _ in self.writers:
            if not writer.wait(timeout_s):
                log.error("snapshot to %s not finished after %.0f s; stopping anyway", writer.directory, timeout_s)
        self.poll_snapshots()


def scope_models(scope: list[str], specs: dict[str, GroupSpec]) -> list[ModelKey]:
    """The models a barrier's scope names: model ids and groups."""
    models: list[ModelKey] = []
    for item in scope:
        if "/" in item and item.rstrip("/") not in specs:
            models.append(parse_model(item, specs))
        else:
            spec = parse_group(item, specs)
            models += [(spec.name, i) for i in spec.indices]
    return models


def check_weights(spec: GroupSpec, tree: TensorTree, buffers: list[Any], max_bytes: int, what: str,
                  optimizer_state: bool = False) -> None:
    """A model's parameters and buffers (and optimizer entries), by name, shape and dtype, from the headers."""
    if tree.layout != "dict":
        raise ProtocolError(f"{what} needs a dict of tensors")
    check_buffers(tree, buffers, max_bytes)
    roles = ("param", "buffer", "state") if optimizer_state else ("param", "buffer")
    want = {e.name: e for e in spec.entries if e.role in roles}
    given = dict(zip(tree.keys, tree.metas))
    missing, extra = sorted(set(want) - set(given)), sorted(set(given) - set(want))
    if missing or extra:
        raise BadInput(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, entry in want.items():
        meta = given[name]
        if tuple(meta.shape) != tuple(entry.shape) or meta.dtype != entry.dtype:
            raise BadInput(f"{what}: {name!r} must be {entry.dtype} {list(entry.shape)}, got {meta.dtype} "
                           f"{list(meta.shape)}")

