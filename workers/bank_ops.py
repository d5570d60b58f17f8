"""Operations on models' slots of a bank that the coordinator asks for, ordered with jobs.

The coordinator never touches a bank's memory itself (on a GPU that would make it a CUDA
client, and under MPS a client that must exit before the server takes new ones after a
fault): it asks the worker that owns the bank, through the same queue as the jobs, so
each operation sees exactly the jobs accepted before it.

The host copy (``mirror``) of a bank is a shared-memory segment with the bank's layout,
owned by the coordinator so that it outlives the worker: a replacement worker is filled
from it. A whole bank moves in one bulk copy; on a GPU into page-locked memory, on the
worker's stream, without blocking anything.
"""

from __future__ import annotations

import torch

from core.bank import Bank
from core.errors import BadInput


def read(bank: Bank, slot: int, everything: bool) -> dict[str, torch.Tensor]:
    """A copy of one model's parameters and buffers (``everything``: its optimizer state too)."""
    return {name: bank.tensors[name][slot].clone() for name in bank.entries(everything)}


@torch.no_grad()
def write(bank: Bank, slot: int, tensors: dict[str, torch.Tensor], everything: bool) -> None:
    """Replace one model's entries; given only its weights, its optimizer state starts afresh.

    The coordinator checked names, shapes and dtypes from the headers; checked again here
    because a partial write would leave a model that is neither the old nor the new one."""
    names = bank.entries(everything)
    if set(tensors) != set(names):
        raise BadInput(f"write of slot {slot}: expected entries {sorted(names)[:5]}..., got {sorted(tensors)[:5]}...")
    for name in names:
        bank.tensors[name][slot].copy_(tensors[name], non_blocking=True)
    if not everything:
        bank.reset_optimizer_state(slot)


@torch.no_grad()
def copy(bank: Bank, dst: list[int], src: list[int]) -> None:
    """Weights and optimizer state of slots ``src`` onto slots ``dst`` (hyperparameters stay)."""
    names = bank.entries(everything=True)
    for d, s in zip(dst, src):
        for name in names:
            bank.tensors[name][d].copy_(bank.tensors[name][s])


@torch.no_grad()
def mirror(bank: Bank, host: Bank, slots: list[int]) -> None:
    """Copy slots (every entry) to the host copy: the whole bank in one copy when all are asked."""
    if sorted(slots) == list(range(bank.layout.count)):
        host.raw.copy_(bank.raw, non_blocking=True)
        return
    for slot in slots:
        for name, tensor in bank.tensors.items():
            host.tensors[name][slot].copy_(tensor[slot], non_blocking=True)


@torch.no_grad()
def restore(bank: Bank, host: Bank) -> None:
    """Fill a new bank from its host copy, in one copy."""
    bank.raw.copy_(host.raw)


def pin(host: Bank) -> None:
    """Page-lock a host copy for this process, so copies between it and the GPU are asynchronous DMA."""
    raw = host.raw
    code = torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), raw.numel(), 1)  # cudaHostRegisterPortable
    if int(code) != 0:
        raise RuntimeError(f"cudaHostRegister of the host copy ({raw.numel()} bytes) failed: {code}")
