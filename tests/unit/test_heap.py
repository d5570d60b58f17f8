"""Once a cohort process is up, what it built at start-up (torch, the definitions) is out of the
collector's way: a full collection walks only what came after."""

from __future__ import annotations

import gc
import time

import torch  # noqa: F401 - the heap of a process that imported torch, as cohort's processes do

from core.heap import freeze_start_up_heap


def full_collection_s() -> float:
    began = time.perf_counter()
    gc.collect()
    return time.perf_counter() - began


def test_a_full_collection_after_the_freeze_skips_the_start_up_heap() -> None:
    before = min(full_collection_s() for _ in range(3))
    freeze_start_up_heap()
    try:
        assert gc.get_freeze_count() > 100_000
        after = min(full_collection_s() for _ in range(3))
    finally:
        gc.unfreeze()
    print(f"full collection: {before * 1000:.1f} ms before the freeze, {after * 1000:.2f} ms after")
    assert after < before / 5
