"""scheduler/stats.py (counters, rates, percentiles) and workers/losses.py (target checks)."""

from __future__ import annotations

import pytest
import torch

from core.errors import BadInput, ConfigError, JobFailed
from scheduler import stats as S
from workers.losses import check_target, resolve_loss

# --------------------------------------------------------------------------- stats


def test_percentile() -> None:
    assert S.percentile([], 0.5) == 0.0
    assert S.percentile([7.0], 0.0) == 7.0 and S.percentile([7.0], 0.99) == 7.0
    values = [float(v) for v in range(1, 101)]
    assert S.percentile(values, 0.0) == 1.0
    assert S.percentile(values, 1.0) == 100.0
    assert S.percentile(values, 0.5) in (50.0, 51.0)
    assert S.percentile(values, 0.99) == 99.0
    assert S.percentile(values, 0.9) == 90.0
    # Monotone in q, and always one of the values.
    qs = [i / 100 for i in range(101)]
    got = [S.percentile(values, q) for q in qs]
    assert got == sorted(got) and set(got) <= set(values)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_job_stats_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(S.time, "monotonic", clock)
    st = S.JobStats()
    for _ in range(5):
        st.record_submit()
    st.record_finish(["mlp/0"], 0.010, None)
    st.record_finish(["mlp/0", "mlp/1"], 0.020, None)
    st.record_finish(["mlp/1"], 0.030, "BadInput")
    st.record_finish(["cnn/0"], 0.040, "WorkerDied")
    st.record_finish(["cnn/0"], 0.050, "BadInput")
    assert (st.submitted, st.completed, st.failed) == (5, 2, 3)
    assert st.errors == {"BadInput": 2, "WorkerDied": 1}
    assert st.per_model == {"mlp/0": 2, "mlp/1": 2, "cnn/0": 2}
    lat = st.latency_ms()
    assert set(lat) == {"p50", "p90", "p99"}
    assert lat["p50"] == 30.0 and lat["p99"] == 50.0 and lat["p50"] <= lat["p90"] <= lat["p99"]
    summary = st.summary(uptime_s=100.0)
    assert summary["jobs"] == {"submitted": 5, "completed": 2, "failed": 3, "errors": {"BadInput": 2, "WorkerDied": 1},
                               "rejected": 0, "rejected_errors": {}}
    assert summary["jobs_per_s"] == 0.5  # 5 jobs over the 10 s window
    assert summary["latency_ms"] == lat


def test_jobs_per_s_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(S.time, "monotonic", clock)
    st = S.JobStats()
    for _ in range(20):
        st.record_finish(["m/0"], 0.001, None)
    assert st.jobs_per_s(uptime_s=2.0) == 10.0  # young coordinator: over its uptime
    assert st.jobs_per_s(uptime_s=50.0) == 2.0  # then over the window
    clock.now += S.RATE_WINDOW_S + 0.5
    assert st.jobs_per_s(uptime_s=60.0) == 0.0  # old finishes leave the window
    assert st.jobs_per_s(uptime_s=0.0) == 0.0


def test_latency_window_is_bounded() -> None:
    st = S.JobStats()
    for i in range(S.LATENCY_WINDOW + 50):
        st.record_finish(["m/0"], float(i), None)
    assert len(st.latencies) == S.LATENCY_WINDOW
    assert min(st.latencies) == 50.0
    assert st.completed == S.LATENCY_WINDOW + 50


def test_empty_stats() -> None:
    st = S.JobStats()
    assert st.latency_ms() == {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    assert st.summary(0.0)["jobs_per_s"] == 0.0


# --------------------------------------------------------------------------- losses


def logits(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


@pytest.mark.parametrize(
    ("output", "target"),
    [
        (logits(4, 10), torch.tensor([0, 9, 3, 3])),
        (logits(4, 10), torch.tensor([0, 9, 3, 3], dtype=torch.int32)),
        (logits(4, 10), torch.tensor([0, 9, 3, 3], dtype=torch.uint8)),
        (logits(4, 10), torch.softmax(logits(4, 10), -1)),
        (logits(2, 5, 7), torch.randint(0, 7, (2, 5))),  # language model [B, T, V]
        (logits(0, 10), torch.zeros(0, dtype=torch.int64)),
    ],
)
def test_cross_entropy_targets_good(output: torch.Tensor, target: torch.Tensor) -> None:
    check_target("cross_entropy", output, target)
    loss = resolve_loss("cross_entropy")(output, target)
    assert loss.dim() == 0


@pytest.mark.parametrize(
    ("output", "target", "words"),
    [
        (logits(4, 10), torch.tensor([0, 10, 3, 3]), ("10", "[0, 10)")),
        (logits(4, 10), torch.tensor([0, -1, 3, 3]), ("-1",)),
        (logits(4, 10), torch.tensor([0, 1, 3]), ("shape", "[4]")),
        (logits(4, 10), torch.zeros(4, 1, dtype=torch.int64), ("shape",)),
        (logits(4, 10), torch.zeros(4, 9), ("probabilities", "[4, 10]")),
        (logits(4, 10), torch.zeros(4, dtype=torch.bool), ("class indices", "torch.bool")),
        (logits(4, 10), torch.zeros(4, dtype=torch.complex64), ("class indices",)),
        ((logits(4, 10),), torch.zeros(4, dtype=torch.int64), ("one tensor", "tuple")),
        ({"y": logits(4, 10)}, torch.zeros(4, dtype=torch.int64), ("one tensor", "dict")),
    ],
)
def test_cross_entropy_targets_bad(output: object, target: torch.Tensor, words: tuple[str, ...]) -> None:
    with pytest.raises(BadInput) as info:
        check_target("cross_entropy", output, target)
    for w in words:
        assert w in str(info.value), f"{info.value!s} does not mention {w!r}"


def test_cross_entropy_on_a_scalar_output() -> None:
    """A model returning a 0-dim tensor has no class dim: BadInput, not IndexError."""
    with pytest.raises(BadInput):
        check_target("cross_entropy", torch.tensor(0.5), torch.tensor(0))


def test_mse_targets() -> None:
    check_target("mse", logits(4, 3), torch.zeros(4, 3))
    check_target("mse", logits(4, 3), torch.zeros(4, 3, dtype=torch.float16))
    for bad in (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4), torch.zeros(4, 3, 1), torch.zeros(3, 4)):
        with pytest.raises(BadInput, match="mse target"):
            check_target("mse", logits(4, 3), bad)
    assert resolve_loss("mse")(torch.ones(2, 2), torch.zeros(2, 2)).item() == 1.0


def test_custom_loss_is_not_checked_and_must_return_a_scalar() -> None:
    check_target("examples.models:mlp", (1, 2), torch.zeros(3))  # anything goes for a custom loss
    fn = resolve_loss("torch.nn.functional:l1_loss")
    assert fn(torch.ones(2), torch.zeros(2)).item() == 1.0
    per_element = resolve_loss("torch:sub")
    with pytest.raises(JobFailed, match="scalar"):
        per_element(torch.ones(2), torch.zeros(2))
    with pytest.raises(ConfigError, match="no_such"):
        resolve_loss("torch.nn.functional:no_such_loss")
