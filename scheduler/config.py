"""Loading and checking the TOML config; every error names the key at fault.

    [coordinator]            address, workers, device, mps, streams, queue bounds, ...
    [[group]]                name, factory, kwargs, count, input, loss, optimizer, init, batching
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.spec import PINNABLE_PLANS, PRECISIONS, BatchingSpec, GroupConfig, InputSpec, ScheduleSpec
from core.tensors import DTYPES

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "COHORT_ADDRESS"

OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {  # clip_grad_norm: 0 is off
    "sgd": {"lr": 0.01, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": 0.0, "clip_grad_norm": 0.0},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "clip_grad_norm": 0.0},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "clip_grad_norm": 0.0},
}
BUILTIN_LOSSES = ("cross_entropy", "mse")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class CoordinatorConfig:
    address: str = DEFAULT_ADDRESS
    workers: int = 1
    device: str = "auto"
    mps: str = "auto"
    streams: int = 4
    max_queued: int = 10_000
    max_queued_per_model: int = 1_000
    window: int = 64
    max_message_bytes: int = 256 * 1024 * 1024
    heartbeat_timeout_s: float = 30.0
    start_timeout_s: float = 120.0
    snapshot_interval_s: float = 0.0
    snapshot_dir: str = ""
    mps_thread_percentage: int | None = None
    curve_secret_key: str = ""
    curve_allowed_keys: str = ""
    compile_cache_dir: str = ""  # "": $XDG_CACHE_HOME/cohort, else ~/.cache/cohort
    restore_run: str = ""  # the run id of a dead coordinator on this machine: start from its host copies


@dataclass(frozen=True)
class Config:
    coordinator: CoordinatorConfig
    groups: list[GroupConfig] = field(default_factory=list)
    path: str = ""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a config file; raise ``ConfigError`` naming the bad key."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(raw, str(p))


def parse_config(raw: dict[str, Any], path: str = "<config>") -> Config:
    """Check an already parsed TOML document."""
    unknown = set(raw) - {"coordinator", "group"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [coordinator] and [[group]]")
    coordinator = _coordinator(raw.get("coordinator", {}), path)
    groups_raw = raw.get("group", [])
    if not isinstance(groups_raw, list) or not groups_raw:
        raise ConfigError(f"{path}: at least one [[group]] is needed")
    groups = [_group(g, f"group[{i}]", path) for i, g in enumerate(groups_raw)]
    names = [g.name for g in groups]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: group.name {dupes[0]!r} is used twice")
    return Config(coordinator, groups, path)


def override_coordinator(config: Config, **values: Any) -> Config:
    """``config`` with coordinator keys replaced (from the command line), checked as the file's are."""
    raw = {k: v for k, v in {**dataclasses.asdict(config.coordinator), **values}.items() if v is not None}
    return dataclasses.replace(config, coordinator=_coordinator(raw, "the command line"))


def _expect(value: Any, kind: type | tuple[type, ...], key: str, path: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"{path}: {key} must be a number, got {value!r}")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{path}: {key} must be {want}, got {value!r}")
    return value


def _coordinator(raw: Any, path: str) -> CoordinatorConfig:
    _expect(raw, dict, "coordinator", path)
    defaults = CoordinatorConfig()
    known = set(CoordinatorConfig.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key coordinator.{sorted(unknown)[0]}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = getattr(defaults, key)
        kind: Any = type(default) if default is not None else int
        if kind is float:
            kind = (int, float)
        values[key] = _expect(value, kind, f"coordinator.{key}", path)
    cfg = CoordinatorConfig(**values)
    if not re.match(r"^(tcp|ipc)://.+", cfg.address):
        raise ConfigError(f"{path}: coordinator.address must be tcp://HOST:PORT or ipc://PATH, got {cfg.address!r}")
    if not 1 <= cfg.workers <= 64:
        raise ConfigError(f"{path}: coordinator.workers must be between 1 and 64, got {cfg.workers}")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", cfg.device):
        raise ConfigError(f"{path}: coordinator.device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.mps not in ("auto", "on", "off"):
        raise ConfigError(f"{path}: coordinator.mps must be auto, on or off, got {cfg.mps!r}")
    if not 1 <= cfg.streams <= 32:  # torch's pool holds 32 streams per priority; more would share
        raise ConfigError(f"{path}: coordinator.streams must be between 1 and 32, got {cfg.streams}")
    for key in ("max_queued", "max_queued_per_model", "window", "max_message_bytes"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{path}: coordinator.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.mps_thread_percentage is not None and not 1 <= cfg.mps_thread_percentage <= 100:
        raise ConfigError(f"{path}: coordinator.mps_thread_percentage must be 1..100")
    for key in ("heartbeat_timeout_s", "start_timeout_s"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{path}: coordinator.{key} must be positive, got {getattr(cfg, key)}")
    if not cfg.snapshot_interval_s >= 0:
        raise ConfigError(f"{path}: coordinator.snapshot_interval_s must be 0 (off) or positive, got {cfg.snapshot_interval_s}")
    if cfg.restore_run and not re.match(r"^\d+-[0-9a-f]{8}$", cfg.restore_run):
        raise ConfigError(f"{path}: coordinator.restore_run must be a run id as stats() gives it (like "
                          f"'12345-0a1b2c3d'), got {cfg.restore_run!r}")
    _check_security(cfg, path)
    return cfg


def is_private_address(address: str) -> bool:
    """Loopback TCP or an ipc:// path: reachable only from this machine."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _check_security(cfg: CoordinatorConfig, path: str) -> None:
    """DESIGN section 10: any address other than loopback or ipc:// needs CURVE keys."""
    curve = (cfg.curve_secret_key, cfg.curve_allowed_keys)
    if any(curve) and not all(curve):
        raise ConfigError(f"{path}: coordinator.curve_secret_key and coordinator.curve_allowed_keys go together")
    if not is_private_address(cfg.address) and not all(curve):
        raise ConfigError(
            f"{path}: coordinator.address {cfg.address!r} is reachable from other machines: set "
            "coordinator.curve_secret_key (the server's secret certificate) and coordinator.curve_allowed_keys "
            "(a directory of allowed client certificates); `cohort keys DIR` makes both"
        )
    if cfg.curve_secret_key and not Path(cfg.curve_secret_key).is_file():
        raise ConfigError(f"{path}: coordinator.curve_secret_key {cfg.curve_secret_key!r} is not a file")
    if cfg.curve_allowed_keys and not Path(cfg.curve_allowed_keys).is_dir():
        raise ConfigError(f"{path}: coordinator.curve_allowed_keys {cfg.curve_allowed_keys!r} is not a directory")


# torch.compile's modes; "reduce-overhead" captures CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GROUP_KEYS = {"name", "factory", "kwargs", "count", "input", "loss", "optimizer", "init", "batching", "schedule",
               "precision"}


def _group(raw: Any, key: str, path: str) -> GroupConfig:
    _expect(raw, dict, key, path)
    unknown = set(raw) - _GROUP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key {key}.{sorted(unknown)[0]}; known: {', '.join(sorted(_GROUP_KEYS))}")
    for required in ("name", "factory", "count", "input"):
        if required not in raw:
            raise ConfigError(f"{path}: {key}.{required} is required")
    name = _expect(raw["name"], str, f"{key}.name", path)
    if not _GROUP_NAME.match(name):
        raise ConfigError(f"{path}: {key}.name {name!r} may use only letters, digits, '_', '-' and '.'")
    key = f"group {name!r}"
    factory = _expect(raw["factory"], str, f"{key}.factory", path)
    if ":" not in factory:
        raise ConfigError(f"{path}: {key}.factory must look like 'package.module:function', got {factory!r}")
    count = _expect(raw["count"], int, f"{key}.count", path)
    if not 1 <= count <= 100_000:
        raise ConfigError(f"{path}: {key}.count must be between 1 and 100000, got {count}")
    kwargs = _expect(raw.get("kwargs", {}), dict, f"{key}.kwargs", path)
    inputs, single = _inputs(raw["input"], f"{key}.input", path)
    loss = _expect(raw.get("loss", "cross_entropy"), str, f"{key}.loss", path)
    if loss not in BUILTIN_LOSSES and ":" not in loss:
        raise ConfigError(f"{path}: {key}.loss must be cross_entropy, mse or 'package.module:function', got {loss!r}")
    optimizer, hparams = _optimizer(raw.get("optimizer", {"name": "sgd"}), count, f"{key}.optimizer", path)
    seed, safetensors = _init(raw.get("init", {"seed": 0}), f"{key}.init", path)
    batching = _batching(raw.get("batching", {}), f"{key}.batching", path)
    schedule = _schedule(raw.get("schedule", {"name": "constant"}), f"{key}.schedule", path)
    precision = _expect(raw.get("precision", "fp32"), str, f"{key}.precision", path)
    if precision not in PRECISIONS:
        raise ConfigError(f"{path}: {key}.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return GroupConfig(name, factory, kwargs, count, inputs, single, loss, optimizer, hparams, seed, safetensors,
                       batching, schedule, precision)


_SCHEDULE_KEYS = {"constant": set(), "cosine": {"total_steps", "min_lr", "warmup_steps"},
                  "step": {"step_size", "gamma"}, "linear": {"total_steps", "start_factor", "end_factor"}}


def _schedule(raw: Any, key: str, path: str) -> ScheduleSpec:
    """A learning-rate schedule; impossible values are refused here, naming the key."""
    _expect(raw, dict, key, path)
    name = _expect(raw.get("name", "constant"), str, f"{key}.name", path)
    if name not in _SCHEDULE_KEYS:
        raise ConfigError(f"{path}: {key}.name must be one of {', '.join(_SCHEDULE_KEYS)}, got {name!r}")
    unknown = set(raw) - {"name"} - _SCHEDULE_KEYS[name]
    if unknown:
        known = ", ".join(sorted(_SCHEDULE_KEYS[name])) or "nothing else"
        raise ConfigError(f"{path}: {key}.{sorted(unknown)[0]} is not a {name} schedule setting; it takes {known}")
    values: dict[str, Any] = {"name": name}
    for setting, kind in (("total_steps", int), ("warmup_steps", int), ("step_size", int), ("min_lr", (int, float)),
                          ("gamma", (int, float)), ("start_factor", (int, float)), ("end_factor", (int, float))):
        if setting in raw:
            values[setting] = _expect(raw[setting], kind, f"{key}.{setting}", path)
    spec = ScheduleSpec(**values)
    checks = {
        "cosine": [("total_steps", spec.total_steps >= 1, "at least 1"), ("min_lr", spec.min_lr >= 0, "0 or more"),
                   ("warmup_steps", 0 <= spec.warmup_steps < spec.total_steps, "0 or more, below total_steps")],
        "step": [("step_size", spec.step_size >= 1, "at least 1"), ("gamma", 0 < spec.gamma <= 1, "in (0, 1]")],
        "linear": [("total_steps", spec.total_steps >= 1, "at least 1"),
                   ("start_factor", 0 < spec.start_factor <= 1, "in (0, 1]"),
                   ("end_factor", 0 <= spec.end_factor <= 1, "in [0, 1]")],
    }
    for setting, ok, want in checks.get(name, []):
        if not ok:
            raise ConfigError(f"{path}: {key}.{setting} must be {want}, got {getattr(spec, setting)}")
    return spec


def _batching(raw: Any, key: str, path: str) -> BatchingSpec:
    _expect(raw, dict, key, path)
    known = {"fuse", "max_jobs", "max_wait_ms", "compile", "buckets", "plan"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: {key}.{sorted(unknown)[0]} unknown; known: {', '.join(sorted(known))}")
    fuse = _expect(raw.get("fuse", True), bool, f"{key}.fuse", path)
    max_jobs = _expect(raw.get("max_jobs", 64), int, f"{key}.max_jobs", path)
    if isinstance(max_jobs, bool) or not 1 <= max_jobs <= 4096:
        raise ConfigError(f"{path}: {key}.max_jobs must be between 1 and 4096, got {max_jobs}")
    wait = _expect(raw.get("max_wait_ms", 0.0), (int, float), f"{key}.max_wait_ms", path)
    if isinstance(wait, bool) or not 0 <= wait <= 1000:
        raise ConfigError(f"{path}: {key}.max_wait_ms must be between 0 and 1000, got {wait}")
    compiled = raw.get("compile", False)
    if compiled is True:
        compiled = "default"
    if compiled is False:
        compiled = ""
    if compiled not in ("", *COMPILE_MODES):
        raise ConfigError(f"{path}: {key}.compile must be true, false or one of {', '.join(COMPILE_MODES)}, "
                          f"got {compiled!r}")
    buckets = raw.get("buckets")
    if buckets is not None:
        _expect(buckets, list, f"{key}.buckets", path)
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets):
            raise ConfigError(f"{path}: {key}.buckets must be a list of batch sizes (positive integers), got {buckets!r}")
        buckets = sorted(set(buckets))
    plan = _expect(raw.get("plan", "auto"), str, f"{key}.plan", path)
    if plan not in PINNABLE_PLANS:
        raise ConfigError(f"{path}: {key}.plan must be one of {', '.join(PINNABLE_PLANS)}, got {plan!r}")
    if plan == "vmap" and not fuse:
        raise ConfigError(f"{path}: {key}.plan = \"vmap\" needs {key}.fuse = true")
    return BatchingSpec(fuse, max_jobs, float(wait), compiled, buckets, plan)


def _input_spec(raw: Any, name: str, key: str, path: str) -> InputSpec:
    _expect(raw, dict, key, path)
    unknown = set(raw) - {"shape", "dtype"}
    if unknown:
        raise ConfigError(f"{path}: {key}.{sorted(unknown)[0]} unknown; an input has shape and dtype")
    shape = _expect(raw.get("shape"), list, f"{key}.shape", path)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape):
        raise ConfigError(f"{path}: {key}.shape must be a list of positive sizes or -1, got {shape!r}")
    dtype = _expect(raw.get("dtype", "float32"), str, f"{key}.dtype", path)
    if dtype not in DTYPES:
        raise ConfigError(f"{path}: {key}.dtype {dtype!r} unknown; use one of {', '.join(DTYPES)}")
    return InputSpec(name, tuple(shape), dtype)


def _inputs(raw: Any, key: str, path: str) -> tuple[list[InputSpec], bool]:
    _expect(raw, dict, key, path)
    if "shape" in raw:
        return [_input_spec(raw, "x", key, path)], True
    if not raw:
        raise ConfigError(f"{path}: {key} must give a shape, or named inputs each with a shape")
    return [_input_spec(v, k, f"{key}.{k}", path) for k, v in raw.items()], False


def _optimizer(raw: Any, count: int, key: str, path: str) -> tuple[str, dict[str, list[float]]]:
    _expect(raw, dict, key, path)
    name = _expect(raw.get("name", "sgd"), str, f"{key}.name", path).lower()
    if name not in OPTIMIZER_DEFAULTS:
        raise ConfigError(f"{path}: {key}.name {name!r} unknown; use one of {', '.join(OPTIMIZER_DEFAULTS)}")
    values: dict[str, Any] = dict(raw)
    values.pop("name", None)
    if "betas" in values:
        betas = values.pop("betas")
        if not (isinstance(betas, list) and len(betas) == 2):
            raise ConfigError(f"{path}: {key}.betas must be a pair [beta1, beta2]; per-model betas use beta1 = [...]")
        values["beta1"], values["beta2"] = betas
    defaults = OPTIMIZER_DEFAULTS[name]
    unknown = set(values) - set(defaults)
    if unknown:
        raise ConfigError(f"{path}: {key}.{sorted(unknown)[0]} is not a {name} setting; known: {', '.join(defaults)}")
    hparams: dict[str, list[float]] = {}
    for hp, default in defaults.items():
        value = values.get(hp, default)
        if isinstance(value, list):
            if len(value) != count:
                raise ConfigError(f"{path}: {key}.{hp} has {len(value)} values; give one, or one per model ({count})")
            items = value
        else:
            items = [value] * count
        for v in items:
            if isinstance(v, bool):
                v = float(v)
            _expect(v, (int, float), f"{key}.{hp}", path)
        hparams[hp] = [float(v) for v in items]
    _check_hparams(name, hparams, key, path)
    return name, hparams


# The ranges torch.optim itself enforces, so a config never trains a model into NaN.
_HPARAM_RANGES: dict[str, tuple[float, float, bool]] = {  # (low, high, high included)
    "lr": (0.0, float("inf"), False), "momentum": (0.0, float("inf"), False),
    "dampening": (0.0, float("inf"), False), "weight_decay": (0.0, float("inf"), False),
    "eps": (0.0, float("inf"), False), "beta1": (0.0, 1.0, False), "beta2": (0.0, 1.0, False),
    "nesterov": (0.0, 1.0, True), "clip_grad_norm": (0.0, float("inf"), False),
}


def hparam_problem(optimizer: str, hparam: str, value: float) -> str | None:
    """Why ``value`` cannot be ``optimizer``'s ``hparam`` (torch.optim's own ranges), or None."""
    if hparam not in OPTIMIZER_DEFAULTS[optimizer]:
        return f"{hparam!r} is not a {optimizer} setting; known: {', '.join(OPTIMIZER_DEFAULTS[optimizer])}"
    low, high, inclusive = _HPARAM_RANGES[hparam]
    if not (low <= value and (value <= high if inclusive else value < high)):
        return f"{hparam} = {value} is out of range for {optimizer}"
    return None


def _check_hparams(name: str, hparams: dict[str, list[float]], key: str, path: str) -> None:
    for hp, values in hparams.items():
        for v in values:
            problem = hparam_problem(name, hp, v)
            if problem is not None:
                raise ConfigError(f"{path}: {key}.{problem}")
    if name == "sgd":
        for k, nesterov in enumerate(hparams["nesterov"]):
            if nesterov and (hparams["momentum"][k] <= 0 or hparams["dampening"][k] != 0):
                raise ConfigError(f"{path}: {key}.nesterov needs momentum > 0 and dampening = 0 (model {k})")


def _init(raw: Any, key: str, path: str) -> tuple[int | None, str | None]:
    _expect(raw, dict, key, path)
    unknown = set(raw) - {"seed", "safetensors"}
    if unknown:
        raise ConfigError(f"{path}: {key}.{sorted(unknown)[0]} unknown; use seed = N or safetensors = 'path/{{index}}.safetensors'")
    if "safetensors" in raw:
        template = _expect(raw["safetensors"], str, f"{key}.safetensors", path)
        try:
            template.format(index=0, group="g")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{path}: {key}.safetensors may use only {{index}} and {{group}}, got {template!r} "
                              f"({type(exc).__name__}: {exc})") from None
        return None, template
    return _expect(raw.get("seed", 0), int, f"{key}.seed", path), None
