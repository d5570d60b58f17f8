"""cohort: many models of one architecture, distinct weights, concurrently on one GPU.

The public API is the client library and its errors::

    from scheduler import Client, AsyncClient, CohortError
    from scheduler import ClusterClient, AsyncClusterClient   # a cluster on Ray (pip install cohort[ray])
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

_CLUSTER = ("AsyncClusterClient", "ClusterClient")


def __getattr__(name: str) -> object:
    """The cluster clients, imported on first use: ``import scheduler`` never loads the cluster
    package (nor Ray, which only a cluster client's constructor imports)."""
    if name in _CLUSTER:
        from scheduler.cluster import client

        return getattr(client, name)
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "AsyncClusterClient",
    "BadInput",
    "Client",
    "ClusterClient",
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
