"""A group's model definition: built once by the coordinator, instantiated by workers.

The coordinator imports the factory, builds the module on the ``meta`` device (no
memory, no init), reads the bank layout from it (every parameter and buffer with its
per-model shape and dtype, plus the optimizer's state entries), and checks the input
spec with a shape-only forward. Workers receive that ``GroupSpec`` and build the
module once more on their own device, without re-deriving or re-checking anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from core.spec import EntrySpec, GroupConfig, GroupSpec, InputSpec
from core.tensors import DTYPE_NAMES, DTYPES


def import_object(ref: str, what: str) -> Any:
    """Import ``"package.module:attr"``; raise ``ConfigError`` saying what failed."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{what} {ref!r}: cannot import {module_name!r}: {exc}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{what} {ref!r}: module {module_name!r} has no {attr!r}") from None
    return obj


def build_module(factory: str, kwargs: dict[str, Any], device: torch.device | str) -> nn.Module:
    """Call the factory with its device set as the default, so no real memory is touched on meta."""
    fn: Callable[..., Any] = import_object(factory, "factory")
    with torch.device(device):
        module = fn(**kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"factory {factory!r} returned {type(module).__name__}, not an nn.Module")
    return module


def example_inputs(inputs: list[InputSpec], single: bool, batch: int, device: torch.device | str) -> Any:
    """Inputs of the spec's shapes (``-1`` -> ``batch``) on ``device``."""
    made = {}
    for spec in inputs:
        shape = [batch if d == -1 else d for d in spec.shape]
        made[spec.name] = torch.zeros(shape, dtype=DTYPES[spec.dtype], device=device)
    return made["x"] if single else made


def compute_dtype(module_or_dtypes: nn.Module | list[torch.dtype]) -> torch.dtype:
    """The dtype a model computes in: its first floating-point parameter's (float32 if none)."""
    dtypes = ([p.dtype for p in module_or_dtypes.parameters()] if isinstance(module_or_dtypes, nn.Module)
              else module_or_dtypes)
    return next((d for d in dtypes if d.is_floating_point), torch.float32)


def cast_floating(inputs: Any, dtype: torch.dtype) -> Any:
    """Floating-point inputs in ``dtype`` (a float32 batch into a bfloat16 model, say); others as they are."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    return {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else cast(inputs)


def call_module(module: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> Any:
    """Run the module with the given parameters and buffers, no copies."""
    if isinstance(inputs, dict):
        return torch.func.functional_call(module, params, (), inputs, strict=False)
    return torch.func.functional_call(module, params, (inputs,), strict=False)


def build_definition(group: GroupConfig) -> GroupSpec:
    """Build the group's definition once, on meta; raise ``ConfigError`` naming the group."""
    where = f"group {group.name!r}"
    try:
        module = build_module(group.factory, group.kwargs, "meta")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{where}: factory {group.factory!r} failed with kwargs {group.kwargs}: {type(exc).__name__}: {exc}") from None
    stored = stored_dtype(group.precision)
    entries = [
        EntrySpec(name, "param", tuple(p.shape), _dtype_name(stored(p.dtype), where, name))
        for name, p in module.named_parameters()
    ]
    entries += [
        EntrySpec(name, "buffer", tuple(b.shape), _dtype_name(stored(b.dtype), where, name))
        for name, b in module.named_buffers()
    ]
    if not any(e.role == "param" for e in entries):
        raise ConfigError(f"{where}: the module has no parameters")
    entries.append(EntrySpec(STEPS, "state", (), "float64"))
    entries += optimizer_state_entries(group.optimizer, [e for e in entries if e.role == "param"])
    entries += [EntrySpec(hparam_name(hp), "hparam", (), "float64") for hp in group.hparams]
    _check_forward(module, group, where)
    if group.loss not in ("cross_entropy", "mse"):
        import_object(group.loss, f"{where}: loss")
    return GroupSpec(
        name=group.name,
        factory=group.factory,
        kwargs=group.kwargs,
        inputs=group.inputs,
        single_input=group.single_input,
        entries=entries,
        loss=group.loss,
        optimizer=group.optimizer,
        hparams=group.hparams,
        indices=list(range(group.count)),
        init_seed=group.init_seed,
        init_safetensors=group.init_safetensors,
        batching=group.batching,
        schedule=group.schedule,
        precision=group.precision,
    )


def stored_dtype(precision: str) -> Callable[[torch.dtype], torch.dtype]:
    """How a precision stores a floating-point parameter or buffer the factory made in some dtype."""
    target = {"bf16": torch.bfloat16, "bf16-mixed": torch.float32}.get(precision)
    return lambda dtype: target if target is not None and dtype.is_floating_point else dtype


def _dtype_name(dtype: torch.dtype, where: str, name: str) -> str:
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"{where}: tensor {name!r} has unsupported dtype {dtype}")
    return DTYPE_NAMES[dtype]


def _check_forward(module: nn.Module, group: GroupConfig, where: str) -> None:
    """A shape-only forward on meta, so a wrong input spec fails at start-up, not at the first job."""
    inputs = cast_floating(example_inputs(group.inputs, group.single_input, 2, "meta"), compute_dtype(module))
    try:
        with torch.no_grad():
            if isinstance(inputs, dict):
                module(**inputs)
            else:
                module(inputs)
    except Exception as exc:
        raise ConfigError(
            f"{where}.input: a forward pass with inputs of the configured shape failed: {type(exc).__name__}: {exc}"
        ) from None


def state_name(kind: str, param: str) -> str:
    return f"optim.{kind}.{param}"


def hparam_name(hparam: str) -> str:
    return f"hparam.{hparam}"


STEPS = "optim.steps"  # the model's optimizer steps so far: what a schedule follows


def optimizer_state_entries(optimizer: str, params: list[EntrySpec]) -> list[EntrySpec]:
    """The bank entries an optimizer keeps per model, next to the parameters."""
    kinds = {"sgd": ["momentum"], "adam": ["exp_avg", "exp_avg_sq"], "adamw": ["exp_avg", "exp_avg_sq"]}[optimizer]
    # One step count per parameter, as torch.optim keeps: a parameter that got no gradient
    # sits a step out, and its bias correction and momentum start must not move on.
    entries = [EntrySpec(state_name("step", p.name), "state", (), "float32") for p in params]
    for kind in kinds:
        entries += [EntrySpec(state_name(kind, p.name), "state", p.shape, p.dtype) for p in params]
    return entries
