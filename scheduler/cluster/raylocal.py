"""Find a running Ray cluster, or start a local head as ``ray start --head`` does, and stop it.

``ray.init(address="auto")`` reads the address file that ``ray start`` writes
(``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, then ``ray/ray_current_cluster``). A head
that died leaves that file behind, and ``auto`` then retries the dead address for
minutes, deaf to SIGTERM; so ``existing_address`` checks that the address answers
before anything connects to it.

A plain ``ray.init()`` that starts a cluster writes no address file (other processes
cannot find it with ``auto``) and dies with its driver; ``LocalHead`` runs
``ray start --head --block`` as a child instead: it writes the address file, other
drivers (``ClusterClient``) join it, and SIGTERM stops exactly its own processes (``ray
stop`` would end every Ray process on the machine, other users' included). The child
runs in a session of its own (a Ctrl-C in the terminal reaches the cohort process only,
which stops its actors first) and gets SIGTERM if that process dies (PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HEAD_START_TIMEOUT_S = 60.0
HEAD_STOP_TIMEOUT_S = 40.0
PR_SET_PDEATHSIG = 1
# What a head started by cohort runs with: no draining of leases for 30 s on SIGTERM
# (ray >= 2.5x), no usage reports.
HEAD_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def address_file() -> Path:
    """Where ``ray start`` writes the address ``auto`` reads."""
    try:
        from ray._common.utils import (
            get_ray_address_file,  # private: follow Ray's own rule when it is there
        )

        return Path(get_ray_address_file(None))
    except Exception:  # noqa: BLE001 - an older or newer Ray: the rule it has documented
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return Path(base) / "ray" / "ray_current_cluster"


def answers(address: str, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def existing_address(requested: str = "auto") -> str | None:
    """The Ray cluster to join: ``requested`` itself unless it is ``auto``; for ``auto``,
    ``$RAY_ADDRESS`` or a live address in the address file; None when no Ray runs."""
    if requested not in ("", "auto"):
        return requested
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    path = address_file()
    try:
        address = path.read_text().strip()
    except OSError:
        return None
    return address if address and answers(address) else None


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class LocalHead:
    """``ray start --head --block`` as a child process of this one."""

    def __init__(self, num_cpus: float, log_path: Path, num_gpus: int | None = None,
                 object_store_bytes: int = 100_000_000) -> None:
        self.command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port=0",
                        f"--num-cpus={max(1, math.ceil(num_cpus))}", "--include-dashboard=false",
                        "--include-log-monitor=false", "--disable-usage-stats",
                        f"--object-store-memory={object_store_bytes}"]
        if num_gpus is not None:
            self.command.append(f"--num-gpus={num_gpus}")
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.address: str | None = None

    def start(self, timeout_s: float = HEAD_START_TIMEOUT_S) -> str:
        """Start the head; its address once the address file holds a new one that answers."""
        path = address_file()
        old = _read(path)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **HEAD_ENV}, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with code {self.process.returncode}: "
                                   f"{self.log_tail()}")
            address = _read(path)
            if address and address != old and answers(address):
                self.address = address
                return address
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the local Ray head did not come up within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self, timeout_s: float = HEAD_STOP_TIMEOUT_S) -> None:
        """SIGTERM (it stops its node's processes), SIGKILL of its group if it hangs; its address
        file removed when it is still this head's."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # gcs and raylet share its group
                except ProcessLookupError:
                    pass
                process.wait(10)
        if self.address is not None and _read(address_file()) == self.address:
            address_file().unlink(missing_ok=True)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"


def remove_session(session_dir: str | None) -> None:
    """Remove a stopped head's session directory (its logs) and ``session_latest`` if it points there."""
    if not session_dir:
        return
    session = Path(session_dir)
    latest = session.parent / "session_latest"
    try:
        if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
            latest.unlink()
    except OSError:
        pass
    shutil.rmtree(session, ignore_errors=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def session_dir() -> str | None:
    """This driver's Ray session directory (private API; None if it moved)."""
    try:
        import ray

        return str(ray._private.worker.global_worker.node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - only used to tidy up logs
        return None

