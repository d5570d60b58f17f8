"""Make docs/gpumon/screenshot.{svg,txt}: the real `gpumon.py --once` on a loaded demo.

    python tools/gpumon_screenshot.py [--config examples/demo.toml] [--seconds 8]
                                      [--width 110] [--out docs/gpumon/screenshot]

Starts the demo coordinator on a private ipc:// address, keeps it busy from a few
client threads (inference on every group, training steps on the MLPs and CNNs, a few
requests pipelined per thread so queues are not empty), then runs
`tools/gpumon.py --once --export-svg ... --export-text ...` against it while the load
is still running, and stops everything. On a machine without a GPU the view says so
in its one line; run it on a GPU machine for a screenshot with GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = 4  # requests each load thread keeps outstanding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    parser.add_argument("--seconds", type=float, default=8.0, help="load before the shot")
    parser.add_argument("--width", type=int, default=110)
    parser.add_argument("--out", default=str(ROOT / "docs" / "gpumon" / "screenshot"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    with tempfile.TemporaryDirectory(prefix="gpumon-shot-") as folder:
        address = f"ipc://{folder}/coordinator.sock"
        coordinator = start_coordinator(args.config, address, folder)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            wait_until_answering(address, coordinator)
            threads = [
                threading.Thread(target=load, args=(address, group, stop, seed), daemon=True)
                for seed, group in enumerate(("mlp", "mlp", "cnn", "lm"))
            ]
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tools" / "gpumon.py"),
                    "--once",
                    "--address",
                    address,
                    "--width",
                    str(args.width),
                    "--export-svg",
                    str(out.with_suffix(".svg")),
                    "--export-text",
                    str(out.with_suffix(".txt")),
                ],
                cwd=ROOT,
                check=True,
                timeout=120,
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            stop_coordinator(coordinator)
    return 0


def start_coordinator(config: str, address: str, folder: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler", "run", "--config", config, "--address", address],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": folder},  # worker sockets stay in our folder
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_until_answering(address: str, coordinator: subprocess.Popen[bytes]) -> None:
    from core.errors import CohortError
    from scheduler import Client

    deadline = time.monotonic() + 120
    with Client(address, timeout=1.0) as client:
        while True:
            if coordinator.poll() is not None:
                raise SystemExit(f"coordinator exited with {coordinator.returncode}")
            try:
                client.models(timeout=1.0)
                return
            except CohortError:
                if time.monotonic() > deadline:
                    raise SystemExit("coordinator not answering after 120 s") from None
                time.sleep(0.2)


def stop_coordinator(coordinator: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(coordinator.pid, signal.SIGTERM)
    try:
        coordinator.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(coordinator.pid, signal.SIGKILL)
        coordinator.wait(timeout=20)


def load(address: str, group: str, stop: threading.Event, seed: int) -> None:
    """Keep PIPELINE requests of one group in flight until told to stop."""
    import torch

    from scheduler import Client

    generator = torch.Generator().manual_seed(seed)
    shapes = {"mlp": (8, 64), "cnn": (8, 3, 32, 32), "lm": (8, 32)}
    counts = {"mlp": 8, "cnn": 4, "lm": 4}
    outstanding: deque[Future[Any]] = deque()
    step = 0
    with Client(address, timeout=60) as client:
        while not stop.is_set():
            model = f"{group}/{step % counts[group]}"
            if group == "lm":
                inputs = torch.randint(0, 128, shapes[group], generator=generator)
                outstanding.append(client.submit("infer", model, inputs))
            elif step % 2:
                inputs = torch.randn(shapes[group], generator=generator)
                targets = torch.randint(0, 10, (shapes[group][0],), generator=generator)
                outstanding.append(client.submit("train_step", model, inputs, targets))
            else:
                inputs = torch.randn(shapes[group], generator=generator)
                outstanding.append(client.submit("infer", model, inputs))
            step += 1
            if len(outstanding) >= PIPELINE:
                outstanding.popleft().result(timeout=60)
        for future in outstanding:
            with contextlib.suppress(Exception):  # shutting down: answers no longer matter
                future.result(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
