"""core/bank.py on the CPU (layout, named shared memory) and core/definition.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import torch

from core import bank as B
from core.definition import (
    STEPS,
    build_definition,
    build_module,
    example_inputs,
    hparam_name,
    import_object,
    state_name,
)
from core.errors import ConfigError
from core.spec import EntrySpec, GroupSpec
from core.tensors import DTYPES
from scheduler.config import parse_config

STEP = state_name("step", "w")

ENTRIES = [
    EntrySpec("w", "param", (3, 5), "float32"),
    EntrySpec("b", "param", (5,), "bfloat16"),
    EntrySpec("flag", "buffer", (), "bool"),
    EntrySpec("counts", "buffer", (7,), "int64"),
    EntrySpec("tiny", "param", (1,), "int8"),
    EntrySpec("none", "buffer", (0, 4), "float16"),
    EntrySpec(STEP, "state", (), "float32"),
    EntrySpec("optim.momentum.w", "state", (3, 5), "float32"),
]


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_layout_alignment_and_no_overlap(count: int) -> None:
    layout = B.bank_layout(ENTRIES, count)
    assert layout.count == count and list(layout.slots) == [e.name for e in ENTRIES]
    end = 0
    for e in ENTRIES:
        slot = layout.slots[e.name]
        numel = 1
        for d in e.shape:
            numel *= d
        assert slot.entry == e
        assert slot.nbytes == count * numel * DTYPES[e.dtype].itemsize
        assert slot.offset % B.ALIGN == 0, f"{e.name} at {slot.offset}"
        assert slot.offset >= end, f"{e.name} overlaps the entry before it"
        end = slot.offset + slot.nbytes
    assert layout.nbytes >= end and layout.nbytes % B.ALIGN == 0
    assert B.bank_layout(ENTRIES, count) == layout  # deterministic: worker and coordinator agree


def test_layout_of_nothing_is_not_empty() -> None:
    assert B.bank_layout([], 4).nbytes == B.ALIGN


# --------------------------------------------------------------------------- CPU banks in shared memory


@pytest.fixture()
def prefix() -> Iterator[str]:
    p = f"cohort-unit-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
    yield p
    for name in B.leftover_shm(p):  # whatever a failing test left behind
        B.unlink_shm(name)


def test_create_then_open_shares_memory(prefix: str) -> None:
    name = prefix + "mlp"
    owner = B.Bank.create("mlp", ENTRIES, 3, torch.device("cpu"), name)
    assert owner.handle == owner.handle.__class__("mlp", "shm", owner.layout.nbytes, 3, shm_name=name)
    assert owner.device.type == "cpu"
    assert B.leftover_shm(prefix) == [name]
    # Created zeroed, with every view of the right shape, dtype and alignment.
    for e in ENTRIES:
        t = owner.tensors[e.name]
        assert t.shape == (3, *e.shape) and t.dtype == DTYPES[e.dtype] and t.is_contiguous()
        assert t.data_ptr() % B.ALIGN == 0
        assert not t.any()
    with torch.no_grad():
        owner.tensors["w"][1] = torch.arange(15, dtype=torch.float32).reshape(3, 5)
        owner.tensors["b"][2].fill_(1.5)
        owner.tensors["counts"][0, 3] = 2**40
        owner.tensors["flag"][2] = True

    other = B.Bank.open(owner.handle, ENTRIES)
    assert not other.owner
    for e in ENTRIES:
        assert torch.equal(other.tensors[e.name], owner.tensors[e.name]), e.name
    # Writes either way are seen the other way: the same memory, not a copy.
    with torch.no_grad():
        other.tensors["optim.momentum.w"][0].fill_(-2.0)
        owner.tensors["tiny"][1] = 7
    assert owner.tensors["optim.momentum.w"][0].eq(-2.0).all()
    assert other.tensors["tiny"][1].item() == 7
    # Model k's parameter is the contiguous view bank[name][k].
    view = other.model_state(1)["w"]
    assert view.is_contiguous() and view.data_ptr() == other.tensors["w"].data_ptr() + 15 * 4

    other.close()
    assert B.leftover_shm(prefix) == [name]  # a reader's close removes nothing
    owner.close()
    assert B.leftover_shm(prefix) == []
    assert not os.path.exists(B.shm_dir() / name)


def test_roles_model_state_and_reset(prefix: str) -> None:
    bank = B.Bank.create("g", ENTRIES, 2, torch.device("cpu"), prefix + "g")
    try:
        assert list(bank.role("param")) == ["w", "b", "tiny"]
        assert list(bank.role("buffer")) == ["flag", "counts", "none"]
        assert list(bank.role("state")) == [STEP, "optim.momentum.w"]
        assert set(bank.model_state(0)) == {"w", "b", "tiny", "flag", "counts", "none"}
        for t in bank.tensors.values():
            t.fill_(1)
        bank.reset_optimizer_state(1)
        assert bank.tensors[STEP].tolist() == [1.0, 0.0]
        assert bank.tensors["optim.momentum.w"][0].eq(1).all() and not bank.tensors["optim.momentum.w"][1].any()
        assert bank.tensors["w"][1].eq(1).all()  # parameters untouched
    finally:
        bank.close()
    assert B.leftover_shm(prefix) == []


def test_open_refuses_a_mismatched_handle(prefix: str) -> None:
    bank = B.Bank.create("g", ENTRIES, 2, torch.device("cpu"), prefix + "g")
    try:
        wrong_count = bank.handle.__class__("g", "shm", bank.handle.nbytes, 200, shm_name=prefix + "g")
        with pytest.raises(ValueError, match="layout"):
            B.Bank.open(wrong_count, ENTRIES)
        missing = bank.handle.__class__("g", "shm", bank.handle.nbytes, 2, shm_name=prefix + "absent")
        with pytest.raises(FileNotFoundError):
            B.Bank.open(missing, ENTRIES)
        for bad in ("", "../etc", "a/b"):
            h = bank.handle.__class__("g", "shm", bank.handle.nbytes, 2, shm_name=bad)
            with pytest.raises(ValueError):
                B.Bank.open(h, ENTRIES)
        with pytest.raises(FileExistsError):  # never clobber a live bank
            B.Bank.create("g", ENTRIES, 2, torch.device("cpu"), prefix + "g")
    finally:
        bank.close()
    assert B.leftover_shm(prefix) == []


def test_close_twice_and_unlink_missing_are_harmless(prefix: str) -> None:
    bank = B.Bank.create("g", ENTRIES[:1], 1, torch.device("cpu"), prefix + "g")
    bank.close()
    bank.close()
    B.unlink_shm(prefix + "never-created")
    assert B.leftover_shm(prefix) == []


# --------------------------------------------------------------------------- definition


def group(**override: object):  # type: ignore[no-untyped-def]
    g = {
        "name": "mlp",
        "factory": "examples.models:mlp",
        "kwargs": {"d_in": 8, "hidden": 16, "d_out": 4},
        "count": 3,
        "input": {"shape": [-1, 8], "dtype": "float32"},
        "optimizer": {"name": "adam", "lr": [1e-3, 2e-3, 3e-3]},
    }
    g.update(override)
    return parse_config({"group": [g]}).groups[0]


def test_build_on_meta() -> None:
    module = build_module("examples.models:mlp", {"d_in": 8, "hidden": 16, "d_out": 4}, "meta")
    assert all(p.is_meta for p in module.parameters())
    x = example_inputs(group().inputs, True, 5, "meta")
    assert x.is_meta and x.shape == (5, 8)


def test_build_definition() -> None:
    spec = build_definition(group())
    assert isinstance(spec, GroupSpec)
    reference = build_module("examples.models:mlp", {"d_in": 8, "hidden": 16, "d_out": 4}, "cpu")
    params = [(e.name, e.shape, e.dtype) for e in spec.entries if e.role == "param"]
    assert params == [(n, tuple(p.shape), "float32") for n, p in reference.named_parameters()]
    state = [e.name for e in spec.entries if e.role == "state"]
    assert state[0] == STEPS  # the model's step count, which a schedule follows
    assert state[1:len(params) + 1] == [state_name("step", n) for n, _, _ in params] and len(state) == 3 * len(params) + 1
    hparams = {e.name: (e.shape, e.dtype) for e in spec.entries if e.role == "hparam"}
    assert hparams == {hparam_name(hp): ((), "float64") for hp in spec.hparams}  # in the bank: restored with it
    assert spec.indices == [0, 1, 2] and spec.optimizer == "adam"
    assert spec.hparams["lr"] == [1e-3, 2e-3, 3e-3]
    assert spec.init_seed == 0 and spec.loss == "cross_entropy"
    # The layout derived from it fits a bank.
    layout = B.bank_layout(spec.entries, 3)
    assert all(s.offset % B.ALIGN == 0 for s in layout.slots.values())


def test_definition_with_buffers_and_named_inputs() -> None:
    spec = build_definition(group(
        name="lm", factory="examples.models:tiny_transformer",
        kwargs={"vocab": 16, "d_model": 8, "heads": 2, "layers": 1, "seq_len": 4},
        input={"shape": [-1, 4], "dtype": "int64"}, optimizer={"name": "sgd"},
    ))
    assert any(e.name == "position" for e in spec.entries)


@pytest.mark.parametrize(
    "override",
    [
        {"input": {"shape": [-1, 7], "dtype": "float32"}},  # wrong feature size
        {"input": {"shape": [-1, 8, 2], "dtype": "float32"}},  # wrong rank
        {"input": {"a": {"shape": [-1, 8]}, "b": {"shape": [-1, 8]}}},  # named inputs mlp does not take
    ],
)
def test_wrong_input_spec_is_a_config_error(override: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        build_definition(group(**override))
    text = str(info.value)
    assert "group 'mlp'" in text and "input" in text


@pytest.mark.parametrize(
    ("factory", "kwargs", "words"),
    [
        ("no_such_module_xyz:f", {}, ("cannot import", "no_such_module_xyz")),
        ("examples.models:no_such", {}, ("no_such",)),
        ("examples.models:mlp", {"bogus": 1}, ("bogus",)),
        ("collections:OrderedDict", {}, ("not an nn.Module",)),
        ("torch.nn:Identity", {}, ("no parameters",)),
    ],
)
def test_bad_factory_is_a_config_error(factory: str, kwargs: dict[str, object], words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        build_definition(group(factory=factory, kwargs=kwargs))
    text = str(info.value)
    assert "group 'mlp'" in text
    for w in words:
        assert w in text, f"{text!r} does not mention {w!r}"


def test_custom_loss_is_imported_at_definition() -> None:
    assert build_definition(group(loss="torch.nn.functional:l1_loss")).loss == "torch.nn.functional:l1_loss"
    with pytest.raises(ConfigError, match="loss"):
        build_definition(group(loss="torch.nn.functional:no_such_loss"))


def test_import_object() -> None:
    assert import_object("torch.nn:Linear", "x") is torch.nn.Linear
    assert import_object("torch:nn.Linear", "x") is torch.nn.Linear
    with pytest.raises(ConfigError, match="factory 'torch:nope'"):
        import_object("torch:nope", "factory")


@pytest.mark.parametrize("prefix", ["", "torch_", "*"])
def test_leftover_shm_never_takes_a_prefix_that_is_not_cohorts(prefix: str) -> None:
    with pytest.raises(ValueError):
        B.leftover_shm(prefix)
