"""The coordinator: one process, one event loop, no model code on its hot path.

Each turn of the loop is five named steps: receive from clients, receive from
workers, check the workers' health, expire jobs past their deadline, dispatch queued
work. Messages are routed through tables from message type to handler.
"""

from __future__ import annotations

import heapq
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

from core.bank import leftover_shm, unlink_shm
from core.codec import (
    PROTOCOL_VERSION,
    coordinator_client_codec,
    coordinator_worker_codec,
    unbundle,
)
from core.definition import build_definition
from core.device import resolve_device
from core.errors import (
    CohortError,
    JobFailed,
    JobTimeout,
    Overloaded,
    ProtocolError,
    UnknownModel,
    WorkerDied,
)
from core.messages import (
    Ack,
    BarrierRequest,
    CopyWeights,
    ErrorReply,
    GetWeights,
    Heartbeat,
    Hello,
    HelloReply,
    InitWorker,
    JobDone,
    JobError,
    JobResult,
    JobResults,
    ListModels,
    ModelInfo,
    ModelsReply,
    Replies,
    Requests,
    RunJob,
    RunJobs,
    SetWeights,
    Shutdown,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
    SubmitJob,
    WeightsReply,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
)
from core.spec import GroupSpec, ModelKey
from core.tensors import check_buffers, decode_tensors, encode_tensors, join_rows, slice_rows
from scheduler import __version__
from scheduler.barrier import Barrier, Barriers
from scheduler.config import Config
from scheduler.jobs import Job, Part
from scheduler.mps import MpsDaemon
from scheduler.placement import place
from scheduler.security import CurveServer
from scheduler.snapshots import SnapshotWriter
from scheduler.stats import JobStats
from scheduler.validate import check_inputs, check_op, check_targets, parse_group, parse_model
from scheduler.workerpool import WorkerHandle, stop_processes

log = logging.getLogger("cohort")

IDLE_POLL_MS = 50
HEALTH_EVERY_S = 0.02
MAX_RESTARTS = 5  # deaths of one worker within RESTART_WINDOW_S before cohort stops restarting it
RESTART_WINDOW_S = 60.0
STARTUP_PROGRESS_S = 5.0
SNAPSHOT_FINISH_S = 120.0  # at shutdown, how long snapshot files being written may take to finish


class StartupError(CohortError):
    """The coordinator could not start (a worker failed, or did not answer in time)."""


class Coordinator:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cc = config.coordinator
        self.specs: dict[str, GroupSpec] = {g.name: build_definition(g) for g in config.groups}
        self.device = str(resolve_device(self.cc.device))
        self.run_id = uuid.uuid4().hex[:8]
        self.run_dir = tempfile.mkdtemp(prefix=f"cohort-{self.run_id}-")  # 0700: private ipc:// paths
        self.mps = MpsDaemon(self.cc.mps, thread_percentage=self.cc.mps_thread_percentage)
        blocks = place([(name, len(s.indices)) for name, s in self.specs.items()], self.cc.workers)
        self.workers = [
            WorkerHandle(w, [b for b in blocks if b.worker == w], []) for w in range(self.cc.workers)
        ]
        for w in self.workers:
            w.specs = [self._spec_for_block(b.group, b.indices) for b in w.blocks]
        # (worker, slot) of every model: placement never changes, a replacement takes the same models.
        self.slot_of: dict[ModelKey, tuple[int, int]] = {
            (b.group, i): (w.id, slot) for w in self.workers for b in w.blocks for slot, i in enumerate(b.indices)
        }
        from scheduler.weights import WeightStore

        self.weights = WeightStore(self.specs)
        self.barriers = Barriers()
        self.jobs: dict[int, Job] = {}
        self.deadlines: list[tuple[float, int]] = []
        self.versions: dict[ModelKey, int] = {(g, i): 0 for g, s in self.specs.items() for i in s.indices}
        self.queued_per_model: Counter[ModelKey] = Counter()
        self.stats = JobStats()
        self.next_job_id = 1
        self.started = time.monotonic()
        self.stopping = False
        self._last_health = 0.0
        self._last_snapshot = time.monotonic()
        self._snapshot_pending = False
        self.snapshot_writers: list[tuple[SnapshotWriter, tuple[bytes, int] | None]] = []
        self.curve: CurveServer | None = None
        self._replies: dict[bytes, list[tuple[Any, list[Any]]]] = {}
        self._polled: tuple[Any, ...] = ()
        self._poll = zmq.Poller()
        self.context: zmq.Context[Any] = zmq.Context()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.client_codec = coordinator_client_codec()
        self.worker_codec = coordinator_worker_codec()
        self.client_handlers: dict[type, Callable[[bytes, Any, list[Any]], None]] = {
            Hello: self._on_hello,
            SubmitJob: self._on_submit,
            BarrierRequest: self._on_barrier,
            ListModels: self._on_models,
            GetWeights: self._on_get_weights,
            SetWeights: self._on_set_weights,
            CopyWeights: self._on_copy_weights,
            SnapshotRequest: self._on_snapshot,
            StatsRequest: self._on_stats,
        }
        self.worker_handlers: dict[type, Callable[[WorkerHandle, Any, list[Any]], None]] = {
            WorkerHello: self._on_worker_hello,
            WorkerReady: self._on_worker_ready,
            JobResult: self._on_job_result,
            JobError: self._on_job_error,
            JobResults: self._on_job_results,
            Heartbeat: self._on_heartbeat,
            WorkerFailed: self._on_worker_failed,
        }

    def _spec_for_block(self, group: str, indices: list[int]) -> GroupSpec:
        spec = self.specs[group]
        hparams = {k: [v[i] for i in indices] for k, v in spec.hparams.items()}
        import msgspec

        return msgspec.structs.replace(spec, indices=indices, hparams=hparams)

    # ================================================================== lifecycle

    def start(self) -> None:
        """Bind, start MPS and the workers, and wait until every worker is ready."""
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, self.cc.max_message_bytes + (1 << 20))
        self.frontend.setsockopt(zmq.RCVHWM, 0)
        # A client that reads late must still get every answer: with a send limit ROUTER would
        # drop them. What is queued is bounded by the jobs admitted (max_queued) and the requests.
        self.frontend.setsockopt(zmq.SNDHWM, 0)
        if self.cc.curve_secret_key:
            self.curve = CurveServer(self.context, self.cc.curve_secret_key, self.cc.curve_allowed_keys)
            self.curve.apply(self.frontend)
        self.frontend.bind(self.cc.address)
        self.mps.start(torch.device(self.device).type)
        for w in self.workers:
            self._spawn(w)
        began = shown = time.monotonic()
        deadline = began + self.cc.start_timeout_s
        while not all(w.state == "ready" for w in self.workers):
            if time.monotonic() - shown > STARTUP_PROGRESS_S:  # big models or many of them: say it is working
                shown = time.monotonic()
                ready = sum(w.state == "ready" for w in self.workers)
                log.info("starting: %d/%d workers ready after %.0f s (timeout %.0f s)", ready, len(self.workers),
                         shown - began, self.cc.start_timeout_s)
            if self.stopping:
                raise StartupError("interrupted during start-up")
            if time.monotonic() > deadline:
                slow = [w.id for w in self.workers if w.state != "ready"]
                raise StartupError(f"worker(s) {slow} not ready within {self.cc.start_timeout_s} s")
            self._receive_workers(timeout_ms=IDLE_POLL_MS)
            for w in self.workers:
                code = w.exited()
                if code is not None and w.state != "ready":
                    raise StartupError(f"worker {w.id} exited with code {code} during start-up (its output is above)")

    def _spawn(self, w: WorkerHandle) -> None:
        env = self.mps.worker_env(self.cc.workers)
        env["COHORT_LOG_LEVEL"] = logging.getLevelName(log.getEffectiveLevel())
        if "OMP_NUM_THREADS" not in os.environ:  # workers share the cores instead of each taking all
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.cc.workers))
        w.spawn(self.context, self.run_dir, self.run_id, env)

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def serve(self) -> None:
        """Run the loop until ``request_stop``."""
        while not self.stopping:
            self.step()

    def step(self, timeout_ms: int = IDLE_POLL_MS) -> None:
        busy = any(w.pending and w.state == "ready" for w in self.workers)
        events = dict(self._poller().poll(0 if busy else timeout_ms))
        if self.frontend in events:
            self._receive_clients()
        self._receive_workers(timeout_ms=0, ready=events)
        self._check_health()
        self._expire_deadlines()
        self._periodic_snapshot()
        self._poll_snapshots()
        self._dispatch()
        self._flush_replies()

    def _poller(self) -> zmq.Poller:
        """The poller over the client socket and every live worker socket, rebuilt when they change."""
        sockets = tuple(w.socket for w in self.workers if w.socket is not None)
        if sockets != self._polled:
            self._polled = sockets
            self._poll = zmq.Poller()
            self._poll.register(self.frontend, zmq.POLLIN)
            for socket in sockets:
                self._poll.register(socket, zmq.POLLIN)
        return self._poll

    def shutdown(self) -> None:
        """Stop every worker, remove every shared-memory segment, socket and directory."""
        for writer, _ in self.snapshot_writers:  # files being written are finished, not torn
            if not writer.wait(SNAPSHOT_FINISH_S):
                log.error("snapshot to %s not finished after %.0f s; stopping anyway", writer.directory, SNAPSHOT_FINISH_S)
        self._poll_snapshots()
        self._flush_replies()
        for w in self.workers:
            if w.socket is not None and w.state in ("ready", "starting"):
                w.send(self.worker_codec.encode(Shutdown()))
            w.state = "stopping"
        self.weights.close()
        stop_processes(self.workers, before_kill=self.mps.terminate_client)
        for w in self.workers:
            w.close_socket()
        for name in leftover_shm(f"cohort-{self.run_id}-"):
            unlink_shm(name)
        self.frontend.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.context.term()
        self.mps.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.cc.address.startswith("ipc://"):
            try:
                os.unlink(self.cc.address[len("ipc://"):])
            except OSError:
                pass

    # ================================================================== step 1: clients

    def _receive_clients(self) -> None:
        for _ in range(1000):  # bounded, so workers are served between bursts of clients
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = frames[0].bytes
            try:
                message, buffers = self.client_codec.decode([f.buffer for f in frames[1:]])
            except CohortError as exc:
                self._reply_error(client, 0, exc)
                continue
            if isinstance(message, Requests):
                try:
                    items = unbundle(message.requests, buffers)
                except CohortError as exc:
                    self._reply_error(client, message.req_id, exc)
                    continue
                for item, own in items:
                    self._handle_request(client, item, own)
            else:
                self._handle_request(client, message, buffers)

    def _handle_request(self, client: bytes, message: Any, buffers: list[Any]) -> None:
        try:
            handler = self.client_handlers.get(type(message))
            if handler is None:
                raise ProtocolError(f"message {type(message).__name__} is not a request")
            handler(client, message, buffers)
        except CohortError as exc:
            if isinstance(message, SubmitJob):
                self.stats.record_rejected(type(exc).__name__)
            self._reply_error(client, message.req_id, exc)
        except Exception as exc:  # a bad request never takes the coordinator down
            log.exception("request failed")
            self._reply_error(client, message.req_id, JobFailed(f"coordinator error: {type(exc).__name__}: {exc}"))

    def _reply(self, client: bytes, message: Any, buffers: list[Any] | None = None) -> None:
        """Queue a reply; ``_flush_replies`` sends each client's replies of this step as one message."""
        self._replies.setdefault(client, []).append((message, buffers or []))

    def _flush_replies(self) -> None:
        replies, self._replies = self._replies, {}
        for client, items in replies.items():
            if len(items) == 1:
                message, buffers = items[0]
            else:
                message = Replies(0, [m for m, _ in items])
                buffers = [b for _, own in items for b in own]
            try:
                self.frontend.send_multipart([client, *self.client_codec.encode(message, buffers)], zmq.NOBLOCK,
                                             copy=False)
            except zmq.ZMQError:
                pass  # the client has gone (ROUTER_MANDATORY) or stopped reading: nobody is left to tell

    def _reply_error(self, client: bytes, req_id: int, exc: CohortError) -> None:
        self._reply(client, ErrorReply(req_id, type(exc).__name__, exc.message, exc.remote_traceback))

    def _on_hello(self, client: bytes, msg: Hello, _: list[Any]) -> None:
        self._reply(client, HelloReply(msg.req_id, PROTOCOL_VERSION, __version__, self.cc.max_message_bytes))

    def _on_models(self, client: bytes, msg: ListModels, _: list[Any]) -> None:
        infos = []
        for w in self.workers:
            for b in w.blocks:
                for i in b.indices:
                    infos.append(ModelInfo(f"{b.group}/{i}", b.group, i, w.id, self.versions[(b.group, i)], w.device or self.device))
        infos.sort(key=lambda m: (m.group, m.index))
        self._reply(client, ModelsReply(msg.req_id, infos))

    def _on_submit(self, client: bytes, msg: SubmitJob, buffers: list[Any]) -> None:
        check_op(msg.op)
        n_in = len(msg.inputs.metas)
        size = check_buffers(msg.inputs, buffers[:n_in], self.cc.max_message_bytes)
        check_buffers(msg.targets, buffers[n_in:], self.cc.max_message_bytes - size)
        if msg.op in ("infer", "train_step"):
            group, index = parse_model(msg.target, self.specs)
            models = [(group, index)]
            stacked = None
        else:
            group = parse_group(msg.target, self.specs).name
            models = [(group, i) for i in self.specs[group].indices]
            stacked = len(models) if msg.op == "train_round" else None
        spec = self.specs[group]
        batch = check_inputs(spec, msg.inputs, stacked)
        check_targets(msg.op, msg.targets, batch, stacked)
        self._admit(models)
        now = time.monotonic()
        job = Job(self.next_job_id, client, msg.req_id, msg.op, group, models, now,
                  now + msg.timeout_s if msg.timeout_s else None)
        self.next_job_id += 1
        self._split(job, msg, buffers[:n_in], buffers[n_in:], stacked)
        job.fences = self.barriers.fences_for(models)
        self.jobs[job.id] = job
        self.queued_per_model.update(models)
        if job.deadline is not None:
            heapq.heappush(self.deadlines, (job.deadline, job.id))
        self.stats.record_submit()

    def _admit(self, models: list[ModelKey]) -> None:
        for m in models:
            w = self.workers[self.slot_of[m][0]]
            if w.state == "failed":
                raise WorkerDied(f"model {m[0]}/{m[1]} is on worker {w.id}, which kept crashing and is not restarted")
        if len(self.jobs) >= self.cc.max_queued:
            raise Overloaded(f"{len(self.jobs)} jobs queued or in flight (bound {self.cc.max_queued}); retry later")
        for m in models:
            if self.queued_per_model[m] >= self.cc.max_queued_per_model:
                raise Overloaded(f"model {m[0]}/{m[1]} has {self.queued_per_model[m]} jobs queued (bound "
                                 f"{self.cc.max_queued_per_model}); retry later")

    def _split(self, job: Job, msg: SubmitJob, inputs: list[Any], targets: list[Any], stacked: int | None) -> None:
        """One part per worker holding some of the job's models, its slots in ascending order."""
        by_worker: dict[int, list[tuple[int, int]]] = {}
        for model in job.models:
            worker, slot = self.slot_of[model]
            by_worker.setdefault(worker, []).append((slot, model[1]))
        for worker, pairs in by_worker.items():
            pairs.sort()
            slots, indices = [s for s, _ in pairs], [i for _, i in pairs]
            tree_in, buf_in, tree_t, buf_t = msg.inputs, inputs, msg.targets, targets
            if stacked is not None:
                lo, hi = indices[0], indices[-1] + 1
                tree_in, buf_in = slice_rows(msg.inputs, inputs, lo, hi)
                tree_t, buf_t = slice_rows(msg.targets, targets, lo, hi)
            part = Part(job, worker, slots, indices, tree_in, tree_t, [*buf_in, *buf_t])
            job.parts.append(part)
            self.workers[worker].pending.append(part)
        if len(job.parts) > 1:
            job.parts.sort(key=lambda p: p.indices[0])
        job.open_parts = len(job.parts)

    # ---------------------------------------------------------------- barriers and weights

    def _barrier(self, models: list[ModelKey] | None, action: Callable[[], None]) -> None:
        scope = None if models is None else frozenset(models)
        waiting = {j.id for j in self.jobs.values() if scope is None or any(m in scope for m in j.models)}
        self.barriers.add(Barrier(scope, waiting, action))

    def _guarded(self, client: bytes, req_id: int, models: list[ModelKey], fn: Callable[[], None]) -> Callable[[], None]:
        """An action that answers its own errors, and refuses to touch banks of a restarting worker."""

        def action() -> None:
            try:
                down = [m for m in models if not self.weights.is_mapped(m)]
                if down:
                    raise WorkerDied(f"the worker of {down[0][0]}/{down[0][1]} is restarting; retry")
                fn()
            except CohortError as exc:
                self._reply_error(client, req_id, exc)
            except Exception as exc:
                log.exception("weight operation failed")
                self._reply_error(client, req_id, JobFailed(f"{type(exc).__name__}: {exc}"))

        return action

    def _on_barrier(self, client: bytes, msg: BarrierRequest, _: list[Any]) -> None:
        models = None
        if msg.scope is not None:
            models = []
            for item in msg.scope:
                if "/" in item and item.rstrip("/") not in self.specs:
                    models.append(parse_model(item, self.specs))
                else:
                    spec = parse_group(item, self.specs)
                    models += [(spec.name, i) for i in spec.indices]
        scope = models if models is not None else sorted(self.versions)

        def done() -> None:
            self._refresh_host_copies(scope)
            self._reply(client, Ack(msg.req_id))

        self._barrier(models, done)

    def _refresh_host_copies(self, models: list[ModelKey]) -> None:
        """Keep the host copy a replacement worker is restored from: taken at every barrier."""
        for m in models:
            held = self.weights.host.get(m)
            if self.weights.is_mapped(m) and (held is None or held.version != self.versions[m]):
                self.weights.keep_host_copy(m, self.versions[m])

    def _periodic_snapshot(self) -> None:
        """Every ``snapshot_interval_s``: host copies of all models at a barrier, and files if asked."""
        interval = self.cc.snapshot_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self._last_snapshot < interval or self._snapshot_pending:
            return
        self._last_snapshot = now
        self._snapshot_pending = True
        models = sorted(self.versions)

        def take() -> None:
            self._snapshot_pending = False
            self._refresh_host_copies(models)
            # Files only when the last ones are written; the host copies (the restore point) always.
            if self.cc.snapshot_dir and not self._writing(Path(self.cc.snapshot_dir)):
                held = [m for m in models if m in self.weights.host]
                self._write_snapshot(Path(self.cc.snapshot_dir), held, None)

        self._barrier(None, take)

    def _on_get_weights(self, client: bytes, msg: GetWeights, _: list[Any]) -> None:
        model = parse_model(msg.model, self.specs)

        def read() -> None:
            self._refresh_host_copies([model])
            tree, buffers = encode_tensors(self.weights.get(model))
            self._reply(client, WeightsReply(msg.req_id, tree), buffers)

        self._barrier([model], self._guarded(client, msg.req_id, [model], read))

    def _on_set_weights(self, client: bytes, msg: SetWeights, buffers: list[Any]) -> None:
        model = parse_model(msg.model, self.specs)
        if msg.weights.layout != "dict":
            raise ProtocolError("set_weights needs a dict of tensors")
        weights = decode_tensors(msg.weights, buffers, self.cc.max_message_bytes)

        def write() -> None:
            self.weights.set(model, weights)
            self.versions[model] += 1
            self._reply(client, Ack(msg.req_id, {"version": self.versions[model]}))

        self._barrier([model], self._guarded(client, msg.req_id, [model], write))

    def _on_copy_weights(self, client: bytes, msg: CopyWeights, _: list[Any]) -> None:
        src, dst = parse_model(msg.src, self.specs), parse_model(msg.dst, self.specs)
        if src[0] != dst[0]:
            raise UnknownModel(f"copy_weights needs two models of one group, got {msg.src!r} and {msg.dst!r}")

        def copy() -> None:
            self.weights.copy(src, dst)
            self.versions[dst] = self.versions[src]
            self._reply(client, Ack(msg.req_id, {"version": self.versions[dst]}))

        self._barrier([src, dst], self._guarded(client, msg.req_id, [src, dst], copy))

    def _writing(self, directory: Path) -> bool:
        """Whether a snapshot to ``directory`` is being written (two at once would mix their files)."""
        return any(writer.directory == directory for writer, _ in self.snapshot_writers)

    def _refuse_if_writing(self, directory: Path) -> None:
        if self._writing(directory):
            raise Overloaded(f"a snapshot to {directory} is being written; retry once it is done (stats()['snapshots'])")

    def _on_snapshot(self, client: bytes, msg: SnapshotRequest, _: list[Any]) -> None:
        directory = Path(msg.path)
        models = sorted(self.versions)
        self._refuse_if_writing(directory)  # at once, rather than after waiting for a barrier

        def save() -> None:
            self._refuse_if_writing(directory)  # one may have started while this one waited for its barrier
            for m in models:  # the consistent copy, taken here at the barrier; files follow
                self.weights.keep_host_copy(m, self.versions[m])
            self._write_snapshot(directory, models, (client, msg.req_id))

        self._barrier(None, self._guarded(client, msg.req_id, models, save))

    def _write_snapshot(self, directory: Path, models: list[ModelKey], asker: tuple[bytes, int] | None) -> None:
        """Write the host copies of ``models`` on a thread; ``asker`` is answered when the files are there."""
        writer = SnapshotWriter(directory, self.weights.snapshot_files(directory, models)).start()
        log.info("snapshot of %d models to %s started (%.1f MB)", writer.total, directory, writer.total_bytes / 1e6)
        self.snapshot_writers.append((writer, asker))

    def _poll_snapshots(self) -> None:
        """Answer the snapshots whose files are written (or failed)."""
        for item in [item for item in self.snapshot_writers if item[0].finished]:
            self.snapshot_writers.remove(item)
            writer, asker = item
            took = (writer.finished_at or writer.started) - writer.started
            if writer.error is not None:
                log.error("snapshot to %s failed: %s", writer.directory, writer.error)
            else:
                log.info("snapshot of %d models to %s written in %.2f s", writer.total, writer.directory, took)
            if asker is None:
                continue
            if writer.error is not None:
                self._reply_error(asker[0], asker[1], JobFailed(f"snapshot to {writer.directory}: {writer.error}"))
            else:
                self._reply(asker[0], Ack(asker[1], {"path": str(writer.directory), "files": writer.total,
                                                      "bytes": writer.total_bytes, "seconds": round(took, 3)}))

    def _on_stats(self, client: bytes, msg: StatsRequest, _: list[Any]) -> None:
        self._reply(client, StatsReply(msg.req_id, self.stats_dict()))

    def stats_dict(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.started
        models = {
            f"{g}/{i}": {"jobs": self.stats.per_model.get(f"{g}/{i}", 0), "version": v,
                         "worker": self.weights.location[(g, i)].worker if (g, i) in self.weights.location else None,
                         "queued": self.queued_per_model.get((g, i), 0)}
            for (g, i), v in sorted(self.versions.items())
        }
        workers = [
            {"id": w.id, "pid": w.pid, "state": w.state, "device": w.device or self.device, "models": w.model_ids(),
             "queued": len(w.pending), "in_flight": len(w.in_flight), "jobs_done": w.jobs_done, "restarts": w.restarts,
             "calls": w.calls, "joined_jobs": w.joined_jobs}
            for w in self.workers
        ]
        return {
            "cohort_version": __version__,
            "pid": os.getpid(),
            "run_id": self.run_id,
            "uptime_s": round(uptime, 3),
            "address": self.cc.address,
            "device": self.device,
            "mps": self.mps.state(),
            "workers": workers,
            "queued": sum(len(w.pending) for w in self.workers),
            "snapshots": [writer.progress() for writer, _ in self.snapshot_writers],
            "in_flight": sum(len(w.in_flight) for w in self.workers),
            **self.stats.summary(uptime),
            "models": models,
        }

    # ================================================================== step 2: workers

    def _receive_workers(self, timeout_ms: int = 0, ready: dict[Any, int] | None = None) -> None:
        if ready is None:
            poller = zmq.Poller()
            for w in self.workers:
                if w.socket is not None:
                    poller.register(w.socket, zmq.POLLIN)
            ready = dict(poller.poll(timeout_ms))
        for w in self.workers:
            if w.socket is None or w.socket not in ready:
                continue
            for _ in range(1000):
                if w.socket is None:
                    break
                try:
                    frames = w.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                w.last_seen = time.monotonic()
                try:
                    message, buffers = self.worker_codec.decode([f.buffer for f in frames])
                    self.worker_handlers[type(message)](w, message, buffers)
                except StartupError:
                    raise
                except Exception:  # a worker's bad message is a bug to log, never a coordinator crash
                    log.exception("worker %d sent a message that could not be handled", w.id)

    def _on_worker_hello(self, w: WorkerHandle, msg: WorkerHello, _: list[Any]) -> None:
        w.pid = msg.pid
        init = InitWorker(w.id, self.device, self.cc.streams, w.specs, w.shm_prefix, restore=w.restore)
        w.send(self.worker_codec.encode(init))

    def _on_worker_ready(self, w: WorkerHandle, msg: WorkerReady, _: list[Any]) -> None:
        w.device = msg.device
        self.weights.map_worker(w.id, msg.banks, w.placed)
        for b in w.blocks:
            for i in b.indices:
                key = (b.group, i)
                if w.restore and key in self.weights.host:
                    self.versions[key] = self.weights.restore(key)
                else:
                    self.weights.keep_host_copy(key, self.versions[key])
        if w.restore:
            log.warning("worker %d restarted (pid %d); models restored: %s", w.id, w.pid,
                        ", ".join(f"{b.group}/{i}@v{self.versions[(b.group, i)]}" for b in w.blocks for i in b.indices))
        w.state = "ready"

    def _on_heartbeat(self, w: WorkerHandle, msg: Heartbeat, _: list[Any]) -> None:
        w.calls, w.joined_jobs = msg.calls, msg.joined_jobs
        w.quiet_until = time.monotonic() + msg.quiet_s if msg.quiet_s > 0 else 0.0

    def _on_worker_failed(self, w: WorkerHandle, msg: WorkerFailed, _: list[Any]) -> None:
        if w.state == "starting" and not w.restore:
            raise StartupError(f"worker {w.id} failed to start: {msg.error}: {msg.message}")
        log.error("worker %d failed to restart: %s: %s", w.id, msg.error, msg.message)
        self._worker_died(w, f"restart failed: {msg.message}")

    def _on_job_results(self, w: WorkerHandle, msg: JobResults, buffers: list[Any]) -> None:
        for result, own in unbundle(msg.results, buffers):
            self.worker_handlers[type(result)](w, result, own)

    def _on_job_result(self, w: WorkerHandle, msg: JobResult, buffers: list[Any]) -> None:
        part = w.in_flight.pop(msg.job_id, None)
        if part is None:
            return
        w.jobs_done += 1
        self._finish_part(part, (msg.outputs, buffers, msg.losses), None)

    def _on_job_error(self, w: WorkerHandle, msg: JobError, _: list[Any]) -> None:
        part = w.in_flight.pop(msg.job_id, None)
        if part is None:
            return
        w.jobs_done += 1
        from core.errors import error_from_wire

        self._finish_part(part, None, error_from_wire(msg.error, msg.message, msg.traceback))

    def _finish_part(self, part: Part, result: Any, error: CohortError | None) -> None:
        job = part.job
        if error is None:
            job.results[part.worker] = result
        elif not job.answered:
            self._answer(job, error)
        job.open_parts -= 1
        if job.open_parts > 0:
            return
        if not job.answered:
            self._answer(job, None)
        self._retire(job)

    def _answer(self, job: Job, error: CohortError | None) -> None:
        job.answered = True
        latency = time.monotonic() - job.accepted
        self.stats.record_finish([f"{g}/{i}" for g, i in job.models], latency, None if error is None else type(error).__name__)
        if error is not None:
            self._reply_error(job.client, job.req_id, error)
            return
        if job.op == "train_round" or job.op == "train_step":
            losses = [loss for p in job.parts for loss in (job.results[p.worker][2] or [])]
            for m in job.models:
                self.versions[m] += 1
            self._reply(job.client, JobDone(job.req_id, losses=losses))
        elif job.op == "ensemble" and len(job.parts) > 1:
            tree, buffers = join_rows([(job.results[p.worker][0], job.results[p.worker][1]) for p in job.parts])
            self._reply(job.client, JobDone(job.req_id, tree), buffers)
        else:
            tree, buffers, _ = job.results[job.parts[0].worker]
            self._reply(job.client, JobDone(job.req_id, tree), buffers)

    def _retire(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.queued_per_model.subtract(job.models)
        for m in job.models:
            if self.queued_per_model[m] <= 0:
                del self.queued_per_model[m]
        self.barriers.job_finished(job.id)

    # ================================================================== step 3: health

    def _check_health(self) -> None:
        now = time.monotonic()
        if now - self._last_health < HEALTH_EVERY_S:
            return
        self._last_health = now
        for w in self.workers:
            if w.state not in ("ready", "starting"):
                continue
            code = w.exited()
            if code is not None:
                self._worker_died(w, f"process exited with code {code}")
            elif w.state == "ready" and now - w.last_seen > self.cc.heartbeat_timeout_s and now > w.quiet_until:
                self._worker_died(w, f"no heartbeat for {now - w.last_seen:.1f} s")
            elif w.state == "starting" and now - w.started_at > self.cc.start_timeout_s:
                self._worker_died(w, f"not ready within {self.cc.start_timeout_s} s")

    def _worker_died(self, w: WorkerHandle, reason: str) -> None:
        """Unmap first, then fail what was in flight, keep what was queued, and start a replacement."""
        self.weights.drop_worker(w.id)
        log.error("worker %d (pid %d) died: %s", w.id, w.pid, reason)
        self.mps.terminate_client(w.pid)
        w.kill()
        w.close_socket()
        for name in leftover_shm(w.shm_prefix):
            unlink_shm(name)
        in_flight = list(w.in_flight.values())
        w.in_flight.clear()
        started, unstarted = self._maybe_started(w, in_flight)
        for part in started:
            self._finish_part(part, None, WorkerDied(f"worker {w.id} died while running the job: {reason}"))
        for part in reversed(unstarted):  # back to the front of the queue, in their order
            part.sent = False
            w.pending.appendleft(part)
        w.state = "dead"
        w.restarts += 1
        now = time.monotonic()
        w.deaths = [t for t in w.deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(w.deaths) > MAX_RESTARTS:  # a crash loop: restarting again would only fail again
            log.error("worker %d died %d times in %.0f s; not restarting it", w.id, len(w.deaths), RESTART_WINDOW_S)
            w.state = "failed"
            for part in list(w.pending):
                self._finish_part(part, None, WorkerDied(f"worker {w.id} is down after {w.restarts} failures"))
            w.pending.clear()
            return
        w.restore = True
        self._spawn(w)

    @staticmethod
    def _maybe_started(w: WorkerHandle, in_flight: list[Part]) -> tuple[list[Part], list[Part]]:
        """Split a dead worker's parts into those that may have run and those that surely did not.

        A CPU worker runs its parts one at a time in the order sent, so only the oldest
        unanswered one can have started; the rest were still in its socket. A GPU worker
        puts every part it receives on a stream at once, so any of them may have run.
        """
        if (w.device or "cpu").startswith("cpu"):
            return in_flight[:1], in_flight[1:]
        return in_flight, []

    # ================================================================== step 4: deadlines

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self.deadlines)
            job = self.jobs.get(job_id)
            if job is None or job.answered or any(p.sent for p in job.parts):
                continue  # finished, or already running: it will answer on its own
            self._answer(job, JobTimeout(f"job passed its {job.deadline - job.accepted:.3f} s deadline before it started"))
            for part in job.parts:
                self.workers[part.worker].pending.remove(part)
            job.open_parts = 0
            self._retire(job)

    # ================================================================== step 5: dispatch

    def _dispatch(self) -> None:
        for w in self.workers:
            if w.state != "ready":
                continue
            batch: list[Part] = []
            while w.pending and len(w.in_flight) + len(batch) < self.cc.window:
                part = w.pending[0]
                job = part.job
                if job.answered:  # another part failed: do not run the rest
                    w.pending.popleft()
                    self._finish_part(part, None, None)
                    continue
                if job.fenced():
                    break
                batch.append(w.pending.popleft())
            if batch and not self._send_parts(w, batch):
                w.pending.extendleft(reversed(batch))

    def _send_parts(self, w: WorkerHandle, parts: list[Part]) -> bool:
        """One message for every part sent to a worker in this step: one system call, one wake-up."""
        commands = [RunJob(p.job.id, p.job.op, p.job.group, p.slots, p.inputs, p.targets, p.job.deadline)
                    for p in parts]
        buffers = [b for p in parts for b in p.buffers]
        message = commands[0] if len(commands) == 1 else RunJobs(commands)
        if not w.send(self.worker_codec.encode(message, buffers)):
            return False
        for part in parts:
            part.sent = True
            w.in_flight[part.job.id] = part
        return True


def run(config: Config) -> int:
    """Start a coordinator, serve until SIGINT or SIGTERM, then shut down cleanly."""
    coordinator = Coordinator(config)
    signal.signal(signal.SIGINT, coordinator.request_stop)
    signal.signal(signal.SIGTERM, coordinator.request_stop)
    try:
        coordinator.start()
        describe(coordinator)
        coordinator.serve()
    finally:
        log.info("shutting down")
        coordinator.shutdown()
    log.info("stopped")
    return 0


def describe(c: Coordinator) -> None:
    """What a user needs to see at start-up: where it listens, what runs where, on which device."""
    mps = c.mps.state()
    log.info("cohort %s listening on %s (device %s, MPS %s: %s)", __version__, c.cc.address, c.device, mps["mode"], mps["reason"])
    for w in c.workers:
        groups = ", ".join(f"{b.group}/{b.start}..{b.start + b.count - 1}" for b in w.blocks) or "(no models)"
        log.info("worker %d pid %d on %s: %s", w.id, w.pid, w.device, groups)
