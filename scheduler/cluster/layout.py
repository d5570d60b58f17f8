"""A cluster's models cut into one block per coordinator, and each coordinator's own config.

A cluster runs N normal coordinators over one config. Every group of K models is cut into
N contiguous blocks (``scheduler.placement.place``: as even as possible, the larger blocks
rotating from group to group). Coordinator c holds, of each group, the models
``start .. start + count - 1`` of the cluster as its own models ``0 .. count - 1``, and its
config reproduces exactly those models:

- ``count`` is the block's size;
- ``init = { seed = s }`` becomes ``seed = s + start``: a coordinator builds its model i
  after ``torch.manual_seed(seed + i)``, so the cluster's model ``start + i`` is built
  after ``torch.manual_seed(s + start + i)``, as on one coordinator;
- every per-model optimizer list (``lr = [...]``, one value per model) is sliced to the
  block; scalars stay as they are, and ``betas`` is one pair for all models;
- ``init = { safetensors = "w/{group}/{index}.safetensors" }`` names files by the
  cluster's index: the block gets a directory of links, ``<dir>/<group>/<i>.safetensors``
  -> the file of model ``start + i`` (``link_models``), and reads that instead.

A group with fewer models than coordinators leaves some coordinators without it; a
coordinator left with no model at all is refused. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from scheduler.config import Config
from scheduler.placement import place


@dataclass(frozen=True)
class GroupLayout:
    """One group over the cluster: its blocks ``(coordinator, start, count)`` in model order."""

    name: str
    count: int
    blocks: tuple[tuple[int, int, int], ...]
    input_ndims: dict[str, int] = field(default_factory=dict)  # one model's input: dims, batch included
    single_input: bool = True

    def block_of(self, index: int) -> tuple[int, int]:
        """``(coordinator, local index)`` of the group's model ``index``."""
        for coordinator, start, count in self.blocks:
            if start <= index < start + count:
                return coordinator, index - start
        raise IndexError(index)


@dataclass(frozen=True)
class Layout:
    """Every group's blocks; JSON-able through ``as_dict`` / ``from_dict`` (it lives in the directory)."""

    coordinators: int
    groups: dict[str, GroupLayout]

    def blocks_of(self, coordinator: int) -> dict[str, tuple[int, int]]:
        """``group -> (start, count)`` of the models ``coordinator`` holds."""
        return {g.name: (start, count) for g in self.groups.values()
                for c, start, count in g.blocks if c == coordinator}

    def as_dict(self) -> dict[str, Any]:
        return {"coordinators": self.coordinators,
                "groups": {name: {"count": g.count, "blocks": [list(b) for b in g.blocks],
                                  "input_ndims": dict(g.input_ndims), "single_input": g.single_input}
                           for name, g in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        groups = {name: GroupLayout(name, int(g["count"]), tuple(tuple(int(v) for v in b) for b in g["blocks"]),
                                    dict(g.get("input_ndims", {})), bool(g.get("single_input", True)))
                  for name, g in data["groups"].items()}
        return cls(int(data["coordinators"]), groups)


def plan_layout(config: Config, coordinators: int) -> Layout:
    """Cut every group of ``config`` over ``coordinators``; ``ConfigError`` if one would hold nothing."""
    if coordinators < 1:
        raise ConfigError(f"a cluster needs at least one coordinator, got {coordinators}")
    blocks = place([(g.name, g.count) for g in config.groups], coordinators)
    groups = {
        g.name: GroupLayout(g.name, g.count,
                            tuple((b.worker, b.start, b.count) for b in blocks if b.group == g.name),
                            {spec.name: len(spec.shape) for spec in g.inputs}, g.single_input)
        for g in config.groups
    }
    empty = sorted(set(range(coordinators)) - {b.worker for b in blocks})
    if empty:
        total = sum(g.count for g in config.groups)
        raise ConfigError(f"{coordinators} coordinators for {total} models in all: coordinator {empty[0]} would hold "
                          f"no model; use at most {total} coordinators")
    return Layout(coordinators, groups)


# ---------------------------------------------------------------------- one coordinator's config


def coordinator_config(raw: dict[str, Any], layout: Layout, index: int, settings: dict[str, Any],
                       inits: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The config (as parsed TOML) of coordinator ``index``: ``raw``'s, cut to its blocks.

    ``settings`` replace keys of ``[coordinator]`` (address, device, snapshots);
    ``inits`` replace a group's whole ``init`` table (links to its files, a restore point)."""
    blocks = layout.blocks_of(index)
    groups = []
    for group in raw.get("group", []):
        if group["name"] not in blocks:
            continue
        start, count = blocks[group["name"]]
        block = copy.deepcopy(group)
        block["count"] = count
        optimizer = block.get("optimizer", {})
        for key, value in optimizer.items():
            if isinstance(value, list) and key != "betas":  # one value per model (the config checked the length)
                optimizer[key] = value[start:start + count]
        if inits and group["name"] in inits:
            block["init"] = inits[group["name"]]
        else:
            init = block.get("init", {"seed": 0})
            if "safetensors" in init:
                raise ConfigError(f"group {group['name']!r}: init.safetensors names files by the cluster's index; "
                                  "link them for the block first (scheduler.cluster.layout.link_models)")
            block["init"] = {"seed": int(init.get("seed", 0)) + start}
        groups.append(block)
    return {"coordinator": {**raw.get("coordinator", {}), **settings}, "group": groups}


def link_models(directory: Path, group: str, files: dict[int, str]) -> dict[str, Any]:
    """Links ``directory/<group>/<i>.safetensors`` -> ``files[i]``; the ``init`` table that reads them.

    The files must exist (checked here, naming the real file rather than a link)."""
    target = directory / group
    target.mkdir(parents=True, exist_ok=True)
    for local, path in files.items():
        if not os.path.isfile(path):
            raise ConfigError(f"group {group!r} init: {path} does not exist on this node")
        link = target / f"{local}.safetensors"
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.abspath(path))
    return {"safetensors": str(directory / "{group}" / "{index}.safetensors")}


def init_files(template: str, group: str, start: int, count: int, cwd: str) -> dict[int, str]:
    """The file of each model of a block under an ``init.safetensors`` template (cluster indices)."""
    files = {}
    for local in range(count):
        path = template.format(index=start + local, group=group)
        files[local] = path if os.path.isabs(path) else os.path.join(cwd, path)
    return files


def restore_files(group: str, start: int, count: int, own_dir: str, snapshots: list[str],
                  since: float) -> dict[int, str] | None:
    """The newest snapshot file of each model of a block, or None unless every model has one.

    Candidates: the coordinator's own periodic snapshots (``own_dir/<group>/<local>``) and
    the cluster's snapshots (``<path>/<group>/<start + local>``); files older than ``since``
    (the cluster's start: a former run's) are not candidates."""
    chosen: dict[int, str] = {}
    for local in range(count):
        candidates = [os.path.join(own_dir, group, f"{local}.safetensors")] if own_dir else []
        candidates += [os.path.join(path, group, f"{start + local}.safetensors") for path in snapshots]
        best, best_time = None, since
        for path in candidates:
            try:
                modified = os.stat(path).st_mtime
            except OSError:
                continue
            if modified >= best_time:
                best, best_time = path, modified
        if best is None:
            return None
        chosen[local] = best
    return chosen


# ---------------------------------------------------------------------- TOML out


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_text(document: dict[str, Any]) -> str:
    """A config as TOML: ``[coordinator]`` and one ``[[group]]`` per group; deeper tables inline."""
    lines = ["[coordinator]", *(f"{_key(k)} = {_value(v)}" for k, v in document.get("coordinator", {}).items())]
    for group in document.get("group", []):
        lines += ["", "[[group]]", *(f"{_key(k)} = {_value(v)}" for k, v in group.items())]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if _BARE.match(key) else _string(key)


def _string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if 0x20 <= ord(c) < 0x7F else f"\\u{ord(c):04X}" if ord(c) <= 0xFFFF
                         else f"\\U{ord(c):08X}" for c in escaped) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"TOML has no {value!r}")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise ConfigError(f"no TOML form for {type(value).__name__} {value!r}")

