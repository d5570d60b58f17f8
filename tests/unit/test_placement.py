"""scheduler/placement.py: contiguous, complete, balanced blocks.

What ``place`` promises (its docstring): each group cut into contiguous blocks, one per
worker, as even as possible (sizes differ by at most 1 within a group), empty blocks
omitted, and the worker taking the larger blocks rotating from group to group so that
the total number of models per worker stays even (totals differ by at most 1).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.placement import Block, place


def check(groups: list[tuple[str, int]], workers: int) -> list[Block]:
    blocks = place(groups, workers)
    by_group: dict[str, list[Block]] = defaultdict(list)
    for b in blocks:
        assert b.count > 0, f"empty block {b}"
        assert 0 <= b.worker < workers
        assert b.indices == list(range(b.start, b.start + b.count))
        by_group[b.group].append(b)
    assert set(by_group) == {name for name, count in groups if count > 0}
    totals: Counter[int] = Counter()
    for name, count in groups:
        mine = by_group.get(name, [])
        # Every model exactly once.
        placed = sorted(i for b in mine for i in b.indices)
        assert placed == list(range(count)), f"group {name}: placed {placed}"
        # At most one block per worker per group: each worker's part of a group is one bank.
        assert len({b.worker for b in mine}) == len(mine)
        # Blocks are contiguous ranges that tile 0..count-1 (a stacked input is split by
        # slicing rows lo:hi per block).
        ordered = sorted(mine, key=lambda b: b.start)
        at = 0
        for b in ordered:
            assert b.start == at
            at += b.count
        # As even as possible within the group.
        sizes = [b.count for b in mine] + [0] * (workers - len(mine))
        assert max(sizes) - min(sizes) <= 1, f"group {name}: block sizes {sizes}"
        for b in mine:
            totals[b.worker] += b.count
    all_totals = [totals[w] for w in range(workers)]
    assert max(all_totals) - min(all_totals) <= 1, f"models per worker {all_totals}"
    assert sum(all_totals) == sum(c for _, c in groups)
    return blocks


def test_demo_layout() -> None:
    blocks = check([("mlp", 8), ("cnn", 4), ("lm", 4)], 2)
    assert [(b.group, b.worker, b.start, b.count) for b in blocks] == [
        ("mlp", 0, 0, 4), ("mlp", 1, 4, 4),
        ("cnn", 0, 0, 2), ("cnn", 1, 2, 2),
        ("lm", 0, 0, 2), ("lm", 1, 2, 2),
    ]


def test_one_worker_gets_everything_in_one_block() -> None:
    blocks = check([("a", 5), ("b", 1)], 1)
    assert blocks == [Block("a", 0, 0, 5), Block("b", 0, 0, 1)]


def test_more_workers_than_models() -> None:
    blocks = check([("a", 2)], 5)
    assert len(blocks) == 2 and all(b.count == 1 for b in blocks)
    # Several small groups spread out instead of piling onto worker 0.
    blocks = check([("a", 1), ("b", 1), ("c", 1), ("d", 1)], 4)
    assert sorted(b.worker for b in blocks) == [0, 1, 2, 3]


def test_uneven_groups_rotate_the_larger_blocks() -> None:
    blocks = check([("a", 3), ("b", 3), ("c", 3)], 2)
    totals = Counter()
    for b in blocks:
        totals[b.worker] += b.count
    assert sorted(totals.values()) == [4, 5]


def test_empty_group_and_no_groups() -> None:
    assert place([], 3) == []
    assert check([("a", 0), ("b", 2)], 3)


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 64])
def test_large_group(workers: int) -> None:
    check([("big", 100_000)], workers)


@settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(
    counts=st.lists(st.integers(0, 40), max_size=8),
    workers=st.integers(1, 16),
)
def test_placement_properties(counts: list[int], workers: int) -> None:
    check([(f"g{i}", c) for i, c in enumerate(counts)], workers)


def test_block_indices() -> None:
    assert Block("g", 1, 3, 4).indices == [3, 4, 5, 6]
    assert Block("g", 1, 3, 0).indices == []
