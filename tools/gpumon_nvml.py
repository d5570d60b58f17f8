"""GPU figures from NVML, MPS-aware.

The monitor reads the GPU through NVML directly rather than through the coordinator so
that it still reports the GPU when the coordinator is down, and so that it sees every
process on the GPU, not only cohort's.

Under CUDA MPS every client's kernels run inside `nvidia-cuda-mps-server`, so NVML
credits the GPU's activity to the server: per-process utilization means nothing there
and we do not report it. Memory is still attributed per client, but NVML lists MPS
clients apart from ordinary processes (`nvmlDeviceGetMPSComputeRunningProcesses`), so
both lists are read and each process is marked as the MPS server, an MPS client or an
ordinary process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import psutil

MPS_SERVER_NAME = "nvidia-cuda-mps-server"

# NVML error class names mapped to the one line a user needs; anything else keeps
# NVML's own text.
_ERROR_TEXT = {
    "NVMLError_LibraryNotFound": "NVML library not found",
    "NVMLError_DriverNotLoaded": "NVIDIA driver not loaded",
    "NVMLError_NoPermission": "no permission to query NVML",
    "NVMLError_Uninitialized": "NVML not initialized",
}


def nvml_error_text(exc: BaseException) -> str:
    """One line saying why NVML gave no figures."""
    text = _ERROR_TEXT.get(type(exc).__name__) or str(exc) or type(exc).__name__
    return " ".join(text.split())


def process_info(pid: int) -> tuple[str, str]:
    """Name and short command line of a process, '?' when it is not visible to us.

    GPU processes may run in another PID namespace (containers) or belong to another
    user; that must not cost the rest of the sample.
    """
    try:
        proc = psutil.Process(pid)
        name = proc.name()
    except (psutil.Error, OSError):
        return "?", ""
    try:
        command = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        command = ""
    return name, command


class NvmlSource:
    """Samples every GPU NVML can see; never raises.

    NVML is initialized lazily and again after a failure, so a driver that appears
    (or a GPU that comes back) after the monitor started is picked up.
    """

    def __init__(
        self,
        nvml: Any = None,
        describe_process: Callable[[int], tuple[str, str]] = process_info,
    ) -> None:
        self._nvml = nvml
        self._describe_process = describe_process
        self._ready = False

    def sample(self) -> tuple[list[dict[str, Any]], str | None]:
        """Return (one dict per GPU, None) or ([], one-line reason)."""
        try:
            nvml = self._initialized()
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                return [], "NVML reports no GPUs"
            return [self._gpu(nvml, index) for index in range(count)], None
        except Exception as exc:  # noqa: BLE001 - any failure is a line in the view
            self.close()
            return [], nvml_error_text(exc)

    def close(self) -> None:
        """Release NVML; the next sample initializes it again."""
        if self._ready and self._nvml is not None:
            # Shutting down a broken NVML has nothing left to report.
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._ready = False

    def _initialized(self) -> Any:
        if self._nvml is None:
            import pynvml  # imported here so a missing package is a sample error

            self._nvml = pynvml
        if not self._ready:
            self._nvml.nvmlInit()
            self._ready = True
        return self._nvml

    def _gpu(self, nvml: Any, index: int) -> dict[str, Any]:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        field_errors = _field_errors(nvml)

        def read(fn: Callable[[], Any]) -> Any:
            # One unsupported field (power on some boards, clocks under MIG) must not
            # hide the others.
            try:
                return fn()
            except field_errors:
                return None

        util = read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power_mw = read(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        return {
            "index": index,
            "name": _text(read(lambda: nvml.nvmlDeviceGetName(handle))),
            "uuid": _text(read(lambda: nvml.nvmlDeviceGetUUID(handle))),
            "utilization": getattr(util, "gpu", None),
            "memory_utilization": getattr(util, "memory", None),
            "memory_used": getattr(memory, "used", None),
            "memory_total": getattr(memory, "total", None),
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
            "temperature_c": read(lambda: _temperature(nvml, handle)),
            "clock_sm_mhz": read(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            "clock_mem_mhz": read(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
            "processes": self._processes(nvml, handle),
        }

    def _processes(self, nvml: Any, handle: Any) -> list[dict[str, Any]]:
        """Compute processes on one GPU, MPS clients included, one entry per pid."""
        listed: dict[int, tuple[Any, bool]] = {}
        # MPS clients first: a pid in both lists is an MPS client.
        for function, mps_client in (
            ("nvmlDeviceGetMPSComputeRunningProcesses", True),
            ("nvmlDeviceGetComputeRunningProcesses", False),
        ):
            for proc in _versioned(nvml, function, handle):
                listed.setdefault(int(proc.pid), (proc, mps_client))
        processes = []
        for pid, (proc, mps_client) in sorted(listed.items()):
            name, command = self._describe_process(pid)
            processes.append(
                {
                    "pid": pid,
                    "name": name,
                    "command": command,
                    # None where the driver cannot attribute memory to the process.
                    "memory_used": getattr(proc, "usedGpuMemory", None),
                    "mps_server": name == MPS_SERVER_NAME,
                    "mps_client": mps_client,
                }
            )
        return processes


def _field_errors(nvml: Any) -> tuple[type[BaseException], ...]:
    """What a single NVML query may raise without the GPU being gone.

    pynvml raises NVMLLibraryMismatchError, which is no NVMLError, when the driver
    lacks the versioned function its unversioned name calls.
    """
    errors: list[type[BaseException]] = [nvml.NVMLError]
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    if isinstance(mismatch, type) and issubclass(mismatch, BaseException):
        errors.append(mismatch)
    return tuple(errors)


def _versioned(nvml: Any, name: str, handle: Any) -> list[Any]:
    """A process list from the newest function the driver has; [] if none answers.

    The unversioned name calls `_v3`, which drivers before R510 lack; `_v2` is
    their equivalent.
    """
    for candidate in (name, f"{name}_v2"):
        function = getattr(nvml, candidate, None)
        if function is None:
            continue
        try:
            return list(function(handle) or [])
        except _field_errors(nvml):
            continue
    return []


def _temperature(nvml: Any, handle: Any) -> Any:
    """GPU core temperature; the versioned call first: the old one is deprecated."""
    getter = getattr(nvml, "nvmlDeviceGetTemperatureV", None)
    if getter is not None:
        try:
            return getter(handle, nvml.NVML_TEMPERATURE_GPU)
        except nvml.NVMLError:
            pass  # older drivers lack the versioned call
    return nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)


def _text(value: Any) -> str | None:
    """NVML strings come back as bytes from older bindings, str from newer ones."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if value is None else str(value)
