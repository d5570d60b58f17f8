"""A call on the cluster as calls on its coordinators, and their results joined: no Ray, no I/O.

``ClusterClient`` and ``AsyncClusterClient`` make the same calls as ``Client`` (every name
in ``client_api.PUBLIC_CALLS``); each is routed by its entry in ``ROUTES``:

- ``model``: the call names one model (``"mlp/903"``); it goes to that model's coordinator
  with the coordinator's own id for it (``"mlp/3"``), and its answer is the answer.
- ``group``: the call names a group; it goes to every coordinator holding a block of it.
  Inputs stacked one row per model (``[K, B, ...]``, told apart from shared inputs
  ``[B, ...]`` by the group's input spec) are cut into the blocks' rows, and so are any
  tensor arguments with them (targets); a keyword argument that is a list of K values
  (one hyperparameter per model) is cut the same way; everything else goes to every
  block as it is. Results are joined in model order (``join``). ``ensemble`` never
  cuts its inputs (the same batch through every model).
- ``either``: a model id routes as ``model``, a group name as ``group``.
- the rest (``submit``, ``models``, ``barrier``, ``copy_weights``, ``snapshot``, ``stats``)
  have their own rules, in ``Router`` here and in the clients.

A new call of ``Client`` is served by the cluster once it has an entry here (a test
checks that every public call has one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from core.errors import BadInput, CohortError, UnknownModel, WorkerDied
from core.messages import ModelInfo
from scheduler.cluster.layout import GroupLayout, Layout


@dataclass(frozen=True)
class Route:
    kind: str  # model | group | either | submit | models | barrier | copy | snapshot | stats
    rows: bool = True  # group calls: stacked inputs are cut into the blocks' rows


ROUTES: dict[str, Route] = {
    "infer": Route("model"),
    "train_step": Route("model"),
    "get_weights": Route("model"),
    "set_weights": Route("model"),
    "ensemble": Route("group", rows=False),
    "train_round": Route("group"),
    # issue 13's calls: on a model id or a group (K losses, K hyperparameter values, ...)
    "evaluate": Route("either"),
    "set_hparams": Route("either"),
    "get_hparams": Route("either"),
    "reset": Route("either"),
    "submit": Route("submit"),
    "models": Route("models"),
    "barrier": Route("barrier"),
    "copy_weights": Route("copy"),
    "snapshot": Route("snapshot"),
    "stats": Route("stats"),
}
GROUP_OPS = {"ensemble": Route("group", rows=False)}  # submit's group ops that differ from the default


@dataclass(frozen=True)
class Coordinator:
    """One coordinator as the directory lists it."""

    index: int
    address: str
    state: str = "up"  # starting | up | failed | stopped
    incarnation: int = 1
    node: str = ""
    gpu: str = ""
    reason: str = ""


@dataclass(frozen=True)
class SubCall:
    """One call on one coordinator: ``name(*args, **kwargs)`` of its ``Client``."""

    coordinator: int
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """The calls a cluster call makes, and how their results (in the calls' order) become its result."""

    calls: list[SubCall]
    join: Callable[[list[Any]], Any]


class Placement:
    """The directory's table, as calls are routed by it."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.version = int(table.get("version", 0))
        self.layout = Layout.from_dict(table["layout"])
        self.coordinators: dict[int, Coordinator] = {
            int(i): Coordinator(int(i), str(c.get("address", "")), str(c.get("state", "starting")),
                                int(c.get("incarnation", 1)), str(c.get("node", "")), str(c.get("gpu", "") or ""),
                                str(c.get("reason", "")))
            for i, c in table.get("coordinators", {}).items()
        }

    def group(self, name: str) -> GroupLayout:
        g = self.layout.groups.get(name.rstrip("/"))
        if g is None:
            hint = " (a group call takes a group name, not a model id)" if "/" in name.rstrip("/") else ""
            raise UnknownModel(f"no group {name!r}{hint}; groups: {', '.join(self.layout.groups)}")
        return g

    def model(self, model: Any) -> tuple[int, str]:
        """``(coordinator, the coordinator's id for it)`` of a cluster model id."""
        if not isinstance(model, str):
            raise UnknownModel(f"a model id is a string '<group>/<index>', got {type(model).__name__}")
        group, sep, index = model.rpartition("/")
        if not sep:
            raise UnknownModel(f"model id {model!r} must look like '<group>/<index>'; groups: "
                               f"{', '.join(self.layout.groups)}")
        g = self.layout.groups.get(group)
        if g is None:
            raise UnknownModel(f"no group {group!r}; groups: {', '.join(self.layout.groups)}")
        if not (index.isascii() and index.isdigit()) or int(index) >= g.count:
            raise UnknownModel(f"no model {model!r}: group {group!r} has indices 0..{g.count - 1}")
        coordinator, local = g.block_of(int(index))
        return coordinator, f"{group}/{local}"

    def global_id(self, coordinator: int, group: str, local: int) -> int:
        for c, start, _ in self.layout.groups[group].blocks:
            if c == coordinator:
                return start + local
        raise KeyError((coordinator, group))

    def check_serving(self, coordinator: int) -> None:
        """``WorkerDied`` when the coordinator is down for good (restarts spent, or it could not start)."""
        c = self.coordinators.get(coordinator)
        if c is not None and c.state in ("failed", "stopped"):
            held = ", ".join(f"{g.name}/{start}..{start + count - 1}" for g in self.layout.groups.values()
                             for i, start, count in g.blocks if i == coordinator)
            raise WorkerDied(f"coordinator {coordinator} ({held}) is {c.state}: {c.reason or 'no reason given'}")


def is_model_id(target: Any) -> bool:
    return isinstance(target, str) and "/" in target.rstrip("/")


class Router:
    """Turns a public call into a ``Plan`` over the coordinators of a ``Placement``."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    # ------------------------------------------------------------------ one model

    def to_model(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 position: int = 0, keyword: str = "model") -> SubCall:
        """The call with its model id (argument ``position``, or keyword ``keyword``) made local."""
        if len(args) > position:
            coordinator, local = self.placement.model(args[position])
            args = (*args[:position], local, *args[position + 1:])
        else:
            key = keyword if keyword in kwargs else next((k for k in ("model", "target", "group") if k in kwargs), None)
            if key is None:
                raise TypeError(f"{name}() needs a model id")
            coordinator, local = self.placement.model(kwargs[key])
            kwargs = {**kwargs, key: local}
        self.placement.check_serving(coordinator)
        return SubCall(coordinator, name, args, kwargs)

    # ------------------------------------------------------------------ a group

    def to_group(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], rows: bool = True,
                 position: int = 0) -> Plan:
        """One call per block of the group named at ``position``; results joined in model order."""
        group = self.placement.group(args[position] if len(args) > position else kwargs.get("group", ""))
        inputs = next((a for i, a in enumerate(args) if i > position and _is_tensors(a)), kwargs.get("inputs"))
        stacked = rows and self._stacked(name, group, inputs)
        calls = []
        for coordinator, start, count in group.blocks:
            self.placement.check_serving(coordinator)
            cut = tuple(a if i == position else _cut(a, start, count, stacked) for i, a in enumerate(args))
            cut_kwargs = {k: v if k == "timeout" else _cut_keyword(name, k, v, start, count, group.count, stacked)
                          for k, v in kwargs.items()}
            calls.append(SubCall(coordinator, name, cut, cut_kwargs))
        return Plan(calls, join)

    @staticmethod
    def _stacked(name: str, group: GroupLayout, inputs: Any) -> bool:
        """Whether ``inputs`` carry one row per model (``[K, B, ...]``) rather than one shared batch."""
        if isinstance(inputs, torch.Tensor):
            tensor, dims = inputs, next(iter(group.input_ndims.values()), inputs.dim())
        elif isinstance(inputs, dict):
            key = next((k for k in inputs if k in group.input_ndims), None)
            if key is None or not isinstance(inputs[key], torch.Tensor):
                return False
            tensor, dims = inputs[key], group.input_ndims[key]
        else:
            return False
        if tensor.dim() != dims + 1:
            return False
        if tensor.shape[0] != group.count:
            raise BadInput(f"{name}: inputs stacked one row per model need {group.count} rows for group "
                           f"{group.name!r}, got {tensor.shape[0]}")
        return True

    # ------------------------------------------------------------------ calls with rules of their own

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SubCall | Plan:
        """``submit(op, target, inputs, targets=None)``: one model, or the group's blocks."""
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if is_model_id(target):
            return self.to_model("submit", args, kwargs, position=1, keyword="target")
        op = args[0] if args else kwargs.get("op")
        route = GROUP_OPS.get(op, Route("group"))
        if len(args) < 2:
            raise TypeError("submit() needs an op and a target")
        return self.to_group("submit", args, kwargs, rows=route.rows, position=1)

    def models(self, kwargs: dict[str, Any]) -> Plan:
        calls = self.everywhere("models", (), kwargs).calls

        def join_models(results: list[Any]) -> list[ModelInfo]:
            out = []
            for call, infos in zip(calls, results):
                for m in infos:
                    index = self.placement.global_id(call.coordinator, m.group, m.index)
                    out.append(msgspec.structs.replace(m, id=f"{m.group}/{index}", index=index,
                                                       coordinator=call.coordinator))
            return sorted(out, key=lambda m: (m.group, m.index))

        return Plan(calls, join_models)

    def barrier(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        """Each coordinator's part of the scope: its groups by name, its models by its own ids."""
        kwargs = dict(kwargs)
        scope = args[0] if args else kwargs.pop("scope", None)
        if scope is None:
            return Plan(self.everywhere("barrier", (None,), kwargs).calls, _nothing)
        parts: dict[int, list[str]] = {}
        for item in [scope] if isinstance(scope, str) else list(scope):
            if is_model_id(item):
                coordinator, local = self.placement.model(item)
                parts.setdefault(coordinator, []).append(local)
            else:
                group = self.placement.group(item)
                for coordinator, _, _ in group.blocks:
                    parts.setdefault(coordinator, []).append(group.name)
        for c in parts:
            self.placement.check_serving(c)
        return Plan([SubCall(c, "barrier", (items,), kwargs) for c, items in sorted(parts.items())], _nothing)

    def everywhere(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], serving_only: bool = False) -> Plan:
        """The call on every coordinator; ``WorkerDied`` if one is down for good, unless ``serving_only``
        (then it is left out)."""
        calls = []
        for c in range(self.placement.layout.coordinators):
            try:
                self.placement.check_serving(c)
            except WorkerDied:
                if serving_only:
                    continue
                raise
            calls.append(SubCall(c, name, args, kwargs))
        return Plan(calls, list)

    def copy(self, src: str, dst: str) -> tuple[tuple[int, str], tuple[int, str]]:
        """Both ends, each as ``(coordinator, local id)``; ``BadInput`` across groups."""
        if src.rpartition("/")[0] != dst.rpartition("/")[0]:
            raise BadInput(f"copy_weights copies within one group: {src!r} and {dst!r} are in different groups")
        a, b = self.placement.model(src), self.placement.model(dst)
        self.placement.check_serving(a[0])
        self.placement.check_serving(b[0])
        return a, b


# ---------------------------------------------------------------------- cutting and joining


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and value:
        return all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, dict) and value:
        return all(isinstance(v, torch.Tensor) for v in value.values())
    return False


def _rows(value: Any, start: int, count: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:start + count]
    if isinstance(value, dict):
        return {k: v[start:start + count] for k, v in value.items()}
    return type(value)(v[start:start + count] for v in value)


def _cut(value: Any, start: int, count: int, stacked: bool) -> Any:
    return _rows(value, start, count) if stacked and _is_tensors(value) else value


def _cut_keyword(name: str, key: str, value: Any, start: int, count: int, total: int, stacked: bool) -> Any:
    if _is_tensors(value):
        return _cut(value, start, count, stacked)
    if isinstance(value, (list, tuple)):  # one value per model of the group
        if len(value) != total:
            raise BadInput(f"{name}: {key} has {len(value)} values; give one, or one per model ({total})")
        return value[start:start + count]
    return value


def join(results: list[Any]) -> Any:
    """The blocks' results as one, in model order: tensors (or tuples and dicts of them) joined
    along the model dimension, lists joined, dicts of per-model lists joined key by key."""
    first = results[0]
    if len(results) == 1 or first is None:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(results)
    if isinstance(first, tuple) and _is_tensors(first):
        return tuple(torch.cat(parts) for parts in zip(*results))
    if isinstance(first, list):
        return [item for result in results for item in result]
    if isinstance(first, dict) and _is_tensors(first):
        return {k: torch.cat([r[k] for r in results]) for k in first}
    if isinstance(first, dict) and all(isinstance(v, list) for v in first.values()):
        return {k: [item for r in results for item in r[k]] for k in first}
    return list(results)


def _nothing(results: list[Any]) -> None:
    return None


def first_error(outcomes: list[Any]) -> CohortError | BaseException | None:
    """The first exception among outcomes (in model order), if any."""
    return next((o for o in outcomes if isinstance(o, BaseException)), None)
