"""scheduler/__init__.py: the public API is what ``__all__`` says, and what DESIGN section 3 names."""

from __future__ import annotations

import inspect
import types

import pytest

import scheduler
from core import errors

DESIGN_ERRORS = ["UnknownModel", "BadInput", "Overloaded", "WorkerDied", "JobTimeout", "ProtocolError", "JobFailed"]


def test_all_names_exist() -> None:
    assert len(scheduler.__all__) == len(set(scheduler.__all__))
    for name in scheduler.__all__:
        assert hasattr(scheduler, name), f"scheduler.__all__ names {name!r}, which does not exist"


def test_documented_api_is_exported() -> None:
    for name in ["Client", "AsyncClient", "CohortError", *DESIGN_ERRORS]:
        assert name in scheduler.__all__, f"{name} is part of the documented API but not in __all__"
    from scheduler import AsyncClient, Client, CohortError  # noqa: F401  (the import DESIGN shows)


def test_every_public_name_is_in_all() -> None:
    """Like httpx's test_exported_members: nothing public that __all__ does not list."""
    public = {
        n for n, v in vars(scheduler).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }
    assert public <= set(scheduler.__all__) | {"__version__"}, public - set(scheduler.__all__)


@pytest.mark.parametrize("name", ["CohortError", "ConfigError", *DESIGN_ERRORS])
def test_errors_are_cohort_errors_and_cross_the_wire(name: str) -> None:
    cls = getattr(scheduler, name)
    assert inspect.isclass(cls) and issubclass(cls, scheduler.CohortError)
    assert cls is getattr(errors, name)
    err = errors.error_from_wire(name, "the message", "remote tb")
    assert type(err) is cls
    assert str(err) == "the message" and err.remote_traceback == "remote tb"


def test_every_error_class_is_known_to_the_wire() -> None:
    classes = {n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, errors.CohortError)}
    assert classes == set(errors.ERROR_TYPES)
    assert classes <= set(scheduler.__all__)


def test_unknown_remote_error_becomes_job_failed() -> None:
    err = errors.error_from_wire("ZeroDivisionError", "division by zero")
    assert type(err) is errors.JobFailed and "ZeroDivisionError" in str(err) and "division by zero" in str(err)


def test_clients_are_classes_with_the_documented_methods() -> None:
    methods = ["models", "infer", "train_step", "ensemble", "train_round", "submit", "barrier",
               "get_weights", "set_weights", "copy_weights", "snapshot", "stats",
               "evaluate", "set_hparams", "get_hparams", "reset"]
    for cls in (scheduler.Client, scheduler.AsyncClient):
        assert inspect.isclass(cls)
        for m in methods:
            assert callable(getattr(cls, m, None)), f"{cls.__name__}.{m} is missing"
    for m in ("__enter__", "__exit__", "close"):
        assert callable(getattr(scheduler.Client, m, None)), f"Client.{m} is missing"
    # Every call takes timeout= (DESIGN section 3: a client call never hangs forever).
    for m in methods:
        if m == "submit":
            continue
        assert "timeout" in inspect.signature(getattr(scheduler.Client, m)).parameters, f"Client.{m} has no timeout="
