"""A worker process: owns the banks of the models placed on it and runs their jobs.

Start-up: on the link to the coordinator this worker was started with, say hello, receive the
compiled group definitions, allocate the banks and fill them (initialised, then copied
to their host copies; or, for a replacement, restored from the host copies), and say
ready (or say why start-up failed). Then the loop, in named steps: receive commands,
hand the jobs to the executor, send the results, report counts. It exits when told to,
when a device fault makes its GPU context unusable, or when the coordinator dies (its
lifeline thread sees to that even mid-job).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from core.arena import Arena, ArenaReader
from core.bank import Bank, BankHandle, bank_layout, unlink_shm
from core.codec import bundle_replies, unbundle, worker_codec
from core.cuda_ipc import open_bytes, release_unopened, visible_gpus
from core.device import resolve_device
from core.errors import CohortError
from core.heap import freeze_start_up_heap
from core.messages import (
    LOSS_OPS,
    Heartbeat,
    InitWorker,
    JobAnswered,
    JobDone,
    JobError,
    JobResult,
    JobResults,
    PassOn,
    RunJob,
    RunJobs,
    Shutdown,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
)
from core.spec import GroupSpec
from core.tensors import byte_tensor, encode_tensors, tensor_nbytes, to_arena
from core.unix_link import RECORD_BYTES, LinkClosed, UnixLink
from workers import bank_ops
from workers.compile_cache import CompileCache
from workers.execute import GroupRuntime
from workers.executors import make_executor
from workers.lifeline import Lifeline
from workers.outcome import Finished

REPORT_S = 0.25
ANSWER_BYTES = RECORD_BYTES // 2  # tensors of one direct answer at most: its header fits in the rest of a record
SHM_MIN_BYTES = 256 * 1024  # results this large go through the arena for a local client
RESULT_ARENA_BYTES = 256 << 20  # address space: pages are allocated as results are first written
RESULT_RECLAIM_S = 120.0  # a result for a client that did not say its pid is given up after this
INIT_TIMEOUT_S = 60.0
LOG_LEVEL_ENV = "COHORT_LOG_LEVEL"
FATAL_DEVICE_EXIT = 3  # the coordinator reads this exit code as "its GPU context was lost" (scheduler.supervisor)

log = logging.getLogger("cohort.worker")


class Worker:
    def __init__(self, link: UnixLink, worker_id: int, notices: UnixLink | None = None) -> None:
        self.worker_id = worker_id
        self.link = link  # blocking: the coordinator always reads, so a send never waits long
        self.notices = notices  # for messages of JobAnswered alone (``WorkerHandle.notices`` says why)
        self.codec = worker_codec()
        self.banks: list[Bank] = []
        self.runtimes: dict[str, GroupRuntime] = {}
        self.executor: Any = None
        self.running = True
        self.fatal = False
        self._last_report = 0.0
        self.arenas = ArenaReader()  # local clients' arenas, where large inputs may lie
        self.out: Arena | None = None  # this worker's arena for large results, made on first use
        self.shm_results: dict[int, int] = {}  # jobs whose client reads results from shared memory: its pid
        self.shm_prefix = ""
        self.gpus: dict[str, int] | None = None  # GPU UUID to index, for clients' CUDA tensors
        self.clients: dict[int, UnixLink] = {}  # local clients this worker answers itself, by connection number
        self.answer_to: dict[int, tuple[int, int, bool]] = {}  # job id: (connection, request id, answered with losses)
        self._client_hangups = select.poll()
        self._client_by_fd: dict[int, int] = {}  # a client's socket: its connection number
        self.handlers: dict[type, Callable[[Any, list[Any], list[tuple[RunJob, list[Any]]]], None]] = {
            RunJob: lambda m, buffers, jobs: jobs.append(self._local(m, buffers)),
            RunJobs: lambda m, buffers, jobs: jobs.extend(self._local(j, b) for j, b in unbundle(m.jobs, buffers)),
            Shutdown: lambda m, buffers, jobs: setattr(self, "running", False),
        }

    # ------------------------------------------------------------------ start-up

    def start(self) -> bool:
        self._send(WorkerHello(self.worker_id, os.getpid()))
        frames = self._next(int(INIT_TIMEOUT_S * 1000))
        if frames is None:
            return False
        message, _ = self.codec.decode(frames)
        if not isinstance(message, InitWorker):
            return False
        try:
            self._init(message)
        except Exception as exc:
            error = type(exc).__name__ if isinstance(exc, CohortError) else "JobFailed"
            text = str(exc) if isinstance(exc, CohortError) else f"{type(exc).__name__}: {exc}"
            self._send(WorkerFailed(self.worker_id, error, text, traceback.format_exc()))
            self.close()
            return False
        return True

    def _init(self, init: InitWorker) -> None:
        self.shm_prefix = init.shm_prefix
        device = resolve_device(init.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            self.gpus = {}  # a CPU worker maps no client's GPU memory (and never starts CUDA to find out)
        cache = self._compile_cache(init, device)
        for spec, mirror in zip(init.groups, init.mirrors, strict=True):
            bank = Bank.create(spec.name, spec.entries, len(spec.indices), device, f"{init.shm_prefix}{spec.name}")
            self.banks.append(bank)
            runtime = GroupRuntime(spec, bank, device)
            runtime.mirror = open_host_copy(spec, mirror, device)
            if init.restore:
                bank_ops.restore(bank, runtime.mirror)
            else:
                runtime.initialise()
                bank_ops.mirror(bank, runtime.mirror, list(range(len(spec.indices))))  # the first restore point
            self.runtimes[spec.name] = runtime
            if spec.batching.compile:
                compiled = runtime.enable_compile(spec.batching.compile, cache)
                if compiled.preload(runtime.fused.eager):  # shapes any worker compiled before: no wait later
                    log.info("group %s: %d compiled call shapes loaded", spec.name, compiled.loaded)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.executor = make_executor(self.runtimes, device, init.streams)
        self.max_wait_s = max((g.batching.max_wait_ms for g in init.groups), default=0.0) / 1000
        self.max_jobs = max((g.batching.max_jobs for g in init.groups), default=1)
        freeze_start_up_heap()
        self._send(WorkerReady(self.worker_id, str(device), [b.handle for b in self.banks]))

    @staticmethod
    def _compile_cache(init: InitWorker, device: torch.device) -> CompileCache | None:
        """The machine's cache of compiled calls, when a group compiles; its kernels directory is this
        worker's TORCHINDUCTOR_CACHE_DIR. None (each worker compiles alone) if it cannot be used."""
        if not any(g.batching.compile for g in init.groups):
            return None
        try:
            cache = CompileCache(device, init.compile_cache_dir)
        except OSError as exc:
            log.warning("compile cache at %r unusable (%s); compiling in this worker only", init.compile_cache_dir, exc)
            return None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.inductor_dir
        return cache

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        assert self.executor is not None
        poller = select.poll()
        poller.register(self.link.fileno(), select.POLLIN)
        for fd in self.executor.wake_fds():
            poller.register(fd, select.POLLIN)
        link_fd = self.link.fileno()
        while self.running and not self.fatal:
            wait = self.executor.wait_ms()
            if any(fd == link_fd for fd, _ in poller.poll(int(REPORT_S * 1000) if wait is None else wait)):
                self._receive()
            self._reply(self.executor.poll())
            self._report()

    def _receive(self) -> None:
        """Take every command waiting, then hand the jobs to the executor together, so it can join them."""
        assert self.executor is not None
        jobs: list[tuple[RunJob, list[Any]]] = []
        self._drain(jobs)
        waiting_pays = jobs and self.max_wait_s > 0 and len(jobs) < self.max_jobs and self.running
        if waiting_pays and self.link.wait(int(self.max_wait_s * 1000)):  # the group's policy: wait for company
            self._drain(jobs)
        if jobs:
            self.executor.submit_many(jobs)

    def _drain(self, jobs: list[tuple[RunJob, list[Any]]]) -> None:
        """Every command waiting."""
        while self.running:
            frames = self._next(0)
            if frames is None:
                return
            if passed := self.link.take_sockets():
                self._add_clients(passed)
            message, buffers = self.codec.decode(frames)
            self.handlers[type(message)](message, buffers, jobs)

    def _add_clients(self, passed: list[tuple[int, socket.socket]]) -> None:
        """Sockets of local clients, passed by the coordinator, on which this worker answers their jobs."""
        for number, sock in passed:
            self._drop_client(number)
            link = UnixLink(sock, blocking=False)  # a full socket (a client slow to read) never holds the loop
            self.clients[number] = link
            self._client_hangups.register(link.fileno(), select.POLLRDHUP)
            self._client_by_fd[link.fileno()] = number

    def _drop_client(self, number: int) -> None:
        link = self.clients.pop(number, None)
        if link is not None:
            self._client_hangups.unregister(link.fileno())
            del self._client_by_fd[link.fileno()]
            link.close()

    def _direct_answer(self, job_id: int, tree: Any, own: list[Any], losses: list[float] | None,
                       ) -> tuple[int, JobDone, list[Any], int] | None:
        """The answer to a job that this worker gives its local client itself (the coordinator asked for
        it, and the client's socket is here): the client's connection number, the reply, its buffers and
        their bytes; None where the coordinator answers (also for tensors too large for one record)."""
        client, req_id, with_losses = self.answer_to.pop(job_id, (0, 0, False))
        if client not in self.clients:
            return None
        if with_losses:
            return client, JobDone(req_id, losses=losses or []), [], 0
        size = sum(b.nbytes for b in own)
        return (client, JobDone(req_id, tree), own, size) if size <= ANSWER_BYTES else None

    def _send_answers(self, answers: list[tuple[int, JobDone, list[Any], int]]) -> None:
        """Send the answers given directly, those of one client together in one message (as the coordinator
        bundles its replies); what a socket does not take now (its client is slow to read, or gone) goes to
        the coordinator, which passes it on (``PassOn``): it has counted those jobs done already."""
        by_client: dict[int, list[list[tuple[JobDone, list[Any]]]]] = {}
        last_size: dict[int, int] = {}  # the bytes of each client's last message so far
        for client, reply, own, size in answers:
            messages = by_client.setdefault(client, [[]])
            if messages[-1] and last_size[client] + size > ANSWER_BYTES:  # one message stays within one record
                messages.append([])
                last_size[client] = 0
            messages[-1].append((reply, own))
            last_size[client] = last_size.get(client, 0) + size
        passed_on: list[PassOn] = []
        buffers: list[Any] = []
        for client, messages in by_client.items():
            for message in messages:
                if not self._send_answer(client, message):
                    passed_on += [PassOn(self.worker_id, client, reply) for reply, _ in message]
                    buffers += [b for _, own in message for b in own]
        if passed_on:
            self._send(passed_on[0] if len(passed_on) == 1 else JobResults(self.worker_id, passed_on), buffers)

    def _send_answer(self, client: int, answers: list[tuple[JobDone, list[Any]]]) -> bool:
        link = self.clients.get(client)
        if link is None:
            return False
        try:
            return link.send_now(self.codec.encode(*bundle_replies(answers)))  # False: full, or over a record after all
        except LinkClosed:  # the client has gone: the coordinator drops what it passes on
            self._drop_client(client)
            return False

    def _next(self, timeout_ms: int) -> list[Any] | None:
        """The next message, waiting up to ``timeout_ms`` for it; the coordinator's end of the link
        closing is its last word: the worker stops as on ``Shutdown``."""
        try:
            if timeout_ms and not self.link.wait(timeout_ms):
                return None
            return self.link.recv()
        except LinkClosed:
            self.running = False
            return None


    def _local(self, job: RunJob, buffers: list[Any]) -> tuple[RunJob, list[Any]]:
        """A job whose tensors lie in a client's arena or on its GPU, as if they had come in frames: byte
        tensors over the arena or over the client's GPU memory (CUDA IPC), which the job computes on in
        place (the memory stays the client's until the reply). Tensors that cannot be read fail the job
        when it is prepared, with the reason in this worker's log."""
        if job.shm_results:
            self.shm_results[job.job_id] = job.client_pid
        if job.reply_to:
            self.answer_to[job.job_id] = (job.reply_to, job.req_id, job.op in LOSS_OPS)
        if not (job.inputs.shm or job.targets.shm or job.inputs.cuda or job.targets.cuda):
            return job, buffers
        try:
            own: list[Any] = []
            trees = {}
            on_gpu = iter(self._map_gpu(job))
            for name in ("inputs", "targets"):
                tree = getattr(job, name)
                if tree.shm:
                    own += [byte_tensor(self.arenas.read(ref, tensor_nbytes(meta)))
                            for ref, meta in zip(tree.shm, tree.metas)]
                    trees[name] = msgspec.structs.replace(tree, shm=())
                elif tree.cuda:
                    own += [next(on_gpu) for _ in tree.cuda]
                    trees[name] = msgspec.structs.replace(tree, cuda=())
                else:
                    own += buffers[:tree.frames] if name == "inputs" else buffers[job.inputs.frames:]
            return msgspec.structs.replace(job, **trees), own
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: torch's, a CUDA IPC handle not opened
            log.warning("job %d: its tensors in shared memory or on the client's GPU cannot be read: %s", job.job_id, exc)
            return job, buffers

    def _map_gpu(self, job: RunJob) -> list[torch.Tensor]:
        """A job's tensors on its client's GPU (inputs, then targets), mapped here. Each reference counts
        one reader with torch: one not mapped (a failure) is given back at once, so the client's memory
        does not stay pinned."""
        refs = [*zip(job.inputs.cuda, job.inputs.metas), *zip(job.targets.cuda, job.targets.metas)]
        mapped: list[torch.Tensor] = []
        try:
            for ref, meta in refs:
                mapped.append(open_bytes(ref, tensor_nbytes(meta), self._visible_gpus()))
        except Exception:
            for ref, _ in refs[len(mapped):]:
                try:
                    release_unopened(ref, torch.cuda.current_device())
                except Exception:  # noqa: BLE001 - the job fails all the same; its log line says why
                    log.warning("job %d: could not give back a client's GPU memory share", job.job_id)
            raise
        return mapped

    def _visible_gpus(self) -> dict[str, int]:
        """GPU UUID to device index here, found once (a CPU worker sees none)."""
        if self.gpus is None:
            self.gpus = visible_gpus()
        return self.gpus

    def _arena_out(self) -> Arena:
        if self.out is None:
            self.out = Arena(f"{self.shm_prefix}out", RESULT_ARENA_BYTES, reclaim_after_s=RESULT_RECLAIM_S)
        return self.out

    def _reply(self, finished: list[Finished]) -> None:
        """Every finished job in one message: one system call and one wake-up for the coordinator. Jobs
        this worker answers its local clients directly are only named in it (``JobAnswered``), and answered
        after it: the coordinator counts them done before their clients can ask again."""
        results: list[JobResult | JobError | JobAnswered] = []
        buffers: list[Any] = []
        answers = []
        for item in finished:
            reader = self.shm_results.pop(item.job_id, None)
            if item.error is not None:
                self.answer_to.pop(item.job_id, None)
                results.append(JobError(self.worker_id, item.job_id, type(item.error).__name__, item.error.message,
                                        item.traceback))
                self.fatal = self.fatal or item.fatal
                continue
            try:
                tree, own = encode_tensors(item.outputs)
            except CohortError as exc:
                self.answer_to.pop(item.job_id, None)
                results.append(JobError(self.worker_id, item.job_id, type(exc).__name__, f"model output: {exc}"))
                continue
            if reader is not None and self.shm_prefix and sum(b.nbytes for b in own) >= SHM_MIN_BYTES:
                tree, own, _ = to_arena(tree, own, self._arena_out(), reader)  # held until the client frees it
            if item.job_id in self.answer_to and (answer := self._direct_answer(item.job_id, tree, own, item.losses)):
                results.append(JobAnswered(self.worker_id, item.job_id))
                answers.append(answer)
                continue
            results.append(JobResult(self.worker_id, item.job_id, tree, item.losses))
            buffers += own
        message = results[0] if len(results) == 1 else JobResults(self.worker_id, results)
        if answers and len(answers) == len(results):
            self._notify(message)
        elif results:
            self._send(message, buffers)
        if answers:
            self._send_answers(answers)

    def _notify(self, message: JobAnswered | JobResults) -> None:
        """Name jobs answered directly, on the notices socket, so as not to wake the coordinator; on the
        link if that socket is full (the coordinator has not looked in a while) or gone."""
        frames = self.codec.encode(message)
        try:
            if self.notices is not None and self.notices.send_now(frames):
                return
        except LinkClosed:
            self.notices = None
        try:
            self.link.send(frames)
        except LinkClosed:
            self.running = False

    def _report(self) -> None:
        """The executor's counts, now and then (liveness is the lifeline's job)."""
        now = time.monotonic()
        if now - self._last_report >= REPORT_S:
            self._last_report = now
            shapes = [f"{name} {shape}" for name, rt in self.runtimes.items() if rt.fused.compiled is not None
                      for shape in rt.fused.compiled.shapes]
            plans = [report for rt in self.runtimes.values() for report in rt.plan_reports()]
            self._send(Heartbeat(self.worker_id, self.counters(), shapes, plans))
            self.arenas.prune(remove_dead=True)  # the memory of clients that are gone goes back
            for fd, _ in self._client_hangups.poll(0) if self.clients else ():
                self._drop_client(self._client_by_fd[fd])

    def counters(self) -> dict[str, int]:
        ex = self.executor
        fused = [rt.fused for rt in self.runtimes.values()]
        compiled = [f.compiled for f in fused if f.compiled is not None]
        return {"calls": getattr(ex, "calls", 0), "joined_jobs": getattr(ex, "joined_jobs", 0),
                "compiled_calls": sum(f.compiled_calls for f in fused), "eager_calls": sum(f.eager_calls for f in fused),
                "compile_loaded": sum(c.loaded for c in compiled), "compile_compiled": sum(c.compiled_here for c in compiled),
                "compile_ms": int(1000 * sum(c.compile_s for c in compiled)),
                "recompiles": sum(c.recompiles for c in compiled)}

    def remove_shm(self) -> None:
        """Unlink this worker's shared-memory banks by name (safe from another thread: nothing is unmapped)."""
        for bank in list(self.banks):
            if bank.handle.kind == "shm":
                unlink_shm(bank.handle.shm_name)

    def _send(self, message: Any, buffers: list[Any] | None = None) -> None:
        try:
            self.link.send(self.codec.encode(message, buffers))
        except LinkClosed:
            self.running = False  # the coordinator has gone: nobody is left to answer

    def close(self) -> None:
        self.arenas.close()
        if self.out is not None:
            self.out.close()
        for bank in self.banks:
            bank.close()
        self.banks = []
        for number in list(self.clients):
            self._drop_client(number)
        if self.notices is not None:
            self.notices.close()
        self.link.close()


def open_host_copy(spec: GroupSpec, name: str, device: torch.device) -> Bank:
    """Map the coordinator's host copy of this bank; page-locked on a GPU, for asynchronous copies."""
    layout = bank_layout(spec.entries, len(spec.indices))
    host = Bank.open(BankHandle(spec.name, "shm", layout.nbytes, len(spec.indices), shm_name=name), spec.entries)
    if device.type == "cuda":
        bank_ops.pin(host)
    return host


def main(link_fd: int, notices_fd: int, worker_id: int, beat_path: str) -> int:
    # The coordinator's log level and format, so a worker's lines read like its own.
    logging.basicConfig(level=os.environ.get(LOG_LEVEL_ENV, "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s cohort worker {worker_id} %(levelname)s %(message)s")
    # Ctrl-C goes to the coordinator, which stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = Worker(UnixLink(socket.socket(fileno=link_fd), blocking=True, takes_sockets=True), worker_id,
                    UnixLink(socket.socket(fileno=notices_fd), blocking=False))
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "running", False))
    lifeline = Lifeline(beat_path, os.getppid(), worker.remove_shm).start()
    try:
        if not worker.start():
            return 1
        try:
            worker.run()
        finally:
            worker.close()
    finally:
        lifeline.stop()
    return FATAL_DEVICE_EXIT if worker.fatal else 0
