"""scheduler/barrier.py and scheduler/jobs.py: barriers, fences, and slicing stacked frames."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.tensors import (
    NO_TENSORS,
    TensorTree,
    decode_tensors,
    encode_tensors,
    join_rows,
    slice_rows,
)
from scheduler.barrier import Barrier, Barriers
from scheduler.jobs import Job
from scheduler.placement import place

# --------------------------------------------------------------------------- barriers


def barrier(scope: list[tuple[str, int]] | None, waiting: set[int], log: list[str], name: str) -> Barrier:
    return Barrier(None if scope is None else frozenset(scope), set(waiting), lambda: log.append(name))


def test_barrier_with_nothing_to_wait_for_completes_at_once() -> None:
    log: list[str] = []
    bs = Barriers()
    b = barrier(None, set(), log, "b")
    bs.add(b)
    assert log == ["b"] and b.done and bs.open == []
    assert bs.fences_for([("mlp", 0)]) == []


def test_barrier_completes_when_its_last_job_finishes() -> None:
    log: list[str] = []
    bs = Barriers()
    b = barrier([("mlp", 0), ("mlp", 1)], {1, 2}, log, "b")
    bs.add(b)
    assert not b.done and bs.open == [b]
    bs.job_finished(99)  # not one of its jobs
    bs.job_finished(1)
    assert log == [] and not b.done
    bs.job_finished(2)
    assert log == ["b"] and b.done and bs.open == []
    bs.job_finished(2)  # finishing twice does not run the action again
    assert log == ["b"]


def test_fences_follow_the_scope() -> None:
    log: list[str] = []
    bs = Barriers()
    everything = barrier(None, {1}, log, "all")
    mlp0 = barrier([("mlp", 0)], {2}, log, "mlp0")
    bs.add(everything)
    bs.add(mlp0)
    assert bs.fences_for([("mlp", 0)]) == [everything, mlp0]
    assert bs.fences_for([("mlp", 1)]) == [everything]
    assert bs.fences_for([("cnn", 0), ("mlp", 0)]) == [everything, mlp0]
    assert bs.fences_for([]) == [everything]
    assert mlp0.covers([("mlp", 1), ("mlp", 0)]) and not mlp0.covers([("mlp", 1)])


def test_actions_run_in_acceptance_order() -> None:
    log: list[str] = []
    bs = Barriers()
    for name in ("first", "second", "third"):
        bs.add(barrier(None, {7}, log, name))
    bs.job_finished(7)
    assert log == ["first", "second", "third"]
    assert bs.open == []


def test_job_is_fenced_until_its_barriers_complete() -> None:
    log: list[str] = []
    bs = Barriers()
    b1 = barrier([("mlp", 0)], {1}, log, "b1")
    b2 = barrier(None, {1, 2}, log, "b2")
    bs.add(b1)
    bs.add(b2)
    job = Job(3, b"client", 1, "infer", "mlp", [("mlp", 0)], 0.0, None, fences=bs.fences_for([("mlp", 0)]))
    assert job.fences == [b1, b2]
    assert job.fenced()
    bs.job_finished(1)
    assert b1.done and not b2.done and job.fenced()
    bs.job_finished(2)
    assert not job.fenced() and job.fences == []
    unfenced = Job(4, b"client", 2, "infer", "mlp", [("mlp", 1)], 0.0, None)
    assert not unfenced.fenced()


def test_failing_action_still_marks_the_barrier_done() -> None:
    bs = Barriers()

    def boom() -> None:
        raise RuntimeError("boom")

    b = Barrier(None, {1}, boom)
    bs.add(b)
    with pytest.raises(RuntimeError):
        bs.job_finished(1)
    assert b.done and bs.open == []


def test_failing_action_does_not_strand_the_next_barrier() -> None:
    """Two barriers become ready on the same job; the first's action raises. The second
    must still complete: nothing else may ever finish to release the jobs it fences."""
    log: list[str] = []
    bs = Barriers()

    def boom() -> None:
        raise RuntimeError("boom")

    first = Barrier(None, {1}, boom)
    second = barrier(None, {1}, log, "second")
    bs.add(first)
    bs.add(second)
    try:
        bs.job_finished(1)
    except RuntimeError:
        pass
    assert second.done and log == ["second"] and bs.open == []


# --------------------------------------------------------------------------- slicing stacked frames


def stacked(k: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(k)
    return {
        "tensor": torch.randn(k, 3, 5, generator=g),
        "tuple": (torch.randint(0, 9, (k, 4), generator=g), torch.rand(k, generator=g) > 0.5),
        "dict": {"x": torch.randn(k, 2, generator=g).to(torch.bfloat16), "ids": torch.arange(k * 6).reshape(k, 2, 3).to(torch.int16)},
    }


def leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return list(value.values()) if isinstance(value, dict) else list(value)


@pytest.mark.parametrize("layout", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("workers", [1, 2, 3, 8, 11])
def test_slice_then_join_is_the_identity(layout: str, workers: int) -> None:
    k = 8
    value = stacked(k)[layout]
    tree, bufs = encode_tensors(value)
    bufs = [bytes(b) for b in bufs]
    pieces = []
    for block in place([("g", k)], workers):
        lo, hi = block.start, block.start + block.count
        part_tree, part_bufs = slice_rows(tree, bufs, lo, hi)
        assert part_tree.layout == tree.layout and part_tree.keys == tree.keys
        got = decode_tensors(part_tree, part_bufs)
        for whole, part in zip(leaves(value), leaves(got)):
            assert torch.equal(part, whole[lo:hi])
        pieces.append((part_tree, part_bufs))
    joined_tree, joined_bufs = join_rows(pieces)
    assert joined_tree == tree
    assert [bytes(b) for b in joined_bufs] == bufs
    for a, b in zip(leaves(value), leaves(decode_tensors(joined_tree, joined_bufs))):
        assert torch.equal(a, b)


def test_slice_is_a_view_of_the_frame() -> None:
    t = torch.arange(12, dtype=torch.int32).reshape(4, 3)
    tree, bufs = encode_tensors(t)
    frame = bytearray(bytes(bufs[0]))
    part_tree, part_bufs = slice_rows(tree, [frame], 2, 4)
    assert part_tree.metas[0].shape == (2, 3)
    frame[24] = 99  # first byte of row 2
    assert decode_tensors(part_tree, part_bufs)[0, 0].item() == 99


def test_empty_slice_and_empty_rows() -> None:
    t = torch.randn(4, 3)
    tree, bufs = encode_tensors(t)
    part_tree, part_bufs = slice_rows(tree, bufs, 2, 2)
    assert decode_tensors(part_tree, part_bufs).shape == (0, 3)
    tree, bufs = encode_tensors(torch.empty(0, 5))
    part_tree, part_bufs = slice_rows(tree, bufs, 0, 0)
    assert decode_tensors(part_tree, part_bufs).shape == (0, 5)
    assert slice_rows(NO_TENSORS, [], 0, 3) == (NO_TENSORS, [])


def test_join_results_of_different_sizes() -> None:
    a, b = torch.randn(3, 2), torch.randn(5, 2)
    pieces = [encode_tensors((a, a[:, 0])), encode_tensors((b, b[:, 0]))]
    tree, bufs = join_rows(pieces)
    assert isinstance(tree, TensorTree)
    got = decode_tensors(tree, bufs)
    assert torch.equal(got[0], torch.cat([a, b])) and torch.equal(got[1], torch.cat([a[:, 0], b[:, 0]]))
