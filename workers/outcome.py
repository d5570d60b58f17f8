"""A job's outcome, and how an exception becomes one.

Three kinds of failure need telling apart, because each asks for a different response:

- a fault of the device (most CUDA errors are sticky): the worker must exit and be
  replaced; ``Finished.fatal``;
- a transient one (out of memory): the job fails, the worker and its fused and compiled
  plans stay as they are, since the next call may well fit;
- a training call that failed after it had updated some models (``AlreadyStepped``): its
  jobs fail and are never run again, or those models would be stepped twice.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import CohortError, JobFailed

# Errors after which a CUDA context cannot be trusted: the worker exits and is replaced.
FATAL_CUDA_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure",
                      "misaligned address", "MPS client", "CUBLAS_STATUS_EXECUTION_FAILED")
OUT_OF_MEMORY_MARKERS = ("out of memory",)


@dataclass
class Finished:
    """A job's outcome, ready to be sent back."""

    job_id: int
    outputs: Any = None
    losses: list[float] | None = None
    error: CohortError | None = None
    traceback: str = ""
    fatal: bool = False  # the device is unusable after this; the worker must exit


class AlreadyStepped(Exception):
    """A training call failed after it had changed some models' weights or optimizer state."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in OUT_OF_MEMORY_MARKERS)


def is_device_fault(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(m in text for m in FATAL_CUDA_MARKERS) and not is_out_of_memory(exc)


def is_transient(exc: BaseException) -> bool:
    """An error that says nothing about whether the same call can run next time."""
    return is_out_of_memory(exc) or is_device_fault(exc)


def failure(job_id: int, exc: BaseException) -> Finished:
    """Turn an exception into a reply, keeping a ``CohortError``'s type."""
    text = traceback.format_exc()
    if isinstance(exc, CohortError):
        return Finished(job_id, error=exc, traceback=text)
    if isinstance(exc, AlreadyStepped):
        message = (f"{exc}; the training call had already updated some of its models, so it is not run again "
                   "(their weights may be part-way through this step)")
        return Finished(job_id, error=JobFailed(message), traceback=text, fatal=is_device_fault(exc.cause))
    message = f"{type(exc).__name__}: {exc}"
    return Finished(job_id, error=JobFailed(message), traceback=text, fatal=is_device_fault(exc))
