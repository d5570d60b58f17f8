"""A cluster's blocks and each coordinator's config reproduce the models of one coordinator exactly (no Ray)."""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path

import pytest

from core.errors import ConfigError
from scheduler.cluster.layout import (
    Layout,
    coordinator_config,
    init_files,
    link_models,
    plan_layout,
    restore_files,
    toml_text,
)
from scheduler.config import parse_config


def raw_config(**groups: dict) -> dict:
    return {
        "coordinator": {"address": "tcp://127.0.0.1:5555", "workers": 2, "device": "cpu", "mps": "off"},
        "group": [
            {"name": name, "factory": "examples.models:mlp", "kwargs": {"d_in": 8, "hidden": 16, "d_out": 4},
             "input": {"shape": [-1, 8], "dtype": "float32"}, **group}
            for name, group in groups.items()
        ],
    }


def test_blocks_are_contiguous_even_and_rotate() -> None:
    raw = raw_config(a={"count": 6}, b={"count": 5}, c={"count": 5})
    layout = plan_layout(parse_config(raw), 2)
    assert layout.groups["a"].blocks == ((0, 0, 3), (1, 3, 3))
    assert layout.groups["b"].blocks == ((0, 0, 3), (1, 3, 2))
    assert layout.groups["c"].blocks == ((0, 0, 2), (1, 2, 3))  # the larger block moves on
    assert layout.blocks_of(1) == {"a": (3, 3), "b": (3, 2), "c": (2, 3)}
    assert layout.groups["b"].block_of(4) == (1, 1)
    assert layout.groups["a"].input_ndims == {"x": 2}
    assert Layout.from_dict(layout.as_dict()) == layout


def test_a_coordinator_without_models_is_refused() -> None:
    raw = raw_config(a={"count": 2}, b={"count": 1})
    assert plan_layout(parse_config(raw), 3).groups["b"].blocks == ((2, 0, 1),)  # the rotation fills the third
    with pytest.raises(ConfigError, match="coordinator 3 would hold no model; use at most 3 coordinators"):
        plan_layout(parse_config(raw), 4)


def test_each_block_config_builds_the_cluster_models_exactly() -> None:
    lrs = [0.1, 0.2, 0.3, 0.4, 0.5]
    raw = raw_config(m={"count": 5, "init": {"seed": 7},
                        "optimizer": {"name": "adam", "lr": lrs, "betas": [0.8, 0.9], "eps": 1e-6}})
    layout = plan_layout(parse_config(raw), 2)
    seen = {}
    for c in range(2):
        text = toml_text(coordinator_config(raw, layout, c, {"address": f"ipc:///tmp/x{c}.sock"}))
        config = parse_config(tomllib.loads(text))  # a valid config of its own
        (group,) = config.groups
        start, count = layout.blocks_of(c)["m"]
        assert group.count == count
        assert config.coordinator.address == f"ipc:///tmp/x{c}.sock"
        for local in range(count):
            # model `local` of the block is built after manual_seed(seed + local): the cluster's start + local
            seen[start + local] = (group.init_seed + local, group.hparams["lr"][local], group.hparams["beta1"][local])
    assert seen == {k: (7 + k, lrs[k], 0.8) for k in range(5)}


def test_safetensors_init_goes_through_links_named_by_the_block(tmp_path: Path) -> None:
    weights = tmp_path / "w" / "m"
    weights.mkdir(parents=True)
    for k in range(4):
        (weights / f"{k}.safetensors").write_text(f"model {k}")
    raw = raw_config(m={"count": 4, "init": {"safetensors": "w/{group}/{index}.safetensors"}})
    layout = plan_layout(parse_config(raw), 2)
    with pytest.raises(ConfigError, match="link them"):
        coordinator_config(raw, layout, 1, {})
    start, count = layout.blocks_of(1)["m"]
    files = init_files(raw["group"][0]["init"]["safetensors"], "m", start, count, str(tmp_path))
    init = link_models(tmp_path / "links", "m", files)
    block = coordinator_config(raw, layout, 1, {}, {"m": init})["group"][0]
    template = block["init"]["safetensors"]
    assert [Path(template.format(group="m", index=i)).read_text() for i in range(count)] == ["model 2", "model 3"]
    missing = init_files("w/{group}/{index}.safetensors", "m", 3, 2, str(tmp_path))
    with pytest.raises(ConfigError, match=f"{tmp_path}/w/m/4.safetensors does not exist"):
        link_models(tmp_path / "links2", "m", missing)


def test_restore_takes_the_newest_file_of_each_model_or_none(tmp_path: Path) -> None:
    own, cluster = tmp_path / "own", tmp_path / "snap"
    for d in (own / "m", cluster / "m"):
        d.mkdir(parents=True)
    now = time.time()

    def write(path: Path, age: float) -> None:
        path.write_text("x")
        os.utime(path, (now - age, now - age))

    write(own / "m" / "0.safetensors", 10)      # local 0 = cluster 3
    write(cluster / "m" / "3.safetensors", 5)   # newer
    write(own / "m" / "1.safetensors", 1)       # newer than the cluster's 4
    write(cluster / "m" / "4.safetensors", 20)
    chosen = restore_files("m", 3, 2, str(own), [str(cluster)], since=now - 100)
    assert chosen == {0: str(cluster / "m" / "3.safetensors"), 1: str(own / "m" / "1.safetensors")}
    assert restore_files("m", 3, 3, str(own), [str(cluster)], since=now - 100) is None  # model 5 has none
    assert restore_files("m", 3, 2, str(own), [str(cluster)], since=now - 3) is None  # former runs' files


def test_toml_text_round_trips() -> None:
    document = {"coordinator": {"address": "ipc:///tmp/a b.sock", "snapshot_interval_s": 0.5, "workers": 2},
                "group": [{"name": "g", "kwargs": {"x": [1, 2], "s": "é\"\\", "t": True, "n": {}},
                           "input": {"a": {"shape": [-1, 3], "dtype": "int64"}}}]}
    assert tomllib.loads(toml_text(document)) == document
