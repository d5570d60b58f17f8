"""Choosing the torch device a worker runs on."""

from __future__ import annotations

import torch

from core.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    """``auto`` is the first GPU when CUDA works, else the CPU; ``cuda`` without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"coordinator.device = {requested!r}, but CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"coordinator.device = {requested!r}, but only {torch.cuda.device_count()} GPU(s) exist")
        return torch.device("cuda", index)
    return device
