"""Which GPU the workers use, decided with NVML before any process touches CUDA.

Any process that initialises CUDA (``torch.cuda.is_available()`` included) before the MPS
daemon is up is not an MPS client, and in EXCLUSIVE_PROCESS compute mode it holds the
GPU alone. So the coordinator never initialises CUDA at all: it reads the GPUs through
NVML (count, UUID, compute mode), applies ``CUDA_VISIBLE_DEVICES`` itself, and plans:

- the device the workers open (``cuda:N`` as they will see it);
- with MPS, the daemon sees only the chosen GPU (``CUDA_VISIBLE_DEVICES=<its UUID>``) and
  the clients must not set the variable at all: MPS remaps the devices, so a client's
  own index (``2`` under Slurm, say) would name a GPU the daemon does not have. Under MPS
  the workers therefore open ``cuda:0``;
- a setup that cannot work fails at once, with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError

VISIBLE = "CUDA_VISIBLE_DEVICES"
COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it (``index`` is NVML's)."""

    index: int
    uuid: str
    name: str
    compute_mode: str


def probe_gpus(nvml: Any = None) -> list[Gpu]:
    """Every GPU of the machine through NVML; none when there is no driver. Never initialises CUDA."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid, name = nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle)
            mode = COMPUTE_MODES.get(int(nvml.nvmlDeviceGetComputeMode(handle)), "unknown")
            gpus.append(Gpu(index, uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                            name.decode() if isinstance(name, bytes) else str(name), mode))
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def visible_gpus(gpus: list[Gpu], env: dict[str, str]) -> list[Gpu]:
    """The GPUs CUDA would show a process with ``env``, in its order (``CUDA_VISIBLE_DEVICES``:
    indices or UUIDs, or UUID prefixes; CUDA stops at the first entry it cannot match).

    Indices are taken as NVML's, which is CUDA's order with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    (what cluster schedulers set)."""
    if VISIBLE not in env:
        return list(gpus)
    shown: list[Gpu] = []
    for entry in (e.strip() for e in env[VISIBLE].split(",")):
        match = None
        if entry.isdigit():
            match = next((g for g in gpus if g.index == int(entry)), None)
        elif entry.startswith(("GPU-", "MIG-")):
            found = [g for g in gpus if g.uuid.startswith(entry)]
            match = found[0] if len(found) == 1 else None
        if match is None or match in shown:
            break
        shown.append(match)
    return shown


@dataclass(frozen=True)
class DevicePlan:
    """Where the workers run: the device they open, and the GPU behind it."""

    device: str  # "cpu", or "cuda:N" as the workers will see it
    gpu: Gpu | None = None
    visible_index: int = 0  # the GPU's index among those CUDA_VISIBLE_DEVICES shows the coordinator

    def worker_device(self, mps_on: bool) -> str:
        """Under MPS the daemon sees one GPU, so every client opens ``cuda:0``."""
        return "cuda:0" if self.gpu is not None and mps_on else self.device

    def daemon_env(self) -> dict[str, str]:
        """The MPS control daemon sees the chosen GPU only, named by UUID (never remapped)."""
        return {VISIBLE: self.gpu.uuid} if self.gpu is not None else {}


def plan_device(requested: str, gpus: list[Gpu], env: dict[str, str], cuda_built: bool) -> DevicePlan:
    """Resolve ``coordinator.device`` against the GPUs NVML sees; ``ConfigError`` when it cannot work."""
    shown = visible_gpus(gpus, env)
    if requested == "cpu":
        return DevicePlan("cpu")
    if requested == "auto":
        if not shown or not cuda_built:
            return DevicePlan("cpu")
        requested = "cuda:0"
    index = int(requested.partition(":")[2] or 0)
    if not cuda_built:
        raise ConfigError(f"coordinator.device = {requested!r}, but this PyTorch was built without CUDA")
    if not shown:
        hidden = f" ({VISIBLE}={env[VISIBLE]!r} hides them)" if gpus and VISIBLE in env else ""
        raise ConfigError(f"coordinator.device = {requested!r}, but no GPU is visible{hidden}")
    if index >= len(shown):
        raise ConfigError(f"coordinator.device = {requested!r}, but only {len(shown)} GPU(s) are visible")
    gpu = shown[index]
    if gpu.compute_mode == "prohibited":
        raise ConfigError(f"GPU {gpu.index} ({gpu.uuid}) is in PROHIBITED compute mode: no process may use it")
    return DevicePlan(f"cuda:{index}", gpu, index)


def check_sharing(plan: DevicePlan, workers: int, mps_on: bool, mps_reason: str) -> None:
    """EXCLUSIVE_PROCESS lets one process use the GPU: several workers can share it only as MPS clients."""
    gpu = plan.gpu
    if gpu is None or mps_on or workers == 1 or gpu.compute_mode not in ("exclusive_process", "exclusive_thread"):
        return
    raise ConfigError(
        f"GPU {gpu.index} ({gpu.uuid}) is in {gpu.compute_mode.upper()} compute mode, which lets one process use "
        f"it, and cohort runs {workers} workers: they can share it only as clients of MPS, which is not running "
        f"({mps_reason}). Set coordinator.mps = 'on' (and make nvidia-cuda-mps-control available), or workers = 1.")


def client_environment(plan: DevicePlan, mps_on: bool, env: dict[str, str]) -> dict[str, str]:
    """The environment the workers start from: under MPS without ``CUDA_VISIBLE_DEVICES`` (the daemon chose)."""
    out = dict(env)
    if plan.gpu is not None and mps_on:
        out.pop(VISIBLE, None)
    return out


def cuda_built() -> bool:
    """Whether this PyTorch has CUDA, without initialising it."""
    import torch

    return torch.backends.cuda.is_built()


def current_env() -> dict[str, str]:
    return dict(os.environ)
