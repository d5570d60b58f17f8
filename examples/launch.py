"""What the training examples share: a coordinator of their own, started and always stopped.

``coordinator(address, groups, console)`` yields ``address`` when one is given (a
coordinator someone else runs). Without one it starts ``python -m scheduler run`` on a
config of ``groups``, on a private ``ipc://`` path (through ``tools/harness.py``, which the
tests and the benchmark use too), and on leaving, also on Ctrl-C, SIGTERM or an error,
stops it and every worker and removes every shared-memory segment and socket it made.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `scheduler` and `tools` importable
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from scheduler import CohortError  # noqa: E402
from tools import harness  # noqa: E402

WORKERS = 2


@contextmanager
def coordinator(address: str | None, groups: Sequence[dict[str, Any]], console: Console,
                workers: int = WORKERS) -> Iterator[str]:
    """The address of a coordinator: ``address`` as given, or one started here for ``groups``."""
    if address:
        yield address
        return
    threads = max(1, (os.cpu_count() or 1) // workers)  # the cores shared out between the workers
    console.print(f"Starting a coordinator with {workers} workers ...")
    settings = {"workers": workers, "device": "auto", "mps": "auto"}  # the GPU if there is one
    running = harness.start(groups, settings, prefix="cohort-example-",
                            env={"OMP_NUM_THREADS": str(threads)}, args=["--log-level", "WARNING"])
    try:
        console.print(f"Coordinator at {running.address} (run {running.run_id}, device {running.info.get('device')})")
        yield running.address
    finally:
        leaks = running.close()  # SIGINT, a grace, SIGKILL if it must; then whatever it left is removed
        console.print("Coordinator stopped" + ("" if leaks.clean else f"; removed what it left: {leaks.as_dict()}"))


def positive(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the coordinator


def run_main(run: Callable[[Console], None]) -> int:
    """Run an example; its exit code. SIGTERM and Ctrl-C unwind (the coordinator is stopped)."""
    console = Console(soft_wrap=True)  # long lines whole, also when piped: they are the results
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run(console)
    except KeyboardInterrupt:
        console.print("Interrupted.")
        return 130
    except (CohortError, harness.StartFailed) as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/red]")
        return 1
    return 0
