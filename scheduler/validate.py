"""Checking a job against its group's spec before it is queued.

Everything here reads only tensor headers, never tensor bytes: a bad job is answered
at once with ``BadInput`` or ``UnknownModel`` and never reaches a worker.
"""

from __future__ import annotations

from core.errors import BadInput, UnknownModel
from core.messages import JOB_OPS
from core.spec import GroupSpec
from core.tensors import TensorTree


def parse_model(model: str, groups: dict[str, GroupSpec]) -> tuple[str, int]:
    """``"group/index"`` -> ``(group, index)``; ``UnknownModel`` if there is no such model."""
    group, sep, index = model.rpartition("/")
    if not sep:
        raise UnknownModel(f"model id {model!r} must look like '<group>/<index>'; groups: {', '.join(groups)}")
    spec = groups.get(group)
    if spec is None:
        raise UnknownModel(f"no group {group!r}; groups: {', '.join(groups)}")
    if not (index.isascii() and index.isdigit()) or int(index) >= len(spec.indices):
        raise UnknownModel(f"no model {model!r}: group {group!r} has indices 0..{len(spec.indices) - 1}")
    return group, int(index)


def parse_group(name: str, groups: dict[str, GroupSpec]) -> GroupSpec:
    spec = groups.get(name.rstrip("/"))
    if spec is None:
        hint = " (a group op takes a group name, not a model id)" if "/" in name.rstrip("/") else ""
        raise UnknownModel(f"no group {name!r}{hint}; groups: {', '.join(groups)}")
    return spec


def check_op(op: str) -> None:
    if op not in JOB_OPS:
        raise BadInput(f"unknown op {op!r}; ops: {', '.join(JOB_OPS)}")


def is_stacked(spec: GroupSpec, tree: TensorTree) -> bool:
    """Whether a group call's inputs carry a leading model dim ``[K, ...]`` (else one batch is shared).

    Told apart by rank: a stacked input has one dim more than the spec's shape."""
    metas = tree.metas if spec.single_input else [m for k, m in zip(tree.keys, tree.metas) if k == spec.inputs[0].name]
    return bool(metas) and len(metas[0].shape) == len(spec.inputs[0].shape) + 1


def check_inputs(spec: GroupSpec, tree: TensorTree, stacked: int | None) -> int:
    """Check the input headers against the group's spec; return the batch size.

    ``stacked``: the inputs carry one extra leading dim of that size (a training round).
    """
    if spec.single_input:
        if tree.layout != "tensor":
            raise BadInput(f"group {spec.name!r} takes one tensor as input, got a {tree.layout}")
        given = {"x": tree.metas[0]}
    else:
        if tree.layout != "dict":
            names = [s.name for s in spec.inputs]
            raise BadInput(f"group {spec.name!r} takes a dict of tensors {names}, got a {tree.layout}")
        given = dict(zip(tree.keys, tree.metas))
        missing = [s.name for s in spec.inputs if s.name not in given]
        extra = sorted(set(given) - {s.name for s in spec.inputs})
        if missing:
            raise BadInput(f"group {spec.name!r}: missing input {missing[0]!r}")
        if extra:
            raise BadInput(f"group {spec.name!r}: unexpected input {extra[0]!r}")
    batch: int | None = None
    for s in spec.inputs:
        meta = given[s.name]
        shape = list(meta.shape)
        label = f"input {s.name!r}" if not spec.single_input else "input"
        if stacked is not None:
            if not shape or shape[0] != stacked:
                raise BadInput(f"{label}: a training round needs inputs stacked [K={stacked}, ...], got shape {shape}")
            shape = shape[1:]
        expected = list(s.shape)
        if meta.dtype != s.dtype:
            raise BadInput(f"{label}: dtype must be {s.dtype}, got {meta.dtype}")
        if len(shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, shape)):
            want = ["B" if e == -1 else e for e in expected]
            raise BadInput(f"{label}: shape must be {want}, got {shape}")
        if shape and expected and expected[0] == -1:
            if batch is not None and shape[0] != batch:
                raise BadInput(f"inputs disagree on the batch size ({batch} and {shape[0]})")
            batch = shape[0]
    if batch == 0:
        raise BadInput("the batch is empty")
    return batch if batch is not None else 1


TARGETED = ("train_step", "train_round", "evaluate")


def check_targets(op: str, tree: TensorTree, batch: int, stacked: int | None) -> None:
    """Training and evaluation need one target tensor whose batch matches the inputs'."""
    if op not in TARGETED:
        if tree.layout != "none":
            raise BadInput(f"{op} takes no target")
        return
    if tree.layout != "tensor":
        raise BadInput(f"{op} needs one target tensor, got {tree.layout}")
    shape = list(tree.metas[0].shape)
    if stacked is not None:
        if len(shape) < 2 or shape[0] != stacked or shape[1] != batch:
            raise BadInput(f"{op} targets must be stacked [K={stacked}, B={batch}, ...] like the inputs, got {shape}")
    elif not shape or shape[0] != batch:
        raise BadInput(f"target batch size must be {batch} (the input's), got shape {shape}")
