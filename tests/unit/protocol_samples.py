"""Valid messages of every type, per direction, shared by the protocol tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import msgspec
import torch

from tests.unit.wire import P


@dataclass(frozen=True)
class Direction:
    """One direction on the wire: who encodes, who decodes, and which union it carries."""

    name: str
    sender: Callable[[], P.Codec]
    receiver: Callable[[], P.Codec]
    union: Any


DIRECTIONS = [
    Direction("client->coordinator", P.client_codec, P.coordinator_client_codec, P.ClientMessage),
    Direction("coordinator->client", P.coordinator_client_codec, P.client_codec, P.CoordinatorReply),
    Direction("coordinator->worker", P.coordinator_worker_codec, P.worker_codec, P.WorkerCommand),
    Direction("worker->coordinator", P.worker_codec, P.coordinator_worker_codec, P.WorkerEvent),
]
CODEC_FACTORIES = [P.client_codec, P.coordinator_client_codec, P.coordinator_worker_codec, P.worker_codec]


def tensors(seed: int = 0, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, 8, generator=g),
        "ids": torch.randint(0, 100, (rows, 3), generator=g),
        "mask": torch.rand(rows, generator=g) > 0.5,
    }


def group_spec() -> P.GroupSpec:
    return P.GroupSpec(
        name="mlp",
        factory="examples.models:mlp",
        kwargs={"d_in": 8, "hidden": 16, "d_out": 4, "nested": {"a": [1, 2.5, "s", None, True]}},
        inputs=[P.InputSpec("x", (-1, 8), "float32")],
        single_input=True,
        entries=[P.EntrySpec("0.weight", "param", (16, 8), "float32"), P.EntrySpec("optim.step", "state", (), "float32")],
        loss="cross_entropy",
        optimizer="sgd",
        hparams={"lr": [0.1, 0.2], "momentum": [0.0, 0.9]},
        indices=[2, 3],
        init_seed=7,
        init_safetensors=None,
        batching=P.BatchingSpec(False, 8, 2.5),
    )


def messages(direction: str, rows: int = 4) -> list[tuple[msgspec.Struct, list[Any], list[P.TensorTree]]]:
    """``(message, buffers, trees)``: ``trees`` are the message's TensorTrees, in buffer order."""
    t = tensors(rows=rows)
    x_tree, x_bufs = P.encode_tensors(t["x"])
    d_tree, d_bufs = P.encode_tensors(t)
    y_tree, y_bufs = P.encode_tensors(torch.arange(rows))
    tup_tree, tup_bufs = P.encode_tensors((t["x"], t["mask"]))
    none = P.NO_TENSORS
    if direction == "client->coordinator":
        return [
            (P.Hello(1, "0.1.0"), [], []),
            (P.SubmitJob(2, "train_step", "mlp/3", x_tree, y_tree, 1.5), x_bufs + y_bufs, [x_tree, y_tree]),
            (P.SubmitJob(3, "infer", "mlp/0", d_tree), d_bufs, [d_tree, none]),
            (P.BarrierRequest(4, ["mlp", "cnn/1"], 2.0), [], []),
            (P.BarrierRequest(5), [], []),
            (P.ListModels(6), [], []),
            (P.GetWeights(7, "mlp/0", 3.0), [], []),
            (P.SetWeights(8, "mlp/0", d_tree), d_bufs, [d_tree]),
            (P.CopyWeights(9, "mlp/0", "mlp/3"), [], []),
            (P.SnapshotRequest(10, "ckpt/", None), [], []),
            (P.StatsRequest(11), [], []),
            (P.SetHparams(15, "mlp", {"lr": [0.1, 0.2], "momentum": [0.9]}, 1.0), [], []),
            (P.GetHparams(16, "mlp/1"), [], []),
            (P.ResetModel(17, "mlp/1", 7), [], []),
            (P.Requests(0, [P.SubmitJob(12, "infer", "mlp/1", x_tree), P.ListModels(13),
                            P.SetWeights(14, "mlp/2", d_tree)]), x_bufs + d_bufs, [x_tree, d_tree]),
        ]
    if direction == "coordinator->client":
        infos = [P.ModelInfo(f"mlp/{i}", "mlp", i, i % 2, 3, "cpu") for i in range(3)]
        return [
            (P.HelloReply(1, P.PROTOCOL_VERSION, "0.1.0", P.DEFAULT_MAX_MESSAGE_BYTES), [], []),
            (P.JobDone(2, tup_tree, [0.5, 0.25]), tup_bufs, [tup_tree]),
            (P.JobDone(3), [], [none]),
            (P.ErrorReply(4, "BadInput", "input 'x': bad", "Traceback ..."), [], []),
            (P.ModelsReply(5, infos), [], []),
            (P.Ack(6, {"models": 3, "detail": {"a": [1, 2]}}), [], []),
            (P.Ack(7), [], []),
            (P.WeightsReply(8, d_tree), d_bufs, [d_tree]),
            (P.StatsReply(9, {"workers": [{"id": 0, "queue": 2}], "jobs_per_s": 1.5, "mps": None}), [], []),
            (P.Replies(0, [P.JobDone(10, x_tree), P.ErrorReply(11, "Overloaded", "later"), P.WeightsReply(12, d_tree)]),
             x_bufs + d_bufs, [x_tree, d_tree]),
        ]
    if direction == "coordinator->worker":
        return [
            (P.InitWorker(0, "cpu", 4, [group_spec()], "cohort-abc-", True), [], []),
            (P.RunJob(1, "train_round", "mlp", [0, 1], x_tree, y_tree), x_bufs + y_bufs, [x_tree, y_tree]),
            (P.RunJob(2, "infer", "mlp", [1], d_tree), d_bufs, [d_tree, none]),
            (P.RunJob(5, "infer", "mlp", [1], d_tree, reply_to=3, req_id=9), d_bufs, [d_tree, none]),
            (P.RunJobs([P.RunJob(3, "infer", "mlp", [0], x_tree), P.RunJob(4, "infer", "mlp", [1], d_tree)]),
             x_bufs + d_bufs, [x_tree, d_tree]),
            (P.Shutdown(), [], []),
        ]
    assert direction == "worker->coordinator"
    cuda = P.CudaIpcHandle(0, b"\x01" * 64, 4096, 512, b"\x02" * 16, 8, b"", False)
    banks = [
        P.BankHandle("mlp", "shm", 4096, 2, shm_name="cohort-abc-mlp"),
        P.BankHandle("mlp", "cuda", 4096, 2, cuda=cuda),
    ]
    return [
        (P.WorkerHello(0, 1234), [], []),
        (P.WorkerReady(1, "cpu", banks), [], []),
        (P.JobResult(1, 5, x_tree, [1.0, 2.0]), x_bufs, [x_tree]),
        (P.JobResult(1, 6), [], [none]),
        (P.JobError(1, 5, "JobFailed", "CUDA out of memory", "Traceback ..."), [], []),
        (P.JobAnswered(1, 10), [], []),
        (P.PassOn(1, 3, P.JobDone(7, x_tree)), x_bufs, [x_tree]),
        (P.JobResults(1, [P.JobAnswered(1, 11), P.PassOn(1, 3, P.JobDone(8, d_tree)), P.JobResult(1, 12, x_tree)]),
         d_bufs + x_bufs, [d_tree, x_tree]),
        (P.JobResults(1, [P.JobResult(1, 7, x_tree, [0.5]), P.JobError(1, 8, "BadInput", "no"),
                          P.JobResult(1, 9, d_tree)]), x_bufs + d_bufs, [x_tree, d_tree]),
        (P.Heartbeat(1, {"calls": 10, "joined_jobs": 4}), [], []),
        (P.WorkerFailed(1, "ConfigError", "bad factory"), [], []),
    ]


def union_members(union: Any) -> set[type]:
    return set(get_args(union))


def all_valid_encodings() -> list[tuple[Direction, list[bytes]]]:
    """Every sample message encoded, packed and split, as bytes frames (what the wire carries)."""
    out = []
    for d in DIRECTIONS:
        codec = d.sender()
        for msg, bufs, _ in messages(d.name):
            out.append((d, [bytes(f) for f in codec.encode(msg, bufs)]))
        for msg, bufs, _ in messages(d.name, rows=3000):
            if bufs:
                out.append((d, [bytes(f) for f in codec.encode(msg, bufs)]))
    return out
