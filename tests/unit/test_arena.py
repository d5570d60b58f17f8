"""Shared-memory arenas: a ring of regions handed back in any order, never overwriting a live one;
a reader sees when a result region was reclaimed; bad names and other users' files are refused."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from core.arena import HEADER, Arena, ArenaReader
from core.tensors import ShmRef, decode_tensors, encode_tensors, to_arena


@pytest.fixture
def arena():
    a = Arena(f"cohort-{os.getpid()}-{uuid.uuid4().hex[:8]}-arena", 64 * 1024, reclaim_after_s=60)
    yield a
    a.close()


def test_regions_wrap_around_and_never_overlap_live_ones(arena: Arena) -> None:
    first = arena.take(20_000)
    second = arena.take(20_000)
    third = arena.take(20_000)
    assert first and second and third
    assert arena.take(20_000) is None  # full: the caller sends frames instead
    arena.give_back(second[0])  # out of order: the tail stays at the first
    assert arena.take(20_000) is None
    arena.give_back(first[0])  # now the tail moves past both
    fourth = arena.take(30_000)
    assert fourth is not None and fourth[0] < third[0]  # wrapped to the start
    spans = sorted([(third[0], third[0] + 20_000), (fourth[0], fourth[0] + 30_000)])
    assert spans[0][1] <= spans[1][0] - HEADER.size
    assert arena.take(arena.size * 2) is None


def test_tensors_round_trip_through_an_arena(arena: Arena) -> None:
    value = {"x": torch.randn(64, 16), "y": torch.arange(10)}
    tree, buffers = encode_tensors(value)
    placed, left, regions = to_arena(tree, buffers, arena)
    assert left == [] and len(placed.shm) == 2 and len(regions) == 2 and placed.frames == 0
    reader = ArenaReader()
    try:
        got = decode_tensors(placed, [], arenas=reader)
        assert all(torch.equal(got[k], value[k]) for k in value)
        in_place = decode_tensors(placed, [], arenas=reader, copy=False)
        assert torch.equal(in_place["x"], value["x"])
    finally:
        reader.close()


def test_a_reader_sees_a_reclaimed_region_and_releases_a_read_one(arena: Arena) -> None:
    reader = ArenaReader()
    try:
        offset, sequence = arena.take(1000)
        ref = ShmRef(arena.name, offset, sequence)
        assert reader.current(ref)
        reader.release(ref)  # read: the writer may reuse it
        assert not reader.current(ref)
        again = arena.take(60_000)  # the released region is reclaimed for this one
        assert again is not None
        old = arena.take(1000)
        stale = ShmRef(arena.name, old[0], old[1] - 100)
        assert not reader.current(stale)  # another region now: a late reader must not trust the bytes
    finally:
        reader.close()


def test_a_region_nobody_released_is_reclaimed_after_its_time(arena: Arena) -> None:
    arena.reclaim_after_s = 0.0
    assert arena.take(40_000) is not None
    assert arena.take(40_000) is not None  # the first was reclaimed: its reader took too long


@pytest.mark.parametrize("name", ["../etc/passwd", "cohort-1-x/../../y", "torch_1_2", "cohort-1-abc-banks"])
def test_a_reader_refuses_names_that_are_not_arenas(name: str) -> None:
    reader = ArenaReader()
    with pytest.raises(ValueError):
        reader.read(ShmRef(name, 64), 4)
    with pytest.raises(ValueError):
        Arena(name, 1024)


def test_a_reader_refuses_bytes_outside_the_arena(arena: Arena) -> None:
    reader = ArenaReader()
    try:
        with pytest.raises(ValueError, match="outside"):
            reader.read(ShmRef(arena.name, arena.size - 8), 64)
    finally:
        reader.close()
