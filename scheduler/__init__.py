"""cohort: many models of one architecture, distinct weights, concurrently on one GPU.

The public API is the client library and its errors::

    from scheduler import Client, AsyncClient, CohortError
"""

from __future__ import annotations

__version__ = "0.1.0"

from core.errors import (
    BadInput,
    CohortError,
    ConfigError,
    JobFailed,
    JobTimeout,
    Overloaded,
    ProtocolError,
    UnknownModel,
    WorkerDied,
)
from core.messages import ModelInfo
from scheduler.client import AsyncClient, Client, default_address

__all__ = [
    "AsyncClient",
    "BadInput",
    "Client",
    "CohortError",
    "ConfigError",
    "JobFailed",
    "JobTimeout",
    "ModelInfo",
    "Overloaded",
    "ProtocolError",
    "UnknownModel",
    "WorkerDied",
    "__version__",
    "default_address",
]
