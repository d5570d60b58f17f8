from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Every test here needs CUDA; without it they skip with the reason, never fail."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not ``"gpu" in item.keywords``: a test id may say gpu
            item.add_marker(skip)
