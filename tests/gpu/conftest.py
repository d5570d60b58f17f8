from __future__ import annotations

import pytest
import torch
from cohort_harness import start_cohort, stop_and_check_clean


def pytest_collection_modifyitems(config, items):
    """Every test here needs CUDA; without it they skip with the reason, never fail."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not ``"gpu" in item.keywords``: a test id may say gpu
            item.add_marker(skip)


@pytest.fixture
def gpu_cohort(tmp_path):
    """Start coordinators on the GPU with ``gpu_cohort(groups, **settings)``; all are stopped at the end."""
    started = []

    def start(groups, **settings):
        settings.setdefault("device", "cuda")
        running = start_cohort(tmp_path, groups, name=f"c{len(started)}", **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        try:
            stop_and_check_clean(running)
        except AssertionError:
            running.stop()
