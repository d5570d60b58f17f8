"""Choosing how each call runs, by measuring every way it can run.

A worker can run the same work several ways: each job on its own model
(``one_by_one``); jobs waiting for one model as one larger batch (``concat``, dynamic
batching); jobs or models of a group stacked into one ``vmap`` call over the bank
(``vmap``), compiled instead (``vmap_compiled``) where the group compiles. Which
is cheapest depends on the model, the batch, the device and how many jobs wait: vmap
over convolutions on a CPU loses several-fold at large batch, over small MLPs it wins.
So nothing is assumed: for each *case* (one group's op on inputs of one shape) the
worker times every candidate the first times it meets it, keeps each one's cost per
job, and from then on runs the cheapest. How many jobs one vmap call takes is part of
the candidate (``vmap@8``, ``vmap@16``...): the measured curve says where joining stops
paying, and a larger size is tried only while the smaller one is not far off the best.
Now and then a candidate that is not in use is timed again, so that a change in load or
device is noticed; a change of plan is logged with the figures behind it.

This module holds the bookkeeping only (no torch): ``workers.batching`` says which
candidates a set of jobs has and runs the choice, the executors time the calls.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from core.messages import PlanReport

log = logging.getLogger("cohort.worker")

ONE_BY_ONE, CONCAT, VMAP, VMAP_COMPILED = "one_by_one", "concat", "vmap", "vmap_compiled"
WARMUP_CALLS = 1  # the first call of each candidate pays one-off costs (building the vmap, caches): not counted
TRUSTED_AFTER = 2  # measured calls before a candidate's cost is believed
WINDOW = 5  # a candidate's cost: the median of its last WINDOW measured calls
RECHECK_S = 5.0  # a candidate not in use is timed again after this (longer the worse it was)
SWITCH_BELOW = 0.9  # another candidate takes over when it costs under this fraction of the one in use
SAMPLE_LONE_EVERY = 8  # a lone job (nothing to choose) is timed once in this many, once its cost is known
EXPLORE_WITHIN = 2.0  # a larger vmap call is tried only while the next smaller one costs under this x the best


def bucket_down(n: int) -> int:
    """``n`` rounded down to a power of two: the load a choice is remembered for."""
    return 1 << (max(1, n).bit_length() - 1)


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to run: a plan, and how many jobs (or models) one call takes."""

    plan: str
    size: int = 1

    @property
    def label(self) -> str:
        return self.plan if self.plan == ONE_BY_ONE else f"{self.plan}@{self.size}"


@dataclass
class Choice:
    """What to run next, and whether to time it (always on a CPU; on a GPU when learning)."""

    candidate: Candidate
    measure: bool
    case: Hashable = None
    learning: bool = False  # tried to learn its cost (not yet known, or known long ago): one call only


class Estimate:
    """One candidate's measured cost per job."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self.measured_at = float("-inf")

    def add(self, per_job_s: float, now: float) -> None:
        self.calls += 1
        if self.calls > WARMUP_CALLS:
            self.samples.append(per_job_s)
            self.measured_at = now

    @property
    def trusted(self) -> bool:
        return len(self.samples) >= TRUSTED_AFTER

    @property
    def cost(self) -> float:
        return statistics.median(self.samples) if self.samples else float("inf")


@dataclass
class Case:
    """One kind of call: what it is for the report, and what is known of its candidates."""

    op: str
    inputs: str
    estimates: dict[Candidate, Estimate] = field(default_factory=dict)
    in_use: dict[int, Candidate] = field(default_factory=dict)  # load -> candidate chosen last for it
    rechecked_at: float = float("-inf")
    notes: list[str] = field(default_factory=list)

    def estimate(self, candidate: Candidate) -> Estimate:
        found = self.estimates.get(candidate)
        if found is None:
            found = self.estimates[candidate] = Estimate()
        return found


class PlanChooser:
    """One group's choices on this worker.

    ``pinned`` is the group's ``batching.plan``: ``"auto"`` chooses by cost; any other plan
    is used wherever it can run (and costs are still measured, for the report).
    ``always_measure``: every call is timed (a CPU, where timing is free); otherwise only
    the calls that teach something (a GPU, where timing means a synchronisation)."""

    def __init__(self, group: str, pinned: str = "auto", always_measure: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.group = group
        self.pinned = pinned
        self.always_measure = always_measure
        self.clock = clock
        self.cases: dict[Hashable, Case] = {}
        self._lone = 0  # lone jobs seen: one in SAMPLE_LONE_EVERY goes through the chooser

    def case(self, key: Hashable, op: str, inputs: str | Callable[[], str]) -> Case:
        """The case ``key``; ``inputs`` (or what it returns) describes it in reports, made once."""
        found = self.cases.get(key)
        if found is None:
            found = self.cases[key] = Case(op, inputs() if callable(inputs) else inputs)
        return found

    # ------------------------------------------------------------------ choosing

    def skip_lone(self) -> bool:
        """Whether a lone job (nothing to choose between) runs without the chooser: all but one in
        ``SAMPLE_LONE_EVERY``, which is timed for the cost of one job. Saves a few µs on each tiny job."""
        self._lone += 1
        return self._lone % SAMPLE_LONE_EVERY != 1

    def choose(self, key: Hashable, op: str, inputs: str | Callable[[], str], candidates: list[Candidate],
               load: int) -> Choice:
        """The candidate to run next for ``load`` jobs (or models) of case ``key``.

        ``candidates`` are what can run now (``one_by_one`` first), each plan's sizes ascending."""
        case = self.case(key, op, inputs)
        if len(candidates) == 1:  # nothing to weigh: timed where that is free, for the cost of one job
            case.in_use[bucket_down(load)] = candidates[0]
            return Choice(candidates[0], self.always_measure, key)
        if self.pinned != "auto":
            return self._pinned(case, key, candidates, load)
        explore = self._to_explore(case, candidates)
        if explore is not None:
            return Choice(explore, True, key, learning=True)
        best = self._best(case, candidates, bucket_down(load))
        recheck = self._to_recheck(case, candidates, best)
        if recheck is not None:
            return Choice(recheck, True, key, learning=True)
        return Choice(best, self.always_measure, key)

    def _pinned(self, case: Case, key: Hashable, candidates: list[Candidate], load: int) -> Choice:
        wanted = [c for c in candidates if c.plan == self.pinned or
                  (self.pinned == VMAP and c.plan == VMAP_COMPILED)]
        if self.pinned == VMAP and any(c.plan == VMAP_COMPILED for c in wanted):
            wanted = [c for c in wanted if c.plan == VMAP_COMPILED]  # the group asked for compiled calls
        chosen = max(wanted, key=lambda c: c.size) if wanted else candidates[0]
        case.in_use[bucket_down(load)] = chosen
        return Choice(chosen, self.always_measure, key)

    def _to_explore(self, case: Case, candidates: list[Candidate]) -> Candidate | None:
        """A candidate not yet trusted that is worth trying, fewest calls first; None when all are known.

        A larger size of a plan is tried only once the next smaller one is known and not far
        off the best: a curve that climbs (vmap over convolutions on a CPU) is not followed up."""
        best = min((e.cost for c in candidates if (e := case.estimates.get(c)) is not None and e.trusted),
                   default=float("inf"))
        open_: list[Candidate] = []
        smaller: dict[str, Estimate | None] = {}  # per plan: the estimate of the size before this one
        for c in candidates:
            estimate = case.estimates.get(c)
            before = smaller.get(c.plan, estimate)
            first = c.plan not in smaller
            smaller[c.plan] = estimate
            if estimate is not None and estimate.trusted:
                continue
            if not first and (before is None or not before.trusted or before.cost > EXPLORE_WITHIN * best):
                continue
            open_.append(c)
        if not open_:
            return None
        # Compiled calls first: their first call compiles (or loads) the shape, better paid at once.
        return min(open_, key=lambda c: (case.estimates[c].calls if c in case.estimates else 0,
                                         c.plan != VMAP_COMPILED, c.size))

    def _best(self, case: Case, candidates: list[Candidate], load: int) -> Candidate:
        known = [c for c in candidates if (e := case.estimates.get(c)) is not None and e.trusted]
        best = min(known, key=lambda c: case.estimates[c].cost) if known else candidates[0]
        current = case.in_use.get(load)
        if current is not None and current in known and current != best and \
                case.estimates[best].cost >= SWITCH_BELOW * case.estimates[current].cost:
            return current  # not clearly better: no flapping between near equals
        if current != best:
            self._say_change(case, load, current, best, known)
            case.in_use[load] = best
        return best

    def _to_recheck(self, case: Case, candidates: list[Candidate], best: Candidate) -> Candidate | None:
        """Now and then, the candidate measured longest ago (the one in use too, where calls are
        not all timed); one a times worse than the best waits a times longer."""
        now = self.clock()
        if now - case.rechecked_at < RECHECK_S:
            return None
        best_cost = case.estimates[best].cost if best in case.estimates else float("inf")
        due = []
        for c in candidates:
            estimate = case.estimates.get(c)
            if estimate is None or not estimate.trusted or (c == best and self.always_measure):
                continue
            ratio = max(1.0, estimate.cost / best_cost) if best_cost > 0 else 1.0
            if now - estimate.measured_at >= RECHECK_S * ratio:
                due.append((estimate.measured_at, c))
        case.rechecked_at = now
        return min(due)[1] if due else None

    def _say_change(self, case: Case, load: int, old: Candidate | None, new: Candidate, known: list[Candidate]) -> None:
        costs = ", ".join(f"{c.label} {_us(case.estimates[c].cost)}" for c in sorted(known, key=lambda c: case.estimates[c].cost))
        log.info("group %s: %s %s with %d at once: %s %s (per job: %s)", self.group, case.op, case.inputs, load,
                 "plan" if old is None else f"plan {old.label} ->", new.label, costs)

    # ------------------------------------------------------------------ measuring and reporting

    def record(self, choice: Choice, seconds: float, jobs: int, candidate: Candidate | None = None) -> None:
        """A timed call of ``choice`` (or of ``candidate``, what actually ran) that did ``jobs`` jobs."""
        case = self.cases.get(choice.case)
        if case is not None and jobs > 0:
            case.estimate(candidate or choice.candidate).add(seconds / jobs, self.clock())

    def note(self, key: Hashable, text: str) -> None:
        case = self.cases.get(key)
        if case is not None and text not in case.notes:
            case.notes.append(text)

    def report(self) -> list[PlanReport]:
        return [PlanReport(self.group, case.op, case.inputs, {load: c.label for load, c in sorted(case.in_use.items())},
                           {c.label: round(e.cost * 1e6, 1) for c, e in sorted(case.estimates.items()) if e.samples},
                           self.pinned != "auto", list(case.notes))
                for case in self.cases.values()]


def _us(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"
