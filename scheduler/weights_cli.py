"""``cohort snapshot DIR`` and ``cohort load DIR``: weights to and from files, with progress.

``snapshot`` asks a running coordinator for a snapshot of every model (taken at a
barrier, written by the coordinator) and follows its progress through ``stats()``.
``load`` puts ``DIR/<group>/<index>.safetensors`` into the running models with
``set_weights``, one model at a time, after checking that every file is there.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from core.errors import CohortError
from scheduler.client import Client

POLL_S = 0.25


def snapshot_command(directory: str, address: str | None, timeout: float, console: Console | None = None) -> int:
    """Snapshot every model to ``directory``; a progress bar while the files are written."""
    console = console or Console(stderr=True)
    path = os.path.abspath(directory)
    outcome: dict[str, Any] = {}
    with Client(address, timeout=timeout) as client:

        def ask() -> None:
            try:
                outcome["done"] = client.snapshot(path, timeout=timeout)
            except CohortError as exc:
                outcome["error"] = exc

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        with _progress(console, bytes_column=True) as bar:
            task = bar.add_task("waiting for a barrier (jobs accepted before it finish first)", total=None)
            while asking.is_alive():
                asking.join(POLL_S)
                mine = _progress_of(client, path)
                if mine is not None:
                    bar.update(task, description=f"writing {mine['files']} files to {path}",
                               total=mine["bytes"], completed=mine["bytes_done"])
    if "error" in outcome:
        console.print(f"[red]snapshot failed[/red]: {type(outcome['error']).__name__}: {outcome['error']}")
        return 1
    done = outcome["done"]
    console.print(f"snapshot: {done['files']} models, {done.get('bytes', 0) / 1e6:.1f} MB in {path} "
                  f"({done.get('seconds', 0):.2f} s to write)")
    return 0


def _progress_of(client: Client, path: str) -> dict[str, Any] | None:
    """This snapshot's progress as the coordinator reports it, if it is writing it now."""
    try:
        writing = client.stats(timeout=2.0).get("snapshots", [])
    except CohortError:
        return None
    return next((s for s in writing if s["path"] == path), None)


def load_command(directory: str, address: str | None, timeout: float, console: Console | None = None) -> int:
    """``set_weights`` of every model from ``directory/<group>/<index>.safetensors``."""
    from safetensors.torch import load_file

    console = console or Console(stderr=True)
    root = Path(directory)
    with Client(address, timeout=timeout) as client:
        models = client.models()
        files = {m.id: root / m.group / f"{m.index}.safetensors" for m in models}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:  # all or nothing: a half-loaded fleet is worse than none
            console.print(f"[red]load: {len(missing)} of {len(files)} files missing[/red], nothing loaded: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            return 1
        began = time.monotonic()
        with _progress(console, bytes_column=False) as bar:
            task = bar.add_task(f"loading {len(files)} models from {root}", total=len(files))
            for model_id, path in files.items():
                try:
                    weights = load_file(str(path))
                except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
                    console.print(f"[red]load: cannot read {path}[/red]: {type(exc).__name__}: {exc}")
                    return 1
                try:
                    client.set_weights(model_id, weights)
                except CohortError as exc:
                    console.print(f"[red]load: {model_id} from {path} refused[/red]: {type(exc).__name__}: {exc}")
                    return 1
                bar.advance(task)
    console.print(f"load: {len(files)} models from {root} in {time.monotonic() - began:.2f} s")
    return 0


def _progress(console: Console, bytes_column: bool) -> Progress:
    count = DownloadColumn() if bytes_column else MofNCompleteColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
                    console=console, transient=False)
