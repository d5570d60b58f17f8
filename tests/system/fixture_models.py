"""Models that misbehave on purpose, for the system tests."""

from __future__ import annotations

import time

import torch
from torch import nn


class Sleepy(nn.Module):
    """A linear layer that first sleeps ``x[0, 0]`` seconds: a job that stays in flight."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            delay = float(x[0, 0])
            if delay > 0:
                time.sleep(min(delay, 30.0))
        return self.linear(x)


class Faulty(nn.Module):
    """A linear layer that raises when its input holds a value above 1000."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta" and bool((x > 1000).any()):
            raise RuntimeError("input too hot for this model")
        return self.linear(x)


class Spin(nn.Module):
    """A linear layer after a GPU spin of ``cycles`` clock cycles: a kernel that takes a known time."""

    def __init__(self, d: int = 4, cycles: int = 50_000_000) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.cycles = cycles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda._sleep(self.cycles)
        return self.linear(x)


def spin(d: int = 4, cycles: int = 50_000_000) -> nn.Module:
    return Spin(d, cycles)


def sleepy(d: int = 4) -> nn.Module:
    return Sleepy(d)


def faulty(d: int = 4) -> nn.Module:
    return Faulty(d)


def slow_start(d: int = 4) -> nn.Module:
    """A linear layer that takes its worker 8 s to build (the coordinator's build, on meta, is quick)."""
    if torch.empty(0).device.type != "meta":
        time.sleep(8.0)
    return nn.Linear(d, d)


def group(name: str, factory: str, count: int = 2, d: int = 4) -> dict:
    return {
        "name": name,
        "factory": f"fixture_models:{factory}",
        "kwargs": {"d": d},
        "count": count,
        "input": {"shape": [-1, d], "dtype": "float32"},
        "loss": "mse",
        "optimizer": {"name": "sgd", "lr": 0.01},
        "init": {"seed": 0},
    }


class OutOfMemoryOnDemand(nn.Module):
    """A linear layer that runs out of memory when asked: a transient failure, like CUDA's.

    Asked in process with ``OutOfMemoryOnDemand.fused_calls_fail = True`` (only calls under
    ``vmap`` fail, as when a fused call needs more memory than one model's), or from a
    client with a batch of ``OOM_BATCH`` rows (every call fails)."""

    OOM_BATCH = 13
    fused_calls_fail = False

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = torch._C._functorch.is_functorch_wrapped_tensor(self.linear.weight)  # inside vmap or grad
        if x.device.type != "meta" and (x.shape[0] == self.OOM_BATCH or (batched and self.fused_calls_fail)):
            raise torch.OutOfMemoryError("out of memory: tried to allocate 20.00 GiB (asked for by the test)")
        return self.linear(x)


def out_of_memory_on_demand(d: int = 4) -> nn.Module:
    return OutOfMemoryOnDemand(d)


class DeviceFaultOnDemand(nn.Module):
    """A linear layer that makes a CUDA device-side fault when its batch has ``FAULT_BATCH`` rows."""

    FAULT_BATCH = 7

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.shape[0] == self.FAULT_BATCH:
            bad = torch.full((1,), 1 << 40, dtype=torch.int64, device=x.device)
            x = x + x.new_zeros(4)[bad]  # an index far out of bounds: an illegal memory access or an assert
        return self.linear(x)


def device_fault_on_demand(d: int = 4) -> nn.Module:
    return DeviceFaultOnDemand(d)


class TightMemory(nn.Linear):
    """A linear layer that, at its first call on a GPU, lets its worker hold only ``headroom`` bytes
    more than it has reserved by then (banks, the first call's workspace): a large input then runs
    out of memory while it is copied to the device, and small ones still fit."""

    def __init__(self, d: int = 4, headroom: int = 64 << 20) -> None:
        super().__init__(d, d)
        self.headroom = headroom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if x.is_cuda and not getattr(TightMemory, "capped", False):
            torch.cuda.synchronize(x.device)
            total = torch.cuda.get_device_properties(x.device).total_memory
            cap = torch.cuda.memory_reserved(x.device) + self.headroom
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), x.device)
            TightMemory.capped = True
        return out


def tight_memory(d: int = 4, headroom: int = 64 << 20) -> nn.Module:
    return TightMemory(d, headroom)


def mlp_bf16(d_in: int = 8, hidden: int = 16, d_out: int = 4) -> nn.Module:
    """The examples' MLP with bfloat16 weights."""
    from examples.models import mlp

    return mlp(d_in, hidden, d_out).to(torch.bfloat16)


class Witness(nn.Module):
    """Sleeps ``x[0, 0]`` seconds, raises when ``x[0, 1]`` is above 1000, and appends the sum of its input
    to the file ``seen``: what the model read, after the fact."""

    def __init__(self, d: int = 4, seen: str = "") -> None:
        super().__init__()
        self.linear = nn.Linear(d, 4)
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            if float(x[0, 0]) > 0:
                time.sleep(min(float(x[0, 0]), 30.0))
            if float(x[0, 1]) > 1000:
                raise RuntimeError("input too hot for this model")
            with open(self.seen, "a") as f:
                f.write(f"{float(x.double().sum())}\n")
        return self.linear(x)


def witness(d: int = 4, seen: str = "") -> nn.Module:
    return Witness(d, seen)
