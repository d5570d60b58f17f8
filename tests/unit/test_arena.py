"""Shared-memory arenas: a ring of regions handed back in any order, never overwriting a live one;
a reader sees when a result region was reclaimed; bad names and other users' files are refused."""

from __future__ import annotations

import errno
import gc
import os
import struct
import subprocess
import sys
import time
import uuid

import pytest
import torch

from core.arena import HEADER, Arena, ArenaReader, shm_identity
from core.bank import shm_dir
from core.tensors import ShmRef, decode_tensors, encode_tensors, to_arena


@pytest.fixture
def arena():
    a = Arena(f"cohort-{os.getpid()}-{uuid.uuid4().hex[:8]}-arena", 64 * 1024, reclaim_after_s=60)
    yield a
    a.close()


def _spans(*regions: tuple[int, int], nbytes: int) -> list[tuple[int, int]]:
    return sorted((offset - HEADER.size, offset + nbytes) for offset, _ in regions)


def test_regions_are_reused_in_any_order_and_never_overlap_live_ones(arena: Arena) -> None:
    first = arena.take(20_000)
    second = arena.take(20_000)
    third = arena.take(20_000)
    assert first and second and third
    assert arena.take(20_000) is None  # full: the caller sends frames instead
    arena.give_back(second[0])  # out of order: its room is taken again while the first is still held
    again = arena.take(20_000)
    assert again is not None and again[0] == second[0] and again[1] > second[1]
    assert arena.take(20_000) is None
    arena.give_back(first[0])
    arena.give_back(again[0])
    fourth = arena.take(30_000)  # the two neighbours' room, joined
    assert fourth is not None and fourth[0] < third[0]
    spans = _spans(third, nbytes=20_000) + _spans(fourth, nbytes=30_000)
    spans.sort()
    assert spans[0][1] <= spans[1][0]
    assert arena.take(arena.size * 2) is None


def test_one_region_held_for_long_does_not_block_the_others(arena: Arena) -> None:
    held = arena.take(10_000, reader=os.getpid())  # a result its reader keeps
    assert held is not None
    for _ in range(50):  # many calls come and go around it
        region = arena.take(20_000)
        assert region is not None
        lo, hi = _spans(region, nbytes=20_000)[0]
        assert hi <= held[0] - HEADER.size or lo >= held[0] + 10_000
        arena.give_back(region[0])
    assert arena.held() == 1


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


def test_a_result_is_held_while_its_reader_lives_and_reclaimed_once_it_is_gone(arena: Arena) -> None:
    arena.reclaim_after_s = 0.0  # time alone never reclaims a region held for a reader
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    mine = arena.take(20_000, reader=os.getpid())
    theirs = arena.take(20_000, reader=gone.pid)
    assert mine and theirs
    assert arena.take(30_000, reader=os.getpid()) is not None  # the dead reader's room
    assert arena.held() == 2
    assert arena.take(30_000) is None  # the living reader's region stays, however old


def test_a_reader_that_exited_unreaped_is_taken_for_gone(arena: Arena) -> None:
    """A client that exited but was not yet waited for by its parent (a zombie) still answers kill(pid, 0)."""
    arena.reclaim_after_s = 0.0
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while not _is_zombie(zombie.pid):  # exited, and deliberately not waited for yet
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        os.kill(zombie.pid, 0)  # still there as far as kill can tell
        assert arena.take(40_000, reader=zombie.pid) is not None
        assert arena.take(40_000, reader=os.getpid()) is not None  # its room, given back: its reader is gone
        assert arena.held() == 1
    finally:
        zombie.wait()


def test_a_reader_whose_main_thread_exited_while_others_run_is_alive(arena: Arena) -> None:
    """Linux shows such a process as a zombie too, though it still runs (and may hold results)."""
    code = ("import ctypes, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")  # the main thread alone ends; ctypes lets go of the GIL
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not _is_zombie(child.pid):
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.01)
        assert len(os.listdir(f"/proc/{child.pid}/task")) > 1
        arena.reclaim_after_s = 0.0
        assert arena.take(40_000, reader=child.pid) is not None
        assert arena.take(40_000, reader=os.getpid()) is None  # still held: its reader lives on
    finally:
        child.kill()
        child.wait()


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def test_a_held_result_is_a_tensor_over_the_region_released_when_freed(arena: Arena) -> None:
    value = torch.arange(1000, dtype=torch.float32)
    tree, buffers = encode_tensors(value)
    placed, _, _ = to_arena(tree, buffers, arena, reader=os.getpid())
    reader = ArenaReader()
    try:
        ref = placed.shm[0]
        raw = reader.hold(ref, 4000)
        got = raw.view(torch.float32)
        assert torch.equal(got, value)
        arena.view[ref.offset:ref.offset + 4] = struct.pack("<f", 7.0)  # the same memory: no copy was made
        assert got[0].item() == 7.0
        view = got[10:20]
        del raw, got
        gc.collect()
        assert reader.current(ref)  # a view of it is still alive
        del view
        gc.collect()
        assert not reader.current(ref)  # freed: handed back to the writer
        assert arena.take(60_000) is not None
    finally:
        reader.close()


def test_a_full_dev_shm_means_no_region_never_a_crash(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    value = torch.randn(100)
    tree, buffers = encode_tensors(value)
    placed, left, regions = to_arena(tree, buffers, arena)
    assert placed is tree and left == buffers and regions == []  # the tensors go through the socket
    assert arena.held() == 0


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


def test_a_lent_tensor_is_sent_where_it_lies_and_kept_while_a_call_uses_it(arena: Arena) -> None:
    lent = arena.lend(4000)
    assert lent is not None and lent.dtype == torch.uint8 and arena.held() == 1
    values = lent.view(torch.float32)
    values.copy_(torch.arange(1000, dtype=torch.float32))
    tree, buffers = encode_tensors(values[10:])  # a contiguous part of it
    placed, left, used = to_arena(tree, buffers, arena)
    assert left == [] and arena.held() == 1  # no copy into a region of its own
    reader = ArenaReader()
    try:
        got = decode_tensors(placed, [], arenas=reader)
        assert torch.equal(got, torch.arange(10, 1000, dtype=torch.float32))
    finally:
        reader.close()
    del lent, values, buffers
    gc.collect()
    assert arena.take(10) is not None and arena.held() == 2  # freed, but the call that sends it is out
    for region in used:
        arena.give_back(region)  # the reply came
    assert arena.take(10) is not None and arena.held() == 2  # the lent region is gone, the two small ones stay


def test_a_freed_lent_region_whose_call_never_came_back_is_reclaimed_after_its_time(arena: Arena) -> None:
    arena.reclaim_after_s = 0.0
    lent = arena.lend(40_000)
    tree, buffers = encode_tensors(lent)
    to_arena(tree, buffers, arena, deadline=time.monotonic() - 1)  # abandoned, its deadline past
    assert arena.take(40_000) is None  # still alive: never reclaimed by time while the tensor lives
    del lent, buffers
    gc.collect()
    assert arena.take(40_000) is not None


def test_regions_of_a_call_still_out_are_kept_however_long_it_runs(arena: Arena) -> None:
    """A call's regions are reclaimed by time only once its deadline is ``reclaim_after_s`` past: a job
    queued or running long (a long timeout) still reads them."""
    arena.reclaim_after_s = 0.0
    lent = arena.lend(40_000)
    tree, buffers = encode_tensors(lent)
    to_arena(tree, buffers, arena, deadline=time.monotonic() + 60)  # out, the user's tensor freed
    del lent, buffers
    gc.collect()
    x = torch.ones(4_000)
    tree, buffers = encode_tensors(x)
    _, _, used = to_arena(tree, buffers, arena, deadline=time.monotonic() + 60)
    assert used and arena.take(40_000) is None  # neither is reclaimed while its call may be read
    assert arena.held() == 2


def test_a_reader_forgets_arenas_whose_file_is_gone_and_removes_dead_clients_ones() -> None:
    reader = ArenaReader()
    closed = Arena(f"cohort-{os.getpid()}-{uuid.uuid4().hex[:8]}-arena", 4096)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = Arena(f"cohort-{gone.pid}-{uuid.uuid4().hex[:8]}-arena", 4096)  # as a client that died leaves it
    live = Arena(f"cohort-{os.getpid()}-{uuid.uuid4().hex[:8]}-arena", 4096)
    try:
        for arena in (closed, orphan, live):
            offset, sequence = arena.take(8)
            reader.read(ShmRef(arena.name, offset, sequence), 8)
        assert reader.mapped() == sorted([closed.name, orphan.name, live.name])
        closed.close()
        reader.prune()
        assert reader.mapped() == sorted([orphan.name, live.name])
        reader.prune(remove_dead=True)
        assert reader.mapped() == [live.name]
        assert not (shm_dir() / orphan.name).exists() and (shm_dir() / live.name).exists()
    finally:
        reader.close()
        live.close()
        orphan.close()


def test_a_forked_child_freeing_its_copy_of_a_result_does_not_release_the_parents(arena: Arena) -> None:
    offset, sequence = arena.take(4096, reader=os.getpid())
    ref = ShmRef(arena.name, offset, sequence)
    reader = ArenaReader()
    try:
        held = reader.hold(ref, 4096)
        child = os.fork()
        if child == 0:  # the child frees the tensor it inherited, and leaves as a script would
            del held
            gc.collect()
            os._exit(0)
        os.waitpid(child, 0)
        assert reader.current(ref), "the child's finalizer gave the parent's result back to the writer"
        del held
        gc.collect()
        assert not reader.current(ref)  # the parent's own release still works
    finally:
        reader.close()


def test_an_empty_result_holds_no_region(arena: Arena) -> None:
    offset, sequence = arena.take(0, reader=os.getpid())
    reader = ArenaReader()
    try:
        assert reader.hold(ShmRef(arena.name, offset, sequence), 0).numel() == 0
        assert arena.take(10) is not None and arena.held() == 1  # the empty one went back at once
    finally:
        reader.close()


@pytest.mark.parametrize("pid", [-1, 1 << 40])
def test_a_reader_pid_that_names_no_process_is_taken_for_gone(arena: Arena, pid: int) -> None:
    arena.take(1000, reader=pid)
    time.sleep(0.01)
    assert arena.take(60_000) is not None  # reclaimed, not a crash and not held for good


def test_the_shared_memory_identity_names_the_user_and_the_boot() -> None:
    identity = shm_identity()
    assert identity.endswith(f":{os.geteuid()}")
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert identity.startswith(f.read().strip())
