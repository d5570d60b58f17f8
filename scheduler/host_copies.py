"""The host copies of every bank: the restore point of a replacement worker, and snapshots' source.

For each group's block on each worker the coordinator owns one shared-memory segment laid
out exactly as that bank. The worker fills it (``mirror``, a bulk copy, asynchronous on a
GPU) when the coordinator asks, in the same queue as the jobs, so a host copy is a
consistent cut; the segment outlives the worker, and its replacement is filled from it.
The coordinator never touches bank memory, so it never needs the GPU.

Beside the segments lie the version each one holds (``<prefix>hversions``) and a manifest of
what each segment is (``<prefix>hmanifest``: the group's entries and models). A coordinator
killed hard leaves all three behind; a new one started with ``restore_run`` set to that
run's id adopts them (``adopt``): its models start from that run's last host copies
(weights, optimizer state, hyperparameters, step counts), at their versions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from core.bank import Bank, BankHandle, leftover_shm, shm_dir, unlink_shm
from core.errors import ConfigError
from core.spec import EntrySpec, GroupSpec, ModelKey


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
        self._manifest: dict[str, str] = {}  # segment suffix -> what it holds (entries, models)
        self._rows = {m: k for k, m in enumerate(sorted((g, i) for g, s in specs.items() for i in s.indices))}
        self._versions = Bank.create("versions", [VERSION], len(self._rows), torch.device("cpu"), f"{prefix}hversions")
        self._versions.tensors["version"].fill_(-1)  # -1: no host copy yet

    def create(self, worker: int, spec: GroupSpec) -> str:
        """The segment for ``spec``'s models on ``worker`` (zeroed until the worker fills it); its name."""
        name = f"{self.prefix}h{worker}-{spec.name}"
        self.segments[(worker, spec.name)] = Bank.create(spec.name, spec.entries, len(spec.indices),
                                                         torch.device("cpu"), name)
        for slot, index in enumerate(spec.indices):
            self.place[(spec.name, index)] = Place(worker, slot)
        self._manifest[f"h{worker}-{spec.name}"] = _describe(spec)
        _write(shm_dir() / f"{self.prefix}hmanifest", json.dumps(self._manifest, sort_keys=True).encode())
        return name

    def copying(self, models: list[ModelKey]) -> None:
        """Mirror jobs for ``models`` are under way: until each finishes (``mirrored``) its segment may be
        half old, half new, so a dead run's copy of it is not adopted."""
        table = self._versions.tensors["version"]
        for m in models:
            table[self._rows[m]] = -1

    def held(self, model: ModelKey) -> bool:
        return model in self.version

    def mirrored(self, models: list[ModelKey], versions: dict[ModelKey, int]) -> None:
        """A worker has copied ``models`` into their segments: they now hold ``versions``."""
        table = self._versions.tensors["version"]
        for m in models:
            self.version[m] = versions[m]
            table[self._rows[m]] = versions[m]

    def weights(self, model: ModelKey) -> dict[str, torch.Tensor]:
        """Views of one model's parameters and buffers in its host copy (copy them before they change)."""
        place = self.place[model]
        return self.segments[(place.worker, model[0])].model_state(place.slot)

    def snapshot_files(self, directory: Path, models: list[ModelKey]) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        """``directory/<group>/<index>.safetensors`` and the views of what to write there, for each model
        (the writer copies them first, on its thread, while no worker writes the segments)."""
        return [(directory / m[0] / f"{m[1]}.safetensors", self.weights(m)) for m in models]

    def adopt(self, run_id: str) -> dict[ModelKey, int]:
        """Fill every segment from the host copies a dead coordinator of run ``run_id`` left, made from
        the same groups; the version each model's copy holds. ``ConfigError`` if they are not all there."""
        old = f"cohort-{run_id}-"
        try:
            manifest = json.loads((shm_dir() / f"{old}hmanifest").read_bytes())
        except (OSError, ValueError):
            raise ConfigError(f"coordinator.restore_run: no host copies of run {run_id!r} on this machine "
                              f"(looked for {shm_dir() / (old + 'hmanifest')})") from None
        if manifest != self._manifest:
            raise ConfigError(f"coordinator.restore_run: run {run_id!r} held other groups or models (its config "
                              "differs), so its host copies cannot be restored here")
        versions = Bank.open(BankHandle("versions", "shm", self._versions.handle.nbytes, len(self._rows),
                                        shm_name=f"{old}hversions"), [VERSION])
        try:
            held = versions.tensors["version"].clone()
        finally:
            versions.close()
        if bool((held < 0).any()):
            raise ConfigError(f"coordinator.restore_run: run {run_id!r} died before every model had a host copy, "
                              "or while one was being written")
        for (worker, group), segment in self.segments.items():
            source = Bank.open(BankHandle(group, "shm", segment.handle.nbytes, segment.layout.count,
                                          shm_name=f"{old}h{worker}-{group}"), self.specs[group].entries)
            try:
                segment.raw.copy_(source.raw)
            finally:
                source.close()
        restored = {m: int(held[row]) for m, row in self._rows.items()}
        self.mirrored(list(restored), restored)
        return restored

    def close(self) -> None:
        for segment in self.segments.values():
            segment.close()
        self.segments = {}
        self._versions.close()
        for name in leftover_shm(self.prefix + "h"):
            unlink_shm(name)


VERSION = EntrySpec("version", "state", (), "int64")


def _describe(spec: GroupSpec) -> str:
    """What a segment holds, as a digest: a dead run's copy is adopted only if it holds the same."""
    text = json.dumps({"entries": msgspec.to_builtins(spec.entries), "indices": spec.indices}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` whole (a reader sees the old content or the new, never part)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
