"""Host copies adopted from a dead run: only the same groups and models, only when all are there."""

from __future__ import annotations

import os
import uuid

import msgspec
import pytest
import torch

from core.definition import build_definition
from core.errors import ConfigError
from scheduler.config import parse_config
from scheduler.host_copies import HostCopies
from scheduler.leftovers import host_copies_whole

GROUP = {"name": "g", "factory": "examples.models:mlp", "kwargs": {"d_in": 4, "hidden": 8, "d_out": 3}, "count": 4,
         "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "cross_entropy",
         "optimizer": {"name": "adam", "lr": 0.01}}


def copies(run_id: str, count: int = 4, blocks: tuple[list[int], ...] = ([0, 1], [2, 3])) -> HostCopies:
    spec = build_definition(parse_config({"group": [{**GROUP, "count": count}]}).groups[0])
    host = HostCopies({"g": spec}, f"cohort-{run_id}-")
    for worker, indices in enumerate(blocks):
        host.create(worker, msgspec.structs.replace(spec, indices=indices))
    return host


def run_id() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def test_a_dead_runs_copies_are_adopted_with_their_versions() -> None:
    old_id = run_id()
    old, new = copies(old_id), copies(run_id())
    try:
        for segment in old.segments.values():
            segment.raw.copy_(torch.randint(0, 256, segment.raw.shape, dtype=torch.uint8))
        old.mirrored([("g", i) for i in range(4)], {("g", i): 10 + i for i in range(4)})
        versions = new.adopt(old_id)
        assert versions == {("g", i): 10 + i for i in range(4)} and new.version == versions
        for key, segment in new.segments.items():
            assert torch.equal(segment.raw, old.segments[key].raw), key
    finally:
        old.close()
        new.close()


def test_other_groups_missing_copies_or_models_never_copied_are_refused() -> None:
    old_id = run_id()
    old = copies(old_id)
    other = copies(run_id(), count=6, blocks=([0, 1, 2], [3, 4, 5]))
    same = copies(run_id())
    try:
        with pytest.raises(ConfigError, match="held other groups or models"):
            other.adopt(old_id)
        with pytest.raises(ConfigError, match="before every model had a host copy"):
            same.adopt(old_id)  # nothing mirrored yet
        old.mirrored([("g", i) for i in range(4)], {("g", i): 1 for i in range(4)})
        assert same.adopt(old_id) == {("g", i): 1 for i in range(4)}
        with pytest.raises(ConfigError, match="no host copies of run"):
            same.adopt(run_id())
    finally:
        for host in (old, other, same):
            host.close()


def test_a_copy_being_written_when_the_run_died_is_never_adopted() -> None:
    old_id = run_id()
    old, new = copies(old_id), copies(run_id())
    try:
        models = [("g", i) for i in range(4)]
        old.mirrored(models, {m: 2 for m in models})
        assert host_copies_whole(old_id)
        old.copying(models[:2])  # mirror jobs under way: their segments may be half written
        assert not host_copies_whole(old_id)
        with pytest.raises(ConfigError, match="being written"):
            new.adopt(old_id)
        old.mirrored(models[:2], {m: 3 for m in models})
        assert host_copies_whole(old_id) and new.adopt(old_id)[("g", 0)] == 3
    finally:
        old.close()
        new.close()
