"""The CUDA MPS control daemon: started for cohort's workers when asked, stopped on exit.

``mps = "auto"`` starts ``nvidia-cuda-mps-control -d`` when the device is a GPU and
the binary is present, with private pipe and log directories handed to every worker,
then proves the daemon usable by starting one CUDA client under it (the daemon answers
its pipe even when its server cannot start, and every worker would then fail); if any
of that fails it goes on without MPS and says why. ``"on"`` makes any failure an
error; ``"off"`` never starts it. Only a daemon cohort started is ever stopped.

The coordinator itself never initialises CUDA (``scheduler.gpu``): after a fatal fault
the MPS server takes no new client until every client has exited, and a coordinator
holding a CUDA context would keep the GPU's workers from ever coming back. The daemon
sees only the chosen GPU, named by UUID; its clients run without ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from core.errors import ConfigError

CONTROL = "nvidia-cuda-mps-control"
PROBE_TIMEOUT_S = 90.0
# A CUDA client under the daemon: creates a context and runs a kernel.
PROBE = "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"


@dataclass
class MpsDaemon:
    requested: str
    mode: str = "off"
    reason: str = ""
    pipe_dir: str = ""
    log_dir: str = ""
    thread_percentage: int | None = None
    _owned_dirs: list[str] = field(default_factory=list)
    _daemon_started: bool = False  # by cohort: the only daemon it ever stops

    def state(self) -> dict[str, object]:
        return {"mode": self.mode, "requested": self.requested, "reason": self.reason, "pipe_dir": self.pipe_dir}

    def start(self, device_type: str, daemon_env: dict[str, str] | None = None, parent_dir: str | None = None) -> None:
        """Start the daemon (seeing ``daemon_env``'s GPUs) and prove it serves a client, or say why not.

        Its pipe and log directories go under ``parent_dir`` (the run directory), so that a
        later start finds a killed run's daemon there (``scheduler.leftovers``)."""
        if self.requested == "off":
            self.reason = "mps = off in the config"
            return
        problem = self._precondition(device_type)
        if problem is None:
            problem = self._start_daemon(daemon_env or {}, parent_dir)
        if problem is None:
            self.mode = "on"
            self.reason = "started by cohort"
            return
        self.stop()  # a daemon that started but cannot serve is not left behind
        if self.requested == "on":
            raise ConfigError(f"coordinator.mps = 'on', but MPS cannot start: {problem}")
        self.reason = problem

    def _precondition(self, device_type: str) -> str | None:
        if device_type != "cuda":
            return f"device is {device_type}"
        if shutil.which(CONTROL) is None:
            return f"{CONTROL} not found on PATH"
        return None

    def _start_daemon(self, daemon_env: dict[str, str], parent_dir: str | None) -> str | None:
        if parent_dir is None:
            self.pipe_dir = tempfile.mkdtemp(prefix="cohort-mps-pipe-")
            self.log_dir = tempfile.mkdtemp(prefix="cohort-mps-log-")
        else:
            self.pipe_dir, self.log_dir = os.path.join(parent_dir, "mps-pipe"), os.path.join(parent_dir, "mps-log")
            os.makedirs(self.pipe_dir, mode=0o700)
            os.makedirs(self.log_dir, mode=0o700)
        self._owned_dirs = [self.pipe_dir, self.log_dir]
        errors = os.path.join(self.log_dir, "control-start.err")
        try:
            # Output to a file, not a pipe: the daemon may keep inherited pipes open, and
            # reading one to its end would wait for the daemon to exit.
            with open(errors, "w+") as err:
                result = subprocess.run([CONTROL, "-d"], env={**os.environ, **self._client_env(), **daemon_env},
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=20)
                err.seek(0)
                text = err.read().strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{CONTROL} -d failed: {exc}"
        if result.returncode != 0:
            return f"{CONTROL} -d exited {result.returncode}: {text}"
        self._daemon_started = True
        if self.control("get_server_list") is None:
            return "the MPS daemon started but does not answer on its pipe"
        return self._probe()

    def _probe(self) -> str | None:
        """Start one CUDA client under the daemon; why it failed, or None."""
        try:
            client = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # MPS clients must not set it
            result = subprocess.run([sys.executable, "-c", PROBE], env={**client, **self._client_env()},
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"a CUDA client could not start under the MPS daemon: {exc}"
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            return f"a CUDA client could not start under the MPS daemon: {last}"
        return None

    def _client_env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def worker_env(self, workers: int) -> dict[str, str]:
        """Variables a worker needs to join the daemon (none when MPS is off)."""
        if self.mode != "on":
            return {}
        env = self._client_env()
        if self.thread_percentage is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.thread_percentage)
        return env

    def control(self, command: str) -> str | None:
        """Send one command to the daemon; its answer, or None if it did not answer."""
        try:
            result = subprocess.run([CONTROL], input=command + "\n", env={**os.environ, **self._client_env()},
                                    capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout if result.returncode == 0 else None

    def terminate_client(self, pid: int) -> None:
        """Detach a worker from the MPS server before killing it, so it cannot hang the others."""
        if self.mode != "on":
            return
        servers = (self.control("get_server_list") or "").split()
        for server in servers:
            self.control(f"terminate_client {server} {pid}")

    def stop(self) -> None:
        if self._daemon_started:
            self.control("quit")
            self._daemon_started = False
        self.mode = "off"
        for path in self._owned_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._owned_dirs = []
