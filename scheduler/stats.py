"""Counters and latency figures the coordinator reports through ``stats()``."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

LATENCY_WINDOW = 10_000
RATE_WINDOW_S = 10.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class JobStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    per_model: Counter[Hashable] = field(default_factory=Counter)  # jobs finished, by the caller's model key
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    finish_times: deque[float] = field(default_factory=deque)

    rejected: int = 0
    rejected_errors: Counter[str] = field(default_factory=Counter)

    def record_submit(self) -> None:
        self.submitted += 1

    def record_rejected(self, error: str) -> None:
        """A job refused before it was queued (bad input, unknown model, overloaded)."""
        self.rejected += 1
        self.rejected_errors[error] += 1

    def record_finish(self, models: Iterable[Hashable], latency_s: float, error: str | None) -> None:
        now = time.monotonic()
        if error is None:
            self.completed += 1
        else:
            self.failed += 1
            self.errors[error] += 1
        per_model = self.per_model
        for model in models:  # not Counter.update: its check for a mapping costs more than the count, on every job
            per_model[model] += 1
        self.latencies.append(latency_s)
        self.finish_times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.finish_times and now - self.finish_times[0] > RATE_WINDOW_S:
            self.finish_times.popleft()

    def jobs_per_s(self, uptime_s: float) -> float:
        self._trim(time.monotonic())
        span = min(RATE_WINDOW_S, max(uptime_s, 1e-3))
        return len(self.finish_times) / span

    def latency_ms(self) -> dict[str, float]:
        values = sorted(self.latencies)
        return {f"p{int(q * 100)}": round(percentile(values, q) * 1000, 3) for q in (0.5, 0.9, 0.99)}

    def summary(self, uptime_s: float) -> dict[str, object]:
        return {
            "jobs": {"submitted": self.submitted, "completed": self.completed, "failed": self.failed,
                     "errors": dict(self.errors), "rejected": self.rejected,
                     "rejected_errors": dict(self.rejected_errors)},
            "jobs_per_s": round(self.jobs_per_s(uptime_s), 3),
            "latency_ms": self.latency_ms(),
        }
