"""Placing each group's models on the workers.

Every group is cut into contiguous blocks, one per worker, as even as possible, so an
ensemble or a training round spreads over all workers, and each worker's part of a
group is one bank. The worker that takes the larger blocks rotates from group to group
so that the total number of models stays even.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Block:
    """Models ``start .. start + count - 1`` of ``group`` on ``worker``."""

    group: str
    worker: int
    start: int
    count: int

    @cached_property
    def indices(self) -> list[int]:  # shared: callers must not change it
        return list(range(self.start, self.start + self.count))


def place(groups: list[tuple[str, int]], workers: int) -> list[Block]:
    """Blocks for ``groups`` (name, model count) over ``workers`` workers; empty blocks omitted."""
    blocks: list[Block] = []
    rotation = 0
    for name, count in groups:
        base, extra = divmod(count, workers)
        sizes = [base + (1 if (w - rotation) % workers < extra else 0) for w in range(workers)]
        rotation = (rotation + extra) % workers
        start = 0
        for worker, size in enumerate(sizes):
            if size:
                blocks.append(Block(name, worker, start, size))
            start += size
    return blocks
