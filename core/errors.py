"""The errors a cohort user can see.

Every failure a client call reports is a subclass of ``CohortError``; a worker's or
the coordinator's error crosses the wire as its class name, message and traceback
text, and the client raises the same class again.

    CohortError
    ├── ConfigError        bad config file or group definition (names the key)
    ├── UnknownModel       no such model id, index or group
    ├── BadInput           wrong shape, dtype, missing key, target unfit for the loss, too large
    ├── Overloaded         a bounded queue is full: retry later
    ├── WorkerDied         the worker running the job died before answering
    ├── JobTimeout         the job passed its deadline (or the coordinator did not answer in time)
    ├── ProtocolError      malformed message, unknown message type, version mismatch, lost connection
    └── JobFailed          the model raised (e.g. CUDA out of memory); carries the worker's text
"""

from __future__ import annotations


class CohortError(Exception):
    """Base class of every error cohort raises to its users."""

    def __init__(self, message: str, *, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.message = message
        # Text of the traceback where the error was raised, when that was another process.
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return self.message


class ConfigError(CohortError):
    """The config file or a group definition is invalid; the message names the key."""


class UnknownModel(CohortError):
    """The model id, index or group does not exist."""


class BadInput(CohortError):
    """The input or target does not match the group's spec or loss, or is too large."""


class Overloaded(CohortError):
    """A bounded queue is full; the job was not accepted."""


class WorkerDied(CohortError):
    """The worker holding the model died while the job was in flight."""


class JobTimeout(CohortError):
    """The job, or the call, passed its deadline."""


class ProtocolError(CohortError):
    """A message could not be decoded, had an unknown type or version, or the connection was lost."""


class JobFailed(CohortError):
    """The model raised an exception while running the job; the message carries its text."""


ERROR_TYPES: dict[str, type[CohortError]] = {
    cls.__name__: cls
    for cls in (
        CohortError,
        ConfigError,
        UnknownModel,
        BadInput,
        Overloaded,
        WorkerDied,
        JobTimeout,
        ProtocolError,
        JobFailed,
    )
}


def error_from_wire(name: str, message: str, traceback: str = "") -> CohortError:
    """Rebuild the error a peer reported; an unknown name becomes ``JobFailed``."""
    cls = ERROR_TYPES.get(name, JobFailed)
    if cls is JobFailed and name not in ERROR_TYPES:
        message = f"{name}: {message}"
    return cls(message, remote_traceback=traceback)
