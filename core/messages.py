"""Every message cohort's processes exchange, and nothing else.

Three families, each a tagged msgspec union decoded by ``core.codec``:
client -> coordinator (``ClientRequest``), coordinator -> client (``Reply``),
coordinator <-> worker (``ToWorker`` / ``FromWorker``). Tensors are not in the
structs: a ``TensorTree`` header says what buffers follow the message. New fields are
appended last, with defaults.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from core.bank import BankHandle
from core.spec import GroupSpec
from core.tensors import NO_TENSORS, TensorTree

JOB_OPS: tuple[str, ...] = ("infer", "train_step", "ensemble", "train_round", "evaluate")
LOSS_OPS: tuple[str, ...] = ("train_step", "train_round", "evaluate")  # answered with their losses, not outputs
# Operations on models' bank slots that the coordinator asks of a worker, ordered with its
# jobs: "read" (a model's entries out), "write" (in), "copy" (slot to slot), "mirror" (to
# the host copy that a replacement worker is restored from), "set_hparams", "get_hparams",
# "reset" (weights as the factory makes them, optimizer state cleared).
BANK_OPS: tuple[str, ...] = ("read", "write", "copy", "mirror", "set_hparams", "get_hparams", "reset")


# --------------------------------------------------------------------------- client -> coordinator


class ClientRequest(msgspec.Struct, tag=True, array_like=True):
    """Base of every request a client sends; ``req_id`` is echoed in the reply."""

    req_id: int


class Hello(ClientRequest):
    client_version: str = ""


class SubmitJob(ClientRequest):
    """A job; ``inputs``' buffers come first, then ``targets``'."""

    op: str
    target: str
    inputs: TensorTree
    targets: TensorTree = NO_TENSORS
    timeout_s: float | None = None
    shm_results: bool = False  # a client of this machine: large results may come in a worker's arena
    client_pid: int = 0  # that client's process: the worker holds a result's region until it frees it or is gone
    shm_identity: str = ""  # its core.arena.shm_identity(): the coordinator agrees to shm_results when it is its own


class BarrierRequest(ClientRequest):
    scope: list[str] | None = None
    timeout_s: float | None = None


class ListModels(ClientRequest):
    pass


class GetWeights(ClientRequest):
    model: str
    timeout_s: float | None = None
    optimizer_state: bool = False  # the optimizer's entries too (what copy_weights moves)


class SetWeights(ClientRequest):
    model: str
    weights: TensorTree
    timeout_s: float | None = None
    optimizer_state: bool = False  # ``weights`` holds the optimizer's entries too: kept, not reset


class CopyWeights(ClientRequest):
    src: str
    dst: str
    timeout_s: float | None = None


class SnapshotRequest(ClientRequest):
    path: str
    timeout_s: float | None = None


class StatsRequest(ClientRequest):
    pass


class SetHparams(ClientRequest):
    """New hyperparameters for a model (one value each) or a group (one value, or one per model)."""

    target: str
    values: dict[str, list[float]]
    timeout_s: float | None = None


class GetHparams(ClientRequest):
    model: str
    timeout_s: float | None = None


class ResetModel(ClientRequest):
    """A new trial in a model's slot: weights as the factory makes them after ``manual_seed(seed)``."""

    model: str
    seed: int | None = None  # None: the group's own rule (its init seed plus the index, or its file)
    timeout_s: float | None = None


class Requests(ClientRequest):
    """Several requests in one message (a client's queue, drained at once); buffers follow request by request."""

    requests: list[Union[Hello, SubmitJob, BarrierRequest, ListModels, GetWeights, SetWeights, CopyWeights,
                         SnapshotRequest, StatsRequest, SetHparams, GetHparams, ResetModel]]


ClientMessage = Union[
    Hello, SubmitJob, BarrierRequest, ListModels, GetWeights, SetWeights, CopyWeights, SnapshotRequest, StatsRequest,
    SetHparams, GetHparams, ResetModel, Requests,
]


# --------------------------------------------------------------------------- coordinator -> client


class ModelInfo(msgspec.Struct, frozen=True):
    """One model the coordinator serves."""

    id: str
    group: str
    index: int
    worker: int
    version: int
    device: str
    coordinator: int = 0  # which coordinator of a cluster holds it (ClusterClient); 0 on one coordinator


class Reply(msgspec.Struct, tag=True, array_like=True):
    req_id: int


class HelloReply(Reply):
    protocol: int
    cohort_version: str
    max_message_bytes: int
    shm_identity: str = ""  # the coordinator's core.arena.shm_identity(): a local client's arenas work when equal
    device: str = ""  # the workers' device ("cpu", "cuda:0")
    gpu: str = ""  # their GPU's UUID: a local client's CUDA tensors on that GPU may go by CUDA IPC


class JobDone(Reply):
    """A finished job: output tensors (buffers follow) and, for training, the losses."""

    outputs: TensorTree = NO_TENSORS
    losses: list[float] | None = None


class ErrorReply(Reply):
    error: str
    message: str
    traceback: str = ""


class ModelsReply(Reply):
    models: list[ModelInfo]


class Ack(Reply):
    """Barrier, set/copy weights, snapshot: done; ``detail`` says what was done."""

    detail: dict[str, Any] = {}


class WeightsReply(Reply):
    weights: TensorTree


class StatsReply(Reply):
    stats: dict[str, Any]


class Replies(Reply):
    """Several replies to one client in one message; buffers follow reply by reply."""

    replies: list[Union[HelloReply, JobDone, ErrorReply, ModelsReply, Ack, WeightsReply, StatsReply]]


CoordinatorReply = Union[HelloReply, JobDone, ErrorReply, ModelsReply, Ack, WeightsReply, StatsReply, Replies]


# --------------------------------------------------------------------------- coordinator <-> worker


class ToWorker(msgspec.Struct, tag=True, array_like=True):
    pass


class InitWorker(ToWorker):
    worker_id: int
    device: str
    streams: int
    groups: list[GroupSpec]
    shm_prefix: str
    restore: bool = False  # fill the banks from the host copies instead of initialising them
    mirrors: list[str] = []  # per group: the shared-memory name of its host copy, laid out as its bank
    compile_cache_dir: str = ""  # where compiled calls are shared ("": the XDG cache directory)


class RunJob(ToWorker):
    """Run ``op`` on the models at ``slots`` of ``group``'s bank; buffers: inputs, then targets."""

    job_id: int
    op: str
    group: str
    slots: list[int]
    inputs: TensorTree
    targets: TensorTree = NO_TENSORS
    # The job's deadline on time.monotonic(), which on Linux is one clock for every process
    # of the machine: coordinator and workers always share one machine.
    deadline: float | None = None
    option: str = ""  # "read"/"write": "weights" (parameters and buffers) or "all" (optimizer state too)
    source: list[int] = []  # "copy": the slots copied from, one per slot of ``slots``
    shared: bool = False  # train_round/evaluate: one batch (inputs and targets) for every model, not stacked
    hparams: dict[str, list[float]] = {}  # "set_hparams": values, one per slot of ``slots``
    seed: int | None = None  # "reset": the seed (None: the group's own rule)
    shm_results: bool = False  # large outputs may go into the worker's arena (the client reads it)
    client_pid: int = 0  # the client's process, which holds such a result until it frees it (0: not said)
    # A local client's job that this worker may answer itself, on the socket the coordinator passed
    # it for that client (tagged ``reply_to``, the client's connection number; 0: answered by the
    # coordinator), as ``JobDone(req_id, ...)``; it then tells the coordinator ``JobAnswered``.
    reply_to: int = 0
    req_id: int = 0


class Shutdown(ToWorker):
    pass


class RunJobs(ToWorker):
    """Several jobs in one message (fewer system calls under load); buffers follow job by job."""

    jobs: list[RunJob]


WorkerCommand = Union[InitWorker, RunJob, RunJobs, Shutdown]


class FromWorker(msgspec.Struct, tag=True, array_like=True):
    worker_id: int


class WorkerHello(FromWorker):
    pid: int


class WorkerReady(FromWorker):
    device: str
    banks: list[BankHandle]


class JobResult(FromWorker):
    job_id: int
    outputs: TensorTree = NO_TENSORS
    losses: list[float] | None = None


class JobAnswered(FromWorker):
    """A job this worker answered its local client itself (``RunJob.reply_to``): it succeeded."""

    job_id: int


class PassOn(FromWorker):
    """An answer to a local client that a worker could not give it directly (its socket did not take
    it): the coordinator sends it on to that client (``client``, its connection number) as it is."""

    client: int
    reply: JobDone


class JobError(FromWorker):
    job_id: int
    error: str
    message: str
    traceback: str = ""


class PlanReport(msgspec.Struct, array_like=True):
    """How a worker runs one kind of call (a group's op on inputs of one shape), and why.

    Costs are per job (per model for ensembles, rounds and evaluations), measured on the
    device, keyed by candidate: ``one_by_one``, ``concat@8`` (8 jobs of a model as one
    batch), ``vmap@16`` (16 jobs or models as one vmap'd call), ``vmap_compiled@16``."""

    group: str
    op: str
    inputs: str  # one job's input shapes and dtypes, the batch rounded up to a power of two
    in_use: dict[int, str]  # jobs (or models) at once, rounded down to a power of two -> the candidate run
    per_job_us: dict[str, float]  # each measured candidate's cost
    pinned: bool = False  # batching.plan names the plan
    notes: list[str] = []  # e.g. layers without a vmap batching rule (torch runs them in a slow loop)


class Heartbeat(FromWorker):
    """The worker's counts, sent while its loop is free (liveness itself is stamped into a file)."""

    counters: dict[str, int] = {}  # calls, joined_jobs, compiled_calls, eager_calls, ...
    compiled_shapes: list[str] = []  # each compiled call shape: loaded from the cache or compiled here
    plans: list[PlanReport] = []  # how each kind of call runs, with the measured cost of each way


class WorkerFailed(FromWorker):
    """Start-up failed; the worker exits after sending this."""

    error: str
    message: str
    traceback: str = ""


class JobResults(FromWorker):
    """Several finished jobs in one message; buffers follow result by result."""

    results: list[Union[JobResult, JobError, JobAnswered, PassOn]]


WorkerEvent = Union[WorkerHello, WorkerReady, JobResult, JobError, JobAnswered, PassOn, JobResults, Heartbeat,
                    WorkerFailed]


