"""scheduler/config.py: the demo config loads; every bad key is a ConfigError naming the key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from core.spec import InputSpec
from scheduler.config import (
    BUILTIN_LOSSES,
    OPTIMIZER_DEFAULTS,
    Config,
    CoordinatorConfig,
    load_config,
    override_coordinator,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.toml"


def base() -> dict[str, Any]:
    """A small valid config, as tomllib would parse it."""
    return {
        "coordinator": {"address": "tcp://127.0.0.1:5599", "workers": 2, "device": "cpu", "mps": "off", "streams": 2},
        "group": [
            {
                "name": "mlp",
                "factory": "examples.models:mlp",
                "kwargs": {"d_in": 8, "hidden": 16, "d_out": 4},
                "count": 3,
                "input": {"shape": [-1, 8], "dtype": "float32"},
                "loss": "cross_entropy",
                "optimizer": {"name": "sgd", "lr": [0.1, 0.2, 0.3], "momentum": 0.9},
                "init": {"seed": 0},
            }
        ],
    }


def with_(path: str, value: Any, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base()`` with the value at ``path`` ("coordinator.workers", "group.0.optimizer.lr") replaced;
    the sentinel DELETE removes the key."""
    raw = copy.deepcopy(raw or base())
    *parents, last = path.split(".")
    node: Any = raw
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


DELETE = object()


def expect_error(raw: dict[str, Any], *names: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "test.toml")
    text = str(info.value)
    for name in names:
        assert name in text, f"ConfigError {text!r} does not name {name!r}"
    assert "test.toml" in text, f"ConfigError {text!r} does not name the file"
    return text


# --------------------------------------------------------------------------- good configs


def test_demo_config_loads() -> None:
    cfg = load_config(DEMO)
    assert isinstance(cfg, Config) and cfg.path == str(DEMO)
    c = cfg.coordinator
    assert (c.address, c.workers, c.device, c.mps, c.streams) == ("tcp://127.0.0.1:5555", 2, "auto", "auto", 4)
    by_name = {g.name: g for g in cfg.groups}
    assert list(by_name) == ["mlp", "cnn", "lm"]
    mlp = by_name["mlp"]
    assert mlp.count == 8 and mlp.factory == "examples.models:mlp"
    assert mlp.kwargs == {"d_in": 64, "hidden": 128, "d_out": 10}
    assert mlp.inputs == [InputSpec("x", (-1, 64), "float32")] and mlp.single_input
    assert mlp.optimizer == "sgd"
    assert mlp.hparams["lr"] == [0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005]
    assert mlp.hparams["momentum"] == [0.9] * 8
    assert set(mlp.hparams) == set(OPTIMIZER_DEFAULTS["sgd"])
    assert all(len(v) == 8 for v in mlp.hparams.values())
    assert mlp.init_seed == 0 and mlp.init_safetensors is None
    assert by_name["cnn"].optimizer == "adam" and by_name["cnn"].hparams["lr"] == [1e-3] * 4
    lm = by_name["lm"]
    assert lm.inputs == [InputSpec("x", (-1, 32), "int64")]
    assert lm.optimizer == "adamw" and lm.hparams["weight_decay"] == [0.01] * 4
    assert lm.hparams["lr"] == [1e-3, 3e-4, 1e-4, 3e-5]
    assert lm.init_seed == 200


def test_defaults() -> None:
    raw = base()
    del raw["coordinator"]
    g = raw["group"][0]
    for key in ("kwargs", "loss", "optimizer", "init"):
        del g[key]
    cfg = parse_config(raw)
    assert cfg.coordinator == CoordinatorConfig()
    group = cfg.groups[0]
    assert group.kwargs == {} and group.loss == "cross_entropy"
    assert group.optimizer == "sgd"
    assert group.hparams == {k: [float(v)] * 3 for k, v in OPTIMIZER_DEFAULTS["sgd"].items()}
    assert group.init_seed == 0 and group.init_safetensors is None


def test_named_inputs_and_safetensors_init_and_betas() -> None:
    raw = with_("group.0.input", {"tokens": {"shape": [-1, 16], "dtype": "int64"}, "mask": {"shape": [-1, 16], "dtype": "bool"}})
    raw = with_("group.0.init", {"safetensors": "w/{index}.safetensors"}, raw)
    raw = with_("group.0.optimizer", {"name": "Adam", "betas": [0.8, 0.99], "lr": 1e-3}, raw)
    group = parse_config(raw).groups[0]
    assert not group.single_input
    assert group.inputs == [InputSpec("tokens", (-1, 16), "int64"), InputSpec("mask", (-1, 16), "bool")]
    assert group.init_seed is None and group.init_safetensors == "w/{index}.safetensors"
    assert group.optimizer == "adam"
    assert group.hparams["beta1"] == [0.8] * 3 and group.hparams["beta2"] == [0.99] * 3


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_good_devices(device: str) -> None:
    assert parse_config(with_("coordinator.device", device)).coordinator.device == device


@pytest.mark.parametrize("loss", [*BUILTIN_LOSSES, "tests.fixtures:my_loss"])
def test_good_losses(loss: str) -> None:
    assert parse_config(with_("group.0.loss", loss)).groups[0].loss == loss


def test_ipc_address_and_integer_floats() -> None:
    raw = with_("coordinator.address", "ipc:///tmp/cohort-test/sock")
    raw = with_("coordinator.heartbeat_timeout_s", 5, raw)  # an int where a float is expected
    raw = with_("group.0.optimizer.lr", 1, raw)
    cfg = parse_config(raw)
    assert cfg.coordinator.heartbeat_timeout_s == 5
    assert cfg.groups[0].hparams["lr"] == [1.0] * 3


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[coordinator\nworkers = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text(DEMO.read_text().replace("workers = 2", "workers = 3"))
    assert load_config(good).coordinator.workers == 3


# --------------------------------------------------------------------------- bad configs


def test_unknown_top_level_key() -> None:
    raw = base()
    raw["groups"] = []
    expect_error(raw, "groups")


@pytest.mark.parametrize("key", ["worker", "adress", "max_queue", "mps_threads"])
def test_unknown_coordinator_key(key: str) -> None:
    expect_error(with_(f"coordinator.{key}", 1), f"coordinator.{key}")


@pytest.mark.parametrize("key", ["counts", "factroy", "optimiser", "inputs", "lr"])
def test_unknown_group_key(key: str) -> None:
    expect_error(with_(f"group.0.{key}", 1), key)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("address", 5555),
        ("workers", "2"),
        ("workers", 2.0),
        ("workers", True),
        ("device", 0),
        ("mps", True),
        ("streams", [4]),
        ("max_queued", "many"),
        ("heartbeat_timeout_s", "30"),
        ("heartbeat_timeout_s", False),
        ("mps_thread_percentage", 50.5),
        ("snapshot_dir", 3),
    ],
)
def test_coordinator_wrong_type(key: str, value: Any) -> None:
    expect_error(with_(f"coordinator.{key}", value), f"coordinator.{key}")


def test_coordinator_not_a_table() -> None:
    expect_error({**base(), "coordinator": ["x"]}, "coordinator")


@pytest.mark.parametrize("workers", [0, -1, 65])
def test_workers_out_of_range(workers: int) -> None:
    expect_error(with_("coordinator.workers", workers), "coordinator.workers")


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cpu ", "cuda:0,1", "mps", ""])
def test_bad_device(device: str) -> None:
    expect_error(with_("coordinator.device", device), "coordinator.device", repr(device))


@pytest.mark.parametrize("mps", ["yes", "true", "ON", "", "auto "])
def test_bad_mps(mps: str) -> None:
    expect_error(with_("coordinator.mps", mps), "coordinator.mps")


@pytest.mark.parametrize("address", ["127.0.0.1:5555", "http://x:1", "tcp://", "udp://127.0.0.1:1"])
def test_bad_address(address: str) -> None:
    expect_error(with_("coordinator.address", address), "coordinator.address")


@pytest.mark.parametrize("key", ["streams", "max_queued", "max_queued_per_model", "window", "max_message_bytes"])
def test_counts_must_be_positive(key: str) -> None:
    expect_error(with_(f"coordinator.{key}", 0), f"coordinator.{key}")


def test_streams_stay_within_torchs_pool_of_32() -> None:
    expect_error(with_("coordinator.streams", 33), "between 1 and 32")
    assert parse_config(with_("coordinator.streams", 32)).coordinator.streams == 32


@pytest.mark.parametrize("value", [0, 101])
def test_mps_thread_percentage_range(value: int) -> None:
    expect_error(with_("coordinator.mps_thread_percentage", value), "coordinator.mps_thread_percentage")


@pytest.mark.parametrize(("key", "value"), [("heartbeat_timeout_s", 0), ("start_timeout_s", -1.0),
                                            ("snapshot_interval_s", -5.0)])
def test_durations_must_be_positive(key: str, value: float) -> None:
    """A zero heartbeat timeout declares every worker dead at once; a negative interval is nonsense."""
    expect_error(with_(f"coordinator.{key}", value), f"coordinator.{key}")


def test_non_loopback_address_needs_curve_keys() -> None:
    """DESIGN section 10: binding another address than loopback requires CURVE keys."""
    expect_error(with_("coordinator.address", "tcp://0.0.0.0:5555"), "coordinator.address")


def test_no_groups() -> None:
    raw = base()
    raw["group"] = []
    expect_error(raw, "group")
    del raw["group"]
    expect_error(raw, "group")


def test_group_not_a_table() -> None:
    raw = base()
    raw["group"] = ["mlp"]
    expect_error(raw, "group[0]")


def test_duplicate_group_name() -> None:
    raw = base()
    raw["group"].append(copy.deepcopy(raw["group"][0]))
    text = expect_error(raw, "group.name", "'mlp'")
    assert "twice" in text


@pytest.mark.parametrize("key", ["name", "factory", "count", "input"])
def test_missing_required_group_key(key: str) -> None:
    expect_error(with_(f"group.0.{key}", DELETE), f"group[0].{key}")


@pytest.mark.parametrize("name", ["", "a/b", "has space", "ü", "x:y"])
def test_bad_group_name(name: str) -> None:
    expect_error(with_("group.0.name", name), "name", repr(name))


@pytest.mark.parametrize("factory", ["examples.models.mlp", "", 3])
def test_bad_factory(factory: Any) -> None:
    expect_error(with_("group.0.factory", factory), "factory")


@pytest.mark.parametrize("count", [0, -3, 100_001])
def test_count_out_of_range(count: int) -> None:
    expect_error(with_("group.0.count", count), "count")


@pytest.mark.parametrize("count", ["3", 3.0, True])
def test_count_wrong_type(count: Any) -> None:
    expect_error(with_("group.0.count", count), "count")


def test_kwargs_wrong_type() -> None:
    expect_error(with_("group.0.kwargs", ["d_in", 8]), "kwargs")


@pytest.mark.parametrize(
    "value",
    [
        {"shape": [-1, 8], "dtype": "float8"},
        {"shape": [-1, 8], "dtype": "f32"},
        {"shape": [-1, 8], "dtype": 32},
        {"x": {"shape": [-1, 8], "dtype": "complex64"}},
    ],
)
def test_bad_input_dtype(value: dict[str, Any]) -> None:
    expect_error(with_("group.0.input", value), "input", "dtype")


@pytest.mark.parametrize(
    "value",
    [{"shape": []}, {"shape": [0, 8]}, {"shape": [-2, 8]}, {"shape": [-1, "8"]}, {"shape": [-1, True]},
     {"shape": "(-1, 8)"}, {"shape": [-1, 8.0]}, {}, {"x": {"dtype": "float32"}}, [-1, 8], {"x": [-1, 8]}],
)
def test_bad_input_shape(value: Any) -> None:
    expect_error(with_("group.0.input", value), "input")


def test_unknown_input_spec_key() -> None:
    """A typo in the input spec (``dtyp``) must not silently fall back to float32."""
    expect_error(with_("group.0.input", {"shape": [-1, 8], "dtyp": "int64"}), "input.dtyp")


@pytest.mark.parametrize("loss", ["crossentropy", "MSE", "", "l1"])
def test_bad_loss(loss: str) -> None:
    expect_error(with_("group.0.loss", loss), "loss", repr(loss))


def test_loss_wrong_type() -> None:
    expect_error(with_("group.0.loss", ["mse"]), "loss")


@pytest.mark.parametrize("name", ["rmsprop", "lbfgs", "", "sgd2"])
def test_unknown_optimizer(name: str) -> None:
    expect_error(with_("group.0.optimizer", {"name": name}), "optimizer.name", repr(name))


def test_optimizer_wrong_types() -> None:
    expect_error(with_("group.0.optimizer", "sgd"), "optimizer")
    expect_error(with_("group.0.optimizer", {"name": 1}), "optimizer.name")
    expect_error(with_("group.0.optimizer.lr", "0.1"), "optimizer.lr")
    expect_error(with_("group.0.optimizer.lr", [0.1, "x", 0.3]), "optimizer.lr")
    expect_error(with_("group.0.optimizer.momentum", {"v": 1}), "optimizer.momentum")


@pytest.mark.parametrize(("name", "key"), [("sgd", "beta1"), ("adam", "momentum"), ("adamw", "nesterov"), ("sgd", "betas")])
def test_setting_of_another_optimizer(name: str, key: str) -> None:
    expect_error(with_("group.0.optimizer", {"name": name, key: 0.5}), f"optimizer.{key}")


@pytest.mark.parametrize(("key", "n"), [("lr", 2), ("lr", 4), ("momentum", 1), ("weight_decay", 0)])
def test_per_model_list_of_wrong_length(key: str, n: int) -> None:
    text = expect_error(with_(f"group.0.optimizer.{key}", [0.1] * n), f"optimizer.{key}")
    assert str(n) in text and "3" in text


def test_bad_betas() -> None:
    expect_error(with_("group.0.optimizer", {"name": "adam", "betas": [0.9]}), "optimizer.betas")
    expect_error(with_("group.0.optimizer", {"name": "adam", "betas": 0.9}), "optimizer.betas")


@pytest.mark.parametrize(
    ("optimizer", "key", "value"),
    [
        ("sgd", "lr", -0.1),
        ("sgd", "lr", [0.1, -0.1, 0.1]),
        ("sgd", "momentum", -0.5),
        ("adam", "beta1", 1.0),
        ("adam", "eps", -1e-8),
        ("adamw", "weight_decay", -0.01),
        ("sgd", "lr", float("nan")),
    ],
)
def test_hyperparameter_out_of_range(optimizer: str, key: str, value: Any) -> None:
    """torch.optim refuses these values; the config must too (naming the key), instead of
    training every model into NaN or silently diverging."""
    expect_error(with_("group.0.optimizer", {"name": optimizer, key: value}), f"optimizer.{key}")


def test_nesterov_needs_momentum_and_no_dampening() -> None:
    """torch.optim.SGD: 'Nesterov momentum requires a momentum and zero dampening'."""
    expect_error(with_("group.0.optimizer", {"name": "sgd", "nesterov": True, "momentum": 0.0}), "nesterov")
    expect_error(
        with_("group.0.optimizer", {"name": "sgd", "nesterov": True, "momentum": 0.9, "dampening": 0.1}), "nesterov"
    )


@pytest.mark.parametrize("init", [{"seed": "0"}, {"seed": 1.5}, {"safetensors": 3}, {"seeds": 1}, "seed", {"seed": True}])
def test_bad_init(init: Any) -> None:
    expect_error(with_("group.0.init", init), "init")


def test_safetensors_template_must_format() -> None:
    """The worker formats the template with ``index`` and ``group`` only: any other field
    is a KeyError at worker start-up, so it must be a ConfigError at load."""
    expect_error(with_("group.0.init", {"safetensors": "w/{idx}.safetensors"}), "init.safetensors")


def test_batching_table() -> None:
    default = parse_config(base()).groups[0].batching
    assert (default.fuse, default.max_jobs, default.max_wait_ms) == (True, 64, 0.0)
    got = parse_config(with_("group.0.batching", {"fuse": False, "max_jobs": 8, "max_wait_ms": 2})).groups[0].batching
    assert (got.fuse, got.max_jobs, got.max_wait_ms) == (False, 8, 2.0)
    assert default.compile == ""
    for given, mode in ((True, "default"), (False, ""), ("reduce-overhead", "reduce-overhead")):
        assert parse_config(with_("group.0.batching", {"compile": given})).groups[0].batching.compile == mode


@pytest.mark.parametrize(
    ("batching", "key"),
    [("fast", "batching"), (3, "batching"), ({"fuse": "yes"}, "batching.fuse"), ({"max_jobs": 0}, "batching.max_jobs"),
     ({"max_jobs": 1.5}, "batching.max_jobs"), ({"max_wait_ms": -1}, "batching.max_wait_ms"),
     ({"max_wait_ms": 5000}, "batching.max_wait_ms"), ({"max_jobz": 4}, "batching.max_jobz"),
     ({"compile": "fastest"}, "batching.compile"), ({"compile": 1}, "batching.compile")],
)
def test_bad_batching(batching: Any, key: str) -> None:
    expect_error(with_("group.0.batching", batching), key)


def test_errors_name_the_group() -> None:
    raw = base()
    second = copy.deepcopy(raw["group"][0])
    second["name"] = "second"
    second["count"] = 0
    raw["group"].append(second)
    text = expect_error(raw, "count")
    assert re.search(r"second", text), text


@pytest.mark.parametrize("precision", ["bf16_mixed", "fp16", "BF16", ""])
def test_bad_precision(precision: str) -> None:
    expect_error(with_("group.0.precision", precision), "precision", repr(precision))


def test_command_line_overrides_are_checked_as_the_files_keys_are() -> None:
    config = parse_config(base())
    changed = override_coordinator(config, address="ipc:///tmp/x.sock", restore_run="123-0a1b2c3d")
    assert (changed.coordinator.address, changed.coordinator.restore_run) == ("ipc:///tmp/x.sock", "123-0a1b2c3d")
    assert changed.coordinator.workers == 2 and changed.groups == config.groups
    with pytest.raises(ConfigError, match="coordinator.address"):
        override_coordinator(config, address="localhost:5555")
    with pytest.raises(ConfigError, match="coordinator.restore_run"):
        override_coordinator(config, restore_run="../etc")
