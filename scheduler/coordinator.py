"""The coordinator: one process, one event loop, no model code and no GPU on its hot path.

Each turn of the loop (``step``) is a few named steps: receive from clients, receive from workers, check
the workers' health, expire jobs past their deadline, keep the host copies fresh, dispatch queued work,
send the replies. Messages are routed through tables from message type to handler. Jobs are clients'
(``infer``, ``train_round``, ...) or the coordinator's own bank operations (``scheduler.weight_ops``); both
queue per worker and keep their order. The workers' lives are ``scheduler.supervisor``'s.
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from core.arena import shm_identity
from core.bank import leftover_shm, unlink_shm
from core.codec import (
    PROTOCOL_VERSION,
    bundle_replies,
    coordinator_client_codec,
    coordinator_worker_codec,
    unbundle,
    zero_copy,
)
from core.definition import build_definition
from core.errors import (
    BadInput,
    CohortError,
    ConfigError,
    JobFailed,
    JobTimeout,
    Overloaded,
    ProtocolError,
    WorkerDied,
    error_from_wire,
)
from core.frames_io import NOBLOCK, readable, recv_frames, send_frames
from core.messages import (
    LOSS_OPS,
    BarrierRequest,
    CopyWeights,
    ErrorReply,
    GetHparams,
    GetWeights,
    Hello,
    HelloReply,
    JobAnswered,
    JobDone,
    JobError,
    JobResult,
    JobResults,
    ListModels,
    ModelInfo,
    ModelsReply,
    PassOn,
    Requests,
    ResetModel,
    RunJob,
    RunJobs,
    SetHparams,
    SetWeights,
    Shutdown,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
    SubmitJob,
)
from core.spec import GroupSpec, ModelKey
from core.tensors import NO_TENSORS, TensorTree, check_buffers, join_rows
from scheduler import __version__, gpu
from scheduler.barrier import Barriers
from scheduler.config import Config
from scheduler.host_copies import HostCopies
from scheduler.jobs import Job, Part, split
from scheduler.leftovers import KEEP_HOST_COPIES_ENV, alive, remove_stale
from scheduler.local_clients import LocalClients
from scheduler.loop_poll import LoopPoll
from scheduler.mps import MpsDaemon
from scheduler.placement import place
from scheduler.security import CurveServer
from scheduler.stats import JobStats
from scheduler.stats_view import stats_of
from scheduler.supervisor import StartupError, Supervisor, worker_malloc, worker_threads
from scheduler.validate import (
    check_inputs,
    check_op,
    check_targets,
    is_stacked,
    parse_group,
    parse_model,
)
from scheduler.weight_ops import JobQueue, WeightOps
from scheduler.workerpool import WorkerHandle

log = logging.getLogger("cohort")

IDLE_POLL_MS = 50
HEALTH_EVERY_S = 0.02
SNAPSHOT_FINISH_S = 120.0  # at shutdown, how long snapshot files being written may take to finish
WEIGHT_CHANGING = ("train_step", "train_round")

__all__ = ["Coordinator", "StartupError"]


class Coordinator:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cc = config.coordinator
        self.specs: dict[str, GroupSpec] = {g.name: build_definition(g) for g in config.groups}
        self.gpus = gpu.probe_gpus()
        self.plan = gpu.plan_device(self.cc.device, self.gpus, dict(os.environ), gpu.cuda_built())
        self.device = self.plan.device
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the pid: a later start can tell a dead run's leftovers
        self.run_dir = tempfile.mkdtemp(prefix=f"cohort-{self.run_id}-")  # 0700: private ipc:// paths
        self.mps = MpsDaemon(self.cc.mps, thread_percentage=self.cc.mps_thread_percentage)
        blocks = place([(name, len(s.indices)) for name, s in self.specs.items()], self.cc.workers)
        self.workers = [WorkerHandle(w, [b for b in blocks if b.worker == w], []) for w in range(self.cc.workers)]
        # (worker, slot) of every model: placement never changes, a replacement takes the same models.
        self.slot_of: dict[ModelKey, tuple[int, int]] = {
            (b.group, i): (w.id, slot) for w in self.workers for b in w.blocks for slot, i in enumerate(b.indices)
        }
        self.model_ids: dict[str, ModelKey] = {f"{g}/{i}": (g, i) for g, i in self.slot_of}
        self.host = HostCopies(self.specs, f"cohort-{self.run_id}-")
        self.shm_identity = shm_identity()  # told to clients: their arenas work where it is theirs too
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
        self.curve: CurveServer | None = None
        self.local: LocalClients | None = None  # clients on this host, over a Unix socket
        self._replies: dict[bytes, list[tuple[Any, list[Any]]]] = {}
        self.loop_poll = LoopPoll(-1, self.workers, None)  # the client socket's descriptor once bound (-1: none)
        self.context: zmq.Context[Any] = zmq.Context()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.client_codec = coordinator_client_codec()
        self.worker_codec = coordinator_worker_codec()
        self.supervisor = Supervisor(self.cc, self.workers, self.host, self.versions, self.mps, self.device, {},
                                     self.worker_codec, self._finish_part)
        self.supervisor.read_last = self._read_all_of
        for w in self.workers:
            self.supervisor.prepare(w, [self._spec_for_block(b.group, b.indices) for b in w.blocks])
        queue = JobQueue(self.bank_job, self._feed, self._fail_blocked, self.given_up, self.jobs)
        self.weight_ops = WeightOps(self.cc, self.specs, self.versions, self.host, self.barriers, queue, self._reply, self._reply_error)
        self.client_handlers: dict[type, Callable[[bytes, Any, list[Any]], None]] = {
            Hello: self._on_hello,
            SubmitJob: self._on_submit,
            BarrierRequest: self.weight_ops.on_barrier,
            ListModels: self._on_models,
            GetWeights: self.weight_ops.on_get_weights, SetWeights: self.weight_ops.on_set_weights,
            CopyWeights: self.weight_ops.on_copy_weights, SnapshotRequest: self.weight_ops.on_snapshot,
            SetHparams: self.weight_ops.on_set_hparams, GetHparams: self.weight_ops.on_get_hparams,
            ResetModel: self.weight_ops.on_reset,
            StatsRequest: self._on_stats,
        }
        self.worker_handlers: dict[type, Callable[[WorkerHandle, Any, list[Any]], None]] = {
            **self.supervisor.handlers,
            JobResult: self._on_job_result,
            JobError: self._on_job_error,
            JobAnswered: self._on_job_answered,
            PassOn: self._on_pass_on,
            JobResults: self._on_job_results,
        }

    def _adopt(self, run_id: str) -> None:
        """Start every model from the host copies a dead coordinator (same config) left on this machine."""
        if alive(int(run_id.split("-")[0])):
            raise ConfigError(f"coordinator.restore_run: the coordinator of run {run_id!r} is still running")
        self.versions.update(self.host.adopt(run_id))
        for w in self.workers:
            w.restore = True  # the workers fill their banks from the host copies, as replacements do
        log.warning("models restored from the host copies of run %s: %s", run_id,
                    ", ".join(f"{g}/{i}@v{v}" for (g, i), v in sorted(self.versions.items())))

    def _spec_for_block(self, group: str, indices: list[int]) -> GroupSpec:
        spec = self.specs[group]
        hparams = {k: [v[i] for i in indices] for k, v in spec.hparams.items()}
        return msgspec.structs.replace(spec, indices=indices, hparams=hparams)

    # ================================================================== lifecycle

    def start(self) -> None:
        """Bind, start MPS and the workers, and wait until every worker is ready."""
        if self.cc.restore_run:  # before the dead run's leftovers go
            self._adopt(self.cc.restore_run)
        for removed in remove_stale(keep=self.cc.restore_run,
                                    keep_host_copies=os.environ.get(KEEP_HOST_COPIES_ENV) == "1"):
            log.warning("removed %s", removed)
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
        if self.curve is None:  # with CURVE every client proves who it is: no way round it
            self.local = LocalClients.open(self.cc.address, self.cc.max_message_bytes + (1 << 20))
        self.loop_poll = LoopPoll(self.frontend.get(zmq.FD), self.workers, self.local)
        self.mps.start("cuda" if self.plan.gpu is not None else "cpu", self.plan.daemon_env(), self.run_dir)
        gpu.check_sharing(self.plan, self.cc.workers, self.mps.mode == "on", self.mps.reason)
        self.supervisor.device = self.plan.worker_device(self.mps.mode == "on")
        self.supervisor.env = {
            **gpu.client_environment(self.plan, self.mps.mode == "on", dict(os.environ)),
            **self.mps.worker_env(self.cc.workers),
            **worker_threads(self.cc.workers),
            **worker_malloc(),
            "COHORT_LOG_LEVEL": logging.getLevelName(log.getEffectiveLevel()),
        }
        for w in self.workers:
            self._spawn(w)
        self.supervisor.wait_until_ready(lambda ms: self._receive_workers(timeout_ms=ms), lambda: self.stopping)
        if self.cc.restore_run:  # adopted and running: only now may the dead run's copies go
            for name in leftover_shm(f"cohort-{self.cc.restore_run}-h"):
                unlink_shm(name)

    def _spawn(self, w: WorkerHandle) -> None:
        if self.local is not None:
            self.local.forget_worker(w.id)
        self.supervisor.spawn(w, self.run_dir, self.run_id)

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def serve(self) -> None:
        """Run the loop until ``request_stop``."""
        while not self.stopping:
            self.step()

    def step(self, timeout_ms: int = IDLE_POLL_MS) -> None:
        clients_wait = readable(self.frontend)  # its descriptor signals new messages only, not those taken in
        ready = self.loop_poll.wait(0 if clients_wait or self._can_dispatch() else timeout_ms, self._awaiting())
        if clients_wait or self.loop_poll.frontend_fd in ready:
            self._receive_clients()
        if self.local is not None:
            self.local.receive(ready, self._on_client_message)
        self._dispatch()  # a new job goes out first: what workers sent can be read while it runs
        self._receive_workers(timeout_ms=0, ready=ready)
        self._check_health()
        self._expire_deadlines()
        self.weight_ops.periodic()
        self.weight_ops.poll_snapshots()
        self._dispatch()
        self._flush_replies()
        self.loop_poll.flush()

    def _can_dispatch(self) -> bool:
        """Whether some worker has a queued part it may be sent now: else the loop can sleep in poll."""
        for w in self.workers:
            if w.state == "ready" and w.pending and len(w.in_flight) < self.cc.window:
                job = w.pending[0].job
                if job.answered or not self._held(w.pending[0]):
                    return True
        return False

    def shutdown(self) -> None:
        """Stop every worker, remove every shared-memory segment, socket and directory."""
        self.weight_ops.finish_writing(SNAPSHOT_FINISH_S)
        self._flush_replies()
        for w in self.workers:
            if w.link is not None and w.state in ("ready", "starting"):
                w.send(self.worker_codec.encode(Shutdown()))
            w.state = "stopping"
        self.loop_poll.drain()
        self.supervisor.stop_all()
        self.host.close()
        self.frontend.close(linger=0)
        if self.local is not None:
            self.local.close()
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
            try:  # the poll said one waits; after it, a look (3 us) before each receive (7 us if none waits)
                frames = recv_frames(self.frontend, NOBLOCK)
            except zmq.Again:
                return
            client = frames[0].bytes
            if self.local is None or not self.local.owns(client):  # a ZeroMQ peer may name itself anything
                self._on_client_message(client, [f.buffer for f in frames[1:]])
            if not readable(self.frontend):
                return

    def _on_client_message(self, client: bytes, frames: list[Any]) -> None:
        message = None
        try:
            message, buffers = self.client_codec.decode(frames)
            items = unbundle(message.requests, buffers) if isinstance(message, Requests) else [(message, buffers)]
        except CohortError as exc:  # unreadable (answered as request 0), or a bundle whose buffers do not add up
            self._reply_error(client, 0 if message is None else message.req_id, exc)
            return
        for item, own in items:
            self._handle_request(client, item, own)

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
            frames = self.client_codec.encode(*bundle_replies(items))
            if self.local is not None and self.local.owns(client):
                self.local.send(client, frames)
                continue
            try:
                send_frames(self.frontend, [client, *frames], NOBLOCK, copy=not zero_copy(frames))
            except zmq.ZMQError:
                pass  # the client has gone (ROUTER_MANDATORY) or stopped reading: nobody is left to tell

    def _reply_error(self, client: bytes, req_id: int, exc: CohortError) -> None:
        self._reply(client, ErrorReply(req_id, type(exc).__name__, exc.message, exc.remote_traceback))

    def _on_hello(self, client: bytes, msg: Hello, _: list[Any]) -> None:
        self._reply(client, HelloReply(msg.req_id, PROTOCOL_VERSION, __version__, self.cc.max_message_bytes,
                                       self.shm_identity, self.device, self.plan.gpu.uuid if self.plan.gpu else ""))

    def _on_models(self, client: bytes, msg: ListModels, _: list[Any]) -> None:
        self._drain_workers()  # a job a worker answered before this request came is counted first
        infos = [ModelInfo(f"{g}/{i}", g, i, worker, self.versions[(g, i)], self.workers[worker].device or self.device)
                 for (g, i), (worker, _) in self.slot_of.items()]
        infos.sort(key=lambda m: (m.group, m.index))
        self._reply(client, ModelsReply(msg.req_id, infos))

    def _on_stats(self, client: bytes, msg: StatsRequest, _: list[Any]) -> None:
        self._drain_workers()
        self._reply(client, StatsReply(msg.req_id, self.stats_dict()))

    # ---------------------------------------------------------------- jobs in

    def _on_submit(self, client: bytes, msg: SubmitJob, buffers: list[Any]) -> None:
        check_op(msg.op)
        local = msg.shm_identity == self.shm_identity != ""  # the client sees this machine's memory as we do
        if (msg.inputs.cuda or msg.targets.cuda) and not (self.device.startswith("cuda") and local):
            raise BadInput("tensors on a client's GPU (CUDA IPC) reach only workers on a GPU of the client's machine")
        n_in = msg.inputs.frames
        size = check_buffers(msg.inputs, buffers[:n_in], self.cc.max_message_bytes)
        check_buffers(msg.targets, buffers[n_in:], self.cc.max_message_bytes - size)
        model = self.model_ids.get(msg.target)
        if msg.op in ("infer", "train_step") or (msg.op == "evaluate" and model is not None):
            model = model or parse_model(msg.target, self.specs)
            group, models, stacked = model[0], [model], None
        else:
            group = parse_group(msg.target, self.specs).name
            models = [(group, i) for i in self.specs[group].indices]
            stacked = None
            if msg.op in ("train_round", "evaluate") and is_stacked(self.specs[group], msg.inputs):
                stacked = len(models)
        batch = check_inputs(self.specs[group], msg.inputs, stacked)
        check_targets(msg.op, msg.targets, batch, stacked)
        job = self._new_job(msg.op, group, models, msg.timeout_s, client, msg.req_id)
        job.shared = msg.op in ("train_round", "evaluate") and stacked is None  # one batch for every model
        split(job, self.slot_of, msg.inputs, buffers[:n_in], msg.targets, buffers[n_in:], stacked)
        # Results in a worker's arena for a client that sees it; results of several workers are joined here.
        job.client_pid = msg.client_pid if 0 < msg.client_pid < 1 << 22 else 0  # Linux pids are below 2**22
        job.shm_results = msg.shm_results and local and len(job.parts) == 1 and job.client_pid > 0
        self._queue(job)
        self.stats.record_submit()

    def bank_job(self, op: str, models: list[ModelKey], on_done: Callable[[Job, CohortError | None], None], *,
                 option: str = "", inputs: TensorTree = NO_TENSORS, buffers: list[Any] | None = None,
                 source: list[ModelKey] | None = None, blocked: bool = False,
                 hparams: dict[str, dict[ModelKey, float]] | None = None, seed: int | None = None,
                 timeout: float | None = None) -> Job:
        """A bank operation of the coordinator's own (``core.messages.BANK_OPS``), queued like a client's job."""
        job = self._new_job(op, models[0][0], models, timeout, b"", 0, admit=False)
        job.on_done, job.blocked = on_done, blocked
        job.option, job.seed = option, seed
        job.source = [self.slot_of[m][1] for m in source] if source else []
        split(job, self.slot_of, inputs, buffers or [], NO_TENSORS, [], None)
        for part in job.parts:
            part.hparams = {name: [values[(job.group, i)] for i in part.indices] for name, values in (hparams or {}).items()}
        self._queue(job)
        return job

    def _new_job(self, op: str, group: str, models: list[ModelKey], timeout: float | None, client: bytes,
                 req_id: int, admit: bool = True) -> Job:
        if admit:
            self._admit(models)
        else:
            self._check_alive(models)
        now = time.monotonic()
        job = Job(self.next_job_id, client, req_id, op, group, models, now, now + timeout if timeout else None)
        self.next_job_id += 1
        return job

    def _queue(self, job: Job) -> None:
        job.fences = self.barriers.fences_for(job.models)
        self.jobs[job.id] = job
        queued = self.queued_per_model
        for m in job.models:
            queued[m] += 1
        for part in job.parts:
            self.workers[part.worker].pending.append(part)
        if job.deadline is not None:
            heapq.heappush(self.deadlines, (job.deadline, job.id))
            if len(self.deadlines) > 2 * len(self.jobs) + 1024:  # mostly answered jobs' entries: keep the live ones
                self.deadlines = [(j.deadline, j.id) for j in self.jobs.values() if j.deadline is not None]
                heapq.heapify(self.deadlines)

    def _check_alive(self, models: list[ModelKey]) -> None:
        for m in models:
            w = self.workers[self.slot_of[m][0]]
            if w.state == "failed":
                raise WorkerDied(f"model {m[0]}/{m[1]} is on worker {w.id}, which kept crashing and is not restarted")

    def given_up(self, model: ModelKey) -> bool:
        return self.workers[self.slot_of[model][0]].state == "failed"

    def _admit(self, models: list[ModelKey]) -> None:
        queued = self.queued_per_model
        if len(self.jobs) >= self.cc.max_queued or any(queued[m] >= self.cc.max_queued_per_model for m in models):
            self._drain_workers()  # a job answered directly is done: its worker said so before its answer
        self._check_alive(models)
        if len(self.jobs) >= self.cc.max_queued:
            raise Overloaded(f"{len(self.jobs)} jobs queued or in flight (bound {self.cc.max_queued}); retry later")
        for m in models:
            if self.queued_per_model[m] >= self.cc.max_queued_per_model:
                raise Overloaded(f"model {m[0]}/{m[1]} has {self.queued_per_model[m]} jobs queued (bound "
                                 f"{self.cc.max_queued_per_model}); retry later")

    def _feed(self, job: Job, inputs: TensorTree, buffers: list[Any]) -> None:
        """A blocked bank job's inputs have come (a ``read`` on another worker): it may run."""
        for part in job.parts:
            part.inputs, part.buffers = inputs, list(buffers)
        job.blocked = False

    def _fail_blocked(self, job: Job, error: CohortError) -> None:
        if job.answered:  # it passed its deadline while it waited: answered and retired then
            return
        for part in job.parts:
            self.workers[part.worker].pending.remove(part)
        self._answer(job, error)
        job.open_parts = 0
        self._retire(job)

    # ================================================================== step 2: workers

    def _receive_workers(self, timeout_ms: int = 0, ready: dict[Any, int] | None = None) -> None:
        if ready is None:  # start-up: the workers alone (an early client's request would make it spin)
            links = [w.link.fileno() for w in self.workers if w.link is not None and not w.link.closed]
            poll = select.poll()
            for fd in links:
                poll.register(fd, select.POLLIN)
            ready = dict(poll.poll(timeout_ms))
        for w in self.workers:
            if w.link is not None and w.link.fileno() in ready:  # polled by file descriptor
                self._read_worker(w)
            if w.answering:  # read whether polled or not (``WorkerHandle.notices``)
                self._read_worker(w, notices=True)

    def _drain_workers(self) -> None:
        """Every message the workers have sent so far (no wait: a look at each link)."""
        for w in self.workers:
            self._read_all_of(w)

    def _read_all_of(self, w: WorkerHandle) -> None:
        self._read_worker(w)
        self._read_worker(w, notices=True)

    def _awaiting(self) -> bool:
        """Whether something waits for jobs to finish (a job for a worker's full window, a barrier): the
        workers' notices then wake the loop."""
        return bool(self.barriers.open) or any(w.pending for w in self.workers)

    def _read_worker(self, w: WorkerHandle, notices: bool = False) -> None:
        for _ in range(1000):
            if (frames := w.receive(notices)) is None:  # None too once a handler has buried the worker
                break
            try:
                message, buffers = self.worker_codec.decode(frames)
                self.worker_handlers[type(message)](w, message, buffers)
            except StartupError:
                raise
            except Exception as exc:
                if w.state == "starting" and w.restarts == 0:  # at start-up: fail now, with the reason
                    raise StartupError(f"worker {w.id}: {type(exc).__name__}: {exc}") from exc
                log.exception("worker %d sent a message that could not be handled", w.id)  # never a crash

    def _on_job_results(self, w: WorkerHandle, msg: JobResults, buffers: list[Any]) -> None:
        for result, own in unbundle(msg.results, buffers):
            self.worker_handlers[type(result)](w, result, own)

    def _on_job_result(self, w: WorkerHandle, msg: JobResult, buffers: list[Any]) -> None:
        part = w.landed(msg.job_id)
        if part is None:
            return
        w.jobs_done += 1
        self._finish_part(part, (msg.outputs, buffers, msg.losses), None)

    def _on_job_answered(self, w: WorkerHandle, msg: JobAnswered, _: list[Any]) -> None:
        part = w.landed(msg.job_id)
        if part is None:
            return
        w.jobs_done += 1
        job = part.job
        if not job.answered:  # it ran in this one part (a condition of answering directly)
            job.answered = True
            self._record_done(job, None)
        self._finish_part(part, None, None)

    def _on_pass_on(self, w: WorkerHandle, msg: PassOn, buffers: list[Any]) -> None:
        if self.local is not None:
            self._reply(self.local.key(msg.client), msg.reply, buffers)

    def _on_job_error(self, w: WorkerHandle, msg: JobError, _: list[Any]) -> None:
        part = w.landed(msg.job_id)
        if part is None:
            return
        w.jobs_done += 1
        self._finish_part(part, None, error_from_wire(msg.error, msg.message, msg.traceback))

    def _finish_part(self, part: Part, result: Any, error: CohortError | None) -> None:
        job = part.job
        if error is None:
            job.results[part.worker] = result
        elif not job.answered and job.open_parts > 1 and job.in_client_memory():  # the client reuses that memory
            job.error = job.error or error  # once answered: the answer waits for the parts that may read it
        elif not job.answered:
            self._answer(job, job.error or error)  # the first failure is the cause
        job.open_parts -= 1
        if job.open_parts > 0:
            return
        if not job.answered:
            self._answer(job, job.error)
        self._retire(job)

    def _answer(self, job: Job, error: CohortError | None) -> None:
        job.answered = True
        if job.on_done is not None:  # the coordinator's own job: its caller answers whoever asked
            job.on_done(job, error)
            return
        self._record_done(job, error)
        if error is not None:
            self._reply_error(job.client, job.req_id, error)
            return
        if job.op in LOSS_OPS:
            losses = [loss for p in job.parts for loss in (job.results[p.worker][2] or [])]
            self._reply(job.client, JobDone(job.req_id, losses=losses))
        elif job.op == "ensemble" and len(job.parts) > 1:
            tree, buffers = join_rows([(job.results[p.worker][0], job.results[p.worker][1]) for p in job.parts])
            self._reply(job.client, JobDone(job.req_id, tree), buffers)
        else:
            tree, buffers, _ = job.results[job.parts[0].worker]
            self._reply(job.client, JobDone(job.req_id, tree), buffers)

    def _record_done(self, job: Job, error: CohortError | None) -> None:
        self.stats.record_finish(job.models, time.monotonic() - job.accepted, None if error is None else type(error).__name__)
        if error is None and job.op in WEIGHT_CHANGING:
            for m in job.models:
                self.versions[m] += 1

    def _retire(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        job.parts.clear()  # each part points back at its job: without this cycle, the job is freed now, not by the collector
        queued = self.queued_per_model
        for m in job.models:
            if queued[m] <= 1:
                queued.pop(m, None)
            else:
                queued[m] -= 1
        self.barriers.job_finished(job.id)

    # ================================================================== step 3: health

    def _check_health(self) -> None:
        now = time.monotonic()
        if now - self._last_health < HEALTH_EVERY_S:
            return
        self._last_health = now
        self.supervisor.check(self._spawn)

    # ================================================================== step 4: deadlines

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self.deadlines)
            job = self.jobs.get(job_id)
            if job is None or job.answered or any(p.sent for p in job.parts):
                continue  # finished, or already running: it will answer on its own
            self._answer(job, job.error or JobTimeout(f"job passed its {job.deadline - job.accepted:.3f} s deadline before it started"))
            for part in job.parts:  # one may have failed already (its worker given up), and left its queue
                if part in self.workers[part.worker].pending:
                    self.workers[part.worker].pending.remove(part)
            job.open_parts = 0
            self._retire(job)

    # ================================================================== step 5: dispatch

    def _held(self, part: Part) -> bool:
        """Whether a part must wait: behind a barrier, for another job's result, or (a host copy)
        while a snapshot still copies out of the host copies."""
        job = part.job
        return job.fenced() or job.blocked or (job.op == "mirror" and self.weight_ops.taking())

    def _dispatch(self) -> None:
        for w in self.workers:
            if w.state != "ready":
                continue
            batch: list[Part] = []
            while w.pending and len(w.in_flight) + len(batch) < self.cc.window:
                part = w.pending[0]
                if part.job.answered or part.job.error:  # another part failed: do not run the rest
                    w.pending.popleft()
                    self._finish_part(part, None, None)
                    continue
                if self._held(part):
                    break
                batch.append(w.pending.popleft())
            if batch and not self._send_parts(w, batch):
                w.pending.extendleft(reversed(batch))

    def _send_parts(self, w: WorkerHandle, parts: list[Part]) -> bool:
        """One message for every part sent to a worker in this step: one system call, one wake-up."""
        commands = [RunJob(p.job.id, p.job.op, p.job.group, p.slots, p.inputs, p.targets, p.job.deadline,
                           p.job.option, p.job.source, p.job.shared, p.hparams, p.job.seed, p.job.shm_results,
                           p.job.client_pid, *self._answered_by_worker(p, w))
                    for p in parts]
        buffers = [b for p in parts for b in p.buffers]
        message = commands[0] if len(commands) == 1 else RunJobs(commands)
        if not w.send(self.worker_codec.encode(message, buffers)):
            return False
        for part, command in zip(parts, commands):
            part.sent = True
            part.answered_here = command.reply_to != 0
            w.answering += part.answered_here
            w.in_flight[part.job.id] = part
        return True

    def _answered_by_worker(self, part: Part, w: WorkerHandle) -> tuple[int, int]:
        """``(reply_to, req_id)`` of a job that ``w`` answers its local client itself, else ``(0, 0)``:
        a client's job (not the coordinator's) that runs in this one part."""
        job = part.job
        if self.local is None or job.on_done is not None or len(job.parts) != 1 or w.link is None:
            return 0, 0
        number = self.local.answer_socket(job.client, w.id, w.link)
        return (number, job.req_id) if number else (0, 0)

    # ================================================================== stats

    def stats_dict(self) -> dict[str, Any]:
        return stats_of(self)
