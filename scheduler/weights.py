"""The coordinator's view of the weight banks: reads, writes, copies and snapshots.

The coordinator maps every worker's banks (shared memory or CUDA IPC) and touches
them directly, never through a worker's job queue; callers make sure a barrier of
the models concerned holds while it does. It also keeps the latest host copy of
every model (parameters, buffers and optimizer state), from which a replacement
worker's banks are restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.bank import Bank, BankHandle
from core.errors import BadInput
from core.spec import GroupSpec, ModelKey


@dataclass(frozen=True)
class Location:
    worker: int
    slot: int


@dataclass
class HostCopy:
    version: int
    tensors: dict[str, torch.Tensor]  # every bank entry of one model, on the CPU


class WeightStore:
    def __init__(self, specs: dict[str, GroupSpec]) -> None:
        self.specs = specs
        self.banks: dict[tuple[int, str], Bank] = {}
        self.location: dict[ModelKey, Location] = {}
        self.host: dict[ModelKey, HostCopy] = {}

    # ------------------------------------------------------------------ mapping

    def map_worker(self, worker: int, handles: list[BankHandle], placed: dict[str, list[int]]) -> None:
        """Open a worker's banks; ``placed[group]`` lists the global indices in slot order."""
        for handle in handles:
            indices = placed[handle.group]
            if handle.count != len(indices):
                raise ValueError(f"worker {worker} bank {handle.group!r}: {handle.count} models, expected {len(indices)}")
            self.banks[(worker, handle.group)] = Bank.open(handle, self.specs[handle.group].entries)
            for slot, index in enumerate(indices):
                self.location[(handle.group, index)] = Location(worker, slot)

    def drop_worker(self, worker: int) -> None:
        """Forget a worker's banks at once: after its death, touching them is undefined."""
        for key in [k for k in self.banks if k[0] == worker]:
            self.banks.pop(key).close()

    def is_mapped(self, model: ModelKey) -> bool:
        loc = self.location.get(model)
        return loc is not None and (loc.worker, model[0]) in self.banks

    def _bank(self, model: ModelKey) -> tuple[Bank, int]:
        loc = self.location[model]
        return self.banks[(loc.worker, model[0])], loc.slot

    def _sync(self, bank: Bank) -> None:
        if bank.device.type == "cuda":
            torch.cuda.synchronize(bank.device)

    # ------------------------------------------------------------------ weights

    def get(self, model: ModelKey) -> dict[str, torch.Tensor]:
        """Parameters and buffers of one model, copied to the CPU."""
        bank, slot = self._bank(model)
        return {n: t.detach().to("cpu", copy=True) for n, t in bank.model_state(slot).items()}

    def set(self, model: ModelKey, weights: dict[str, torch.Tensor]) -> None:
        """Replace one model's parameters and buffers, and reset its optimizer state."""
        bank, slot = self._bank(model)
        views = bank.model_state(slot)
        missing = sorted(set(views) - set(weights))
        extra = sorted(set(weights) - set(views))
        if missing or extra:
            raise BadInput(f"set_weights {model[0]}/{model[1]}: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, view in views.items():
            given = weights[name]
            if tuple(given.shape) != tuple(view.shape) or given.dtype != view.dtype:
                raise BadInput(
                    f"set_weights: {name!r} must be {view.dtype} {list(view.shape)}, got {given.dtype} {list(given.shape)}"
                )
        with torch.no_grad():
            for name, view in views.items():
                view.copy_(weights[name])
            bank.reset_optimizer_state(slot)
        self._sync(bank)

    def copy(self, src: ModelKey, dst: ModelKey) -> None:
        """Copy every entry (weights and optimizer state) from ``src`` to ``dst``, on the device."""
        src_bank, src_slot = self._bank(src)
        dst_bank, dst_slot = self._bank(dst)
        with torch.no_grad():
            for name, t in dst_bank.tensors.items():
                t[dst_slot].copy_(src_bank.tensors[name][src_slot])
        self._sync(dst_bank)

    # ------------------------------------------------------------------ host copies and files

    def keep_host_copy(self, model: ModelKey, version: int) -> None:
        bank, slot = self._bank(model)
        self.host[model] = HostCopy(version, {n: t[slot].detach().to("cpu", copy=True) for n, t in bank.tensors.items()})

    def restore(self, model: ModelKey) -> int:
        """Write the host copy back into the (new) bank; return the restored version."""
        bank, slot = self._bank(model)
        copy = self.host[model]
        with torch.no_grad():
            for name, t in bank.tensors.items():
                t[slot].copy_(copy.tensors[name])
        self._sync(bank)
        return copy.version

    def snapshot_files(self, directory: Path, models: list[ModelKey]) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        """``directory/<group>/<index>.safetensors`` and the parameters and buffers to write there,
        from each model's host copy (take the copies first, at a barrier)."""
        files = []
        for model in models:
            names = [e.name for e in self.specs[model[0]].entries if e.role in ("param", "buffer")]
            held = self.host[model].tensors
            files.append((directory / model[0] / f"{model[1]}.safetensors", {n: held[n] for n in names}))
        return files

    def close(self) -> None:
        for bank in self.banks.values():
            bank.close()
        self.banks = {}
