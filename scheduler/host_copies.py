"""The host copies of every bank: the restore point of a replacement worker, and snapshots' source.

For each group's block on each worker the coordinator owns one shared-memory segment laid
out exactly as that bank. The worker fills it (``mirror``, a bulk copy, asynchronous on a
GPU) when the coordinator asks, in the same queue as the jobs, so a host copy is a
consistent cut; the segment outlives the worker, and its replacement is filled from it.
The coordinator never touches bank memory, so it never needs the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.bank import Bank, leftover_shm, unlink_shm
from core.spec import GroupSpec, ModelKey


@dataclass(frozen=True)
class Place:
    worker: int
    slot: int


class HostCopies:
    """One segment per (worker, group) block, and the version of each model it holds."""

    def __init__(self, specs: dict[str, GroupSpec], prefix: str) -> None:
        self.specs = specs
        self.prefix = prefix
        self.segments: dict[tuple[int, str], Bank] = {}
        self.place: dict[ModelKey, Place] = {}
        self.version: dict[ModelKey, int] = {}  # the version each model's host copy holds

    def create(self, worker: int, spec: GroupSpec) -> str:
        """The segment for ``spec``'s models on ``worker`` (zeroed until the worker fills it); its name."""
        name = f"{self.prefix}h{worker}-{spec.name}"
        self.segments[(worker, spec.name)] = Bank.create(spec.name, spec.entries, len(spec.indices),
                                                         torch.device("cpu"), name)
        for slot, index in enumerate(spec.indices):
            self.place[(spec.name, index)] = Place(worker, slot)
        return name

    def held(self, model: ModelKey) -> bool:
        return model in self.version

    def mirrored(self, models: list[ModelKey], versions: dict[ModelKey, int]) -> None:
        """A worker has copied ``models`` into their segments: they now hold ``versions``."""
        for m in models:
            self.version[m] = versions[m]

    def weights(self, model: ModelKey) -> dict[str, torch.Tensor]:
        """Views of one model's parameters and buffers in its host copy (copy them before they change)."""
        place = self.place[model]
        return self.segments[(place.worker, model[0])].model_state(place.slot)

    def snapshot_files(self, directory: Path, models: list[ModelKey]) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        """``directory/<group>/<index>.safetensors`` and the views of what to write there, for each model
        (the writer copies them first, on its thread, while no worker writes the segments)."""
        return [(directory / m[0] / f"{m[1]}.safetensors", self.weights(m)) for m in models]

    def close(self) -> None:
        for segment in self.segments.values():
            segment.close()
        self.segments = {}
        for name in leftover_shm(self.prefix + "h"):
            unlink_shm(name)
