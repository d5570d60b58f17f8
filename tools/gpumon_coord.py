"""Coordinator figures for the monitor, through cohort's public client.

The monitor asks the coordinator for `stats()` exactly as a user's script would, so it
exercises the same path and needs no private access. A coordinator that is down or
restarting is normal while watching: every failure becomes a one-line error and the
next sample tries again with a fresh client.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

# Same default as cohort's Client, so `gpumon.py` with no flags watches the
# coordinator a plain `Client()` would talk to.
# (tests/unit/test_gpumon.py checks both against scheduler/config.py.)
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "COHORT_ADDRESS"


def default_address() -> str:
    """$COHORT_ADDRESS, else the client's default address."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


class CoordinatorSource:
    """Reads `Client.stats()`; never raises.

    `connect(address, timeout)` makes the client; the default imports cohort's
    `scheduler.Client` on first use rather than at module import, so the monitor still
    shows the GPU and host where the cohort package cannot be imported. One client is
    kept while the coordinator answers (call from one thread: Client keeps a socket per
    calling thread) and replaced after any failure.
    """

    def __init__(
        self,
        address: str,
        timeout: float,
        connect: Callable[[str, float], Any] | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._connect = connect or cohort_client
        self._client: Any = None

    def sample(self) -> tuple[dict[str, Any] | None, str | None]:
        """Return (stats, None) or (None, one-line reason)."""
        try:
            client = self._connected()
            stats = client.stats(timeout=self.timeout)
        except ImportError as exc:
            return None, _one_line(f"cohort client not importable: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure is a line in the view
            # A failed client may hold a half-dead connection to a coordinator that
            # has since restarted; a fresh one reconnects cleanly.
            self.close()
            return None, _one_line(f"{type(exc).__name__}: {exc}")
        if not isinstance(stats, dict):
            return None, f"stats() returned {type(stats).__name__}, expected dict"
        return stats, None

    def close(self) -> None:
        """Drop the client; the next sample creates a new one."""
        client, self._client = self._client, None
        if client is None:
            return
        # Closing a broken client has nothing left to report.
        with contextlib.suppress(Exception):
            client.close()

    def _connected(self) -> Any:
        if self._client is None:
            self._client = self._connect(self.address, self.timeout)
        return self._client


def cohort_client(address: str, timeout: float) -> Any:
    """The client cohort's users script against, `scheduler.Client`."""
    from scheduler import Client

    return Client(address, timeout=timeout)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"
