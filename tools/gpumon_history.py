"""Recent history for the monitor's sparklines.

The live view shows how GPU utilization and cohort's throughput moved over the last
minute, because one number per second hides whether the GPU is steadily full or
bursting between idle gaps. This module keeps that short history and draws it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

BLOCKS = "▁▂▃▄▅▆▇█"
HISTORY_LENGTH = 60


def sparkline(
    values: Iterable[float | None],
    lo: float | None = None,
    hi: float | None = None,
) -> str:
    """Draw values as one line of block characters, one character per value.

    `lo`/`hi` fix the scale (utilization is always 0..100 so that a flat 5% does not
    look like a full GPU); left out, the scale spans the values themselves, floored
    at 0 so that throughput near zero draws low. Missing samples (None: the source was
    unreachable) draw as a space, so gaps stay visible instead of being invented.
    """
    points = list(values)
    known = [v for v in points if v is not None]
    if not known:
        return " " * len(points)
    low = min(0.0, *known) if lo is None else lo
    high = max(known) if hi is None else hi
    span = high - low
    chars = []
    for value in points:
        if value is None:
            chars.append(" ")
            continue
        # Half-up rounding: Python's round() sends 3.5 and 4.5 both to 4.
        level = 0 if span <= 0 else int((value - low) / span * (len(BLOCKS) - 1) + 0.5)
        chars.append(BLOCKS[min(max(level, 0), len(BLOCKS) - 1)])
    return "".join(chars)


class History:
    """The last `length` samples of per-GPU utilization and of jobs per second.

    Owned by the refresh loop and passed to the pure render function, so rendering
    stays testable and no state lives at module level.
    """

    def __init__(self, length: int = HISTORY_LENGTH) -> None:
        self.length = length
        self.gpu_util: dict[int, deque[float | None]] = {}
        self.jobs_per_s: deque[float | None] = deque(maxlen=length)

    def add(self, sample: Mapping[str, Any]) -> None:
        """Append one sample's figures; absent figures become gaps."""
        seen = set()
        for position, gpu in enumerate(sample.get("gpus") or []):
            index = gpu_index(gpu, position)
            seen.add(index)
            series = self.gpu_util.setdefault(index, deque(maxlen=self.length))
            series.append(_number(gpu.get("utilization")))
        # A GPU missing from this sample (NVML hiccup) gets a gap, keeping every
        # series aligned in time with the others.
        for index, series in self.gpu_util.items():
            if index not in seen:
                series.append(None)
        stats = sample.get("coordinator") or {}
        self.jobs_per_s.append(_number(stats.get("jobs_per_s")))


def gpu_index(gpu: Mapping[str, Any], position: int) -> int:
    """The GPU's NVML index, or its position in the list when the index is unusable."""
    index = gpu.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else position


def _number(value: Any) -> float | None:
    """A float, or None for anything that is not a number (bad or missing data)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
