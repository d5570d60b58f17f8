"""Group runtimes on a CPU bank, in process: what a worker builds, without the worker."""

from __future__ import annotations

import os
import uuid
from typing import Any

import torch

from core.bank import Bank
from core.definition import build_definition
from core.messages import RunJob
from core.tensors import encode_tensors
from scheduler.config import parse_config
from workers.execute import GroupRuntime


def runtime_for(group: dict[str, Any], fuse: bool = True) -> tuple[GroupRuntime, Bank]:
    """A runtime of ``group`` (a config table) over a fresh bank; the caller closes the bank."""
    raw = {"coordinator": {"device": "cpu"}, "group": [{**group, "batching": {**group.get("batching", {}), "fuse": fuse}}]}
    spec = build_definition(parse_config(raw, "test.toml").groups[0])
    bank = Bank.create(spec.name, spec.entries, len(spec.indices), torch.device("cpu"),
                       f"cohort-test-{os.getpid()}-{uuid.uuid4().hex[:6]}-{spec.name}")
    rt = GroupRuntime(spec, bank, torch.device("cpu"))
    rt.initialise()
    return rt, bank


def run_job(job_id: int, op: str, group: str, slots: list[int], inputs: Any,
            targets: Any = None) -> tuple[RunJob, list[Any]]:
    """A job as the coordinator sends it: the command and its buffers."""
    tree_in, buf_in = encode_tensors(inputs)
    tree_t, buf_t = encode_tensors(targets)
    return RunJob(job_id, op, group, slots, tree_in, tree_t), [*buf_in, *buf_t]
