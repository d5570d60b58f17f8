"""Barriers: wait for every job accepted before, within a scope; hold the ones after.

A barrier records the jobs in its scope that are queued or in flight when it is
accepted. It completes when the last of them finishes (or fails); then its action
runs (a weight read or write, a snapshot, a reply), and only then may jobs in its
scope that were accepted after it be dispatched: each such job carries the open
barriers it must wait for (its fences).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.spec import ModelKey


@dataclass(eq=False)
class Barrier:
    scope: frozenset[ModelKey] | None  # None: every model
    waiting: set[int]
    action: Callable[[], None]
    done: bool = False

    def covers(self, models: list[ModelKey]) -> bool:
        return self.scope is None or any(m in self.scope for m in models)


@dataclass
class Barriers:
    """The open barriers, in the order they were accepted."""

    open: list[Barrier] = field(default_factory=list)

    def add(self, barrier: Barrier) -> None:
        if barrier.waiting:
            self.open.append(barrier)
        else:
            self._complete(barrier)

    def fences_for(self, models: list[ModelKey]) -> list[Barrier]:
        if not self.open:  # the usual case, once per job
            return []
        return [b for b in self.open if b.covers(models)]

    def job_finished(self, job_id: int) -> None:
        """Tell every barrier that ``job_id`` is over; complete those with nothing left."""
        ready = []
        for barrier in self.open:
            barrier.waiting.discard(job_id)
            if not barrier.waiting:
                ready.append(barrier)
        errors = []
        for barrier in ready:
            self.open.remove(barrier)
            try:
                self._complete(barrier)
            except Exception as exc:  # the others must still complete, or their fenced jobs wait forever
                errors.append(exc)
        if errors:
            raise errors[0]

    @staticmethod
    def _complete(barrier: Barrier) -> None:
        try:
            barrier.action()
        finally:
            barrier.done = True
