"""scheduler/validate.py: jobs checked on their headers before they are queued."""

from __future__ import annotations

import pytest
import torch

from core.errors import BadInput, UnknownModel
from core.messages import JOB_OPS
from core.spec import GroupSpec, InputSpec
from core.tensors import NO_TENSORS, TensorMeta, TensorTree, encode_tensors
from scheduler.validate import check_inputs, check_op, check_targets, parse_group, parse_model


def spec(name: str, inputs: list[InputSpec], single: bool, count: int = 4) -> GroupSpec:
    return GroupSpec(
        name=name, factory="examples.models:mlp", kwargs={}, inputs=inputs, single_input=single, entries=[],
        loss="cross_entropy", optimizer="sgd", hparams={}, indices=list(range(count)),
    )


MLP = spec("mlp", [InputSpec("x", (-1, 8), "float32")], True)
LM = spec("lm", [InputSpec("tokens", (-1, 16), "int64"), InputSpec("mask", (-1, 16), "bool")], False, count=2)
FIXED = spec("fixed", [InputSpec("x", (3, 8), "float32")], True, count=1)
GROUPS = {"mlp": MLP, "lm": LM, "fixed": FIXED}


def tree(value: object) -> TensorTree:
    return encode_tensors(value)[0]


def meta_tree(*shapes: tuple[int, ...], dtype: str = "float32") -> TensorTree:
    return TensorTree("tensor", tuple(TensorMeta(dtype, s) for s in shapes))


def raises(exc: type[Exception], *words: str):  # type: ignore[no-untyped-def]
    class Ctx:
        def __enter__(self) -> None:
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()

        def __exit__(self, *a: object) -> bool:
            handled = self.ctx.__exit__(*a)
            text = str(self.info.value)
            for w in words:
                assert w in text, f"{text!r} does not mention {w!r}"
            return bool(handled)

    return Ctx()


# --------------------------------------------------------------------------- ops and ids


@pytest.mark.parametrize("op", JOB_OPS)
def test_check_op_good(op: str) -> None:
    check_op(op)


@pytest.mark.parametrize("op", ["", "Infer", "train", "get_weights", "infer "])
def test_check_op_bad(op: str) -> None:
    with raises(BadInput, repr(op), "infer"):
        check_op(op)


def test_parse_model_good() -> None:
    assert parse_model("mlp/0", GROUPS) == ("mlp", 0)
    assert parse_model("mlp/3", GROUPS) == ("mlp", 3)
    assert parse_model("lm/1", GROUPS) == ("lm", 1)


@pytest.mark.parametrize(
    ("model", "word"),
    [("mlp", "<group>/<index>"), ("mlp/4", "0..3"), ("mlp/-1", "'mlp/-1'"), ("nope/0", "'nope'"),
     ("mlp/x", "'mlp/x'"), ("mlp/", "'mlp/'"), ("/0", "''"), ("mlp/1.0", "'mlp/1.0'"), ("mlp/ 1", "'mlp/ 1'")],
)
def test_parse_model_bad(model: str, word: str) -> None:
    with raises(UnknownModel, word):
        parse_model(model, GROUPS)


@pytest.mark.parametrize("model", ["mlp/\u00b2", "mlp/\u2460", "mlp/\u0661"])
def test_parse_model_unicode_digits(model: str) -> None:
    """``str.isdigit`` is true for '²' and '①', which ``int`` rejects (ValueError), and for
    Arabic-Indic '١', which ``int`` reads as 1: none of them is a model index."""
    with pytest.raises(UnknownModel):
        parse_model(model, GROUPS)


def test_parse_group() -> None:
    assert parse_group("mlp", GROUPS) is MLP
    assert parse_group("mlp/", GROUPS) is MLP
    with raises(UnknownModel, "not a model id"):
        parse_group("mlp/3", GROUPS)
    with raises(UnknownModel, "'nope'", "mlp"):
        parse_group("nope", GROUPS)


# --------------------------------------------------------------------------- inputs


def test_single_input_good() -> None:
    assert check_inputs(MLP, tree(torch.zeros(5, 8)), None) == 5
    assert check_inputs(MLP, tree(torch.zeros(4, 7, 8)), 4) == 7  # stacked for a training round
    assert check_inputs(FIXED, tree(torch.zeros(3, 8)), None) == 1  # no batch dim in the spec


@pytest.mark.parametrize(
    ("given", "stacked", "words"),
    [
        (torch.zeros(5, 8, dtype=torch.float64), None, ("dtype", "float32", "float64")),
        (torch.zeros(5, 9), None, ("shape", "[5, 9]")),
        (torch.zeros(8), None, ("shape", "[8]")),
        (torch.zeros(5, 8, 1), None, ("shape",)),
        (torch.zeros(()), None, ("shape",)),
        (torch.zeros(0, 8), None, ("empty",)),
        (torch.zeros(3, 5, 8), 4, ("K=4", "[3, 5, 8]")),
        (torch.zeros(5, 8), 4, ("K=4",)),
        (torch.zeros(4, 5, 9), 4, ("shape", "[5, 9]")),
        (torch.zeros(4, 0, 8), 4, ("empty",)),
    ],
)
def test_single_input_bad(given: torch.Tensor, stacked: int | None, words: tuple[str, ...]) -> None:
    with raises(BadInput, *words):
        check_inputs(MLP, tree(given), stacked)


@pytest.mark.parametrize("layout", ["dict", "tuple", "none"])
def test_single_input_wrong_layout(layout: str) -> None:
    value = {"dict": {"x": torch.zeros(2, 8)}, "tuple": (torch.zeros(2, 8),), "none": None}[layout]
    with raises(BadInput, "'mlp'", "one tensor", layout):
        check_inputs(MLP, tree(value), None)


def lm_inputs(b: int = 2, t: int = 16, **override: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"tokens": torch.zeros(b, t, dtype=torch.int64), "mask": torch.zeros(b, t, dtype=torch.bool), **override}


def test_named_inputs_good() -> None:
    assert check_inputs(LM, tree(lm_inputs(3)), None) == 3
    assert check_inputs(LM, tree({"mask": torch.zeros(3, 16, dtype=torch.bool), "tokens": torch.zeros(3, 16, dtype=torch.int64)}), None) == 3
    stacked = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in lm_inputs(3).items()}
    assert check_inputs(LM, tree(stacked), 2) == 3


def test_named_inputs_bad() -> None:
    with raises(BadInput, "missing input 'mask'"):
        check_inputs(LM, tree({"tokens": torch.zeros(2, 16, dtype=torch.int64)}), None)
    with raises(BadInput, "unexpected input 'extra'"):
        check_inputs(LM, tree(lm_inputs(extra=torch.zeros(2))), None)
    with raises(BadInput, "'mask'", "dtype", "bool"):
        check_inputs(LM, tree(lm_inputs(mask=torch.zeros(2, 16))), None)
    with raises(BadInput, "'tokens'", "shape"):
        check_inputs(LM, tree(lm_inputs(tokens=torch.zeros(2, 15, dtype=torch.int64))), None)
    with raises(BadInput, "batch size", "2", "3"):
        check_inputs(LM, tree(lm_inputs(mask=torch.zeros(3, 16, dtype=torch.bool))), None)
    with raises(BadInput, "dict of tensors", "tokens"):
        check_inputs(LM, tree(torch.zeros(2, 16, dtype=torch.int64)), None)


# --------------------------------------------------------------------------- targets


def test_targets_good() -> None:
    check_targets("infer", NO_TENSORS, 5, None)
    check_targets("ensemble", NO_TENSORS, 5, None)
    check_targets("train_step", meta_tree((5,), dtype="int64"), 5, None)
    check_targets("train_step", meta_tree((5, 10)), 5, None)
    check_targets("train_round", meta_tree((4, 5), dtype="int64"), 5, 4)
    check_targets("train_round", meta_tree((4, 5, 3)), 5, 4)


@pytest.mark.parametrize(
    ("op", "targets", "batch", "stacked", "words"),
    [
        ("infer", meta_tree((5,)), 5, None, ("infer", "no target")),
        ("ensemble", meta_tree((5,)), 5, None, ("ensemble", "no target")),
        ("train_step", NO_TENSORS, 5, None, ("train_step", "target")),
        ("train_step", tree((torch.zeros(5), torch.zeros(5))), 5, None, ("one target",)),
        ("train_step", tree({"y": torch.zeros(5)}), 5, None, ("one target",)),
        ("train_step", meta_tree((4,)), 5, None, ("batch size", "5", "[4]")),
        ("train_step", meta_tree(()), 5, None, ("batch size",)),
        ("train_round", meta_tree((4,)), 5, 4, ("K=4", "B=5")),
        ("train_round", meta_tree((3, 5)), 5, 4, ("K=4",)),
        ("train_round", meta_tree((4, 6)), 5, 4, ("B=5", "[4, 6]")),
        ("train_round", NO_TENSORS, 5, 4, ("train_round",)),
    ],
)
def test_targets_bad(op: str, targets: TensorTree, batch: int, stacked: int | None, words: tuple[str, ...]) -> None:
    with raises(BadInput, *words):
        check_targets(op, targets, batch, stacked)
