from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cohort_harness import RunningCohort, start_cohort


@pytest.fixture
def cohort(tmp_path: Path) -> Iterator[Callable[..., RunningCohort]]:
    """Start coordinators with ``cohort(groups, **coordinator_settings)``; all are stopped at the end,
    and whatever they left (processes, shared memory, run directories) is removed."""
    started: list[RunningCohort] = []

    def start(groups: list[dict[str, Any]], **settings: Any) -> RunningCohort:
        running = start_cohort(tmp_path, groups, name=f"cohort{len(started)}", **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()
