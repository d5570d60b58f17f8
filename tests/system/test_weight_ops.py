"""Weights in and out as jobs in the workers' queues: ordered with training, optimizer state included."""

from __future__ import annotations

import torch
from cohort_harness import mlp_group, stop_and_check_clean

from scheduler import BadInput


def test_weights_with_optimizer_state_move_a_model_exactly(cohort) -> None:
    """get_weights(optimizer_state=True) then set_weights(..., optimizer_state=True) onto another model:
    from then on both train identically (Adam's moments and step counts came along)."""
    running = cohort([mlp_group("m", 4, optimizer={"name": "adam", "lr": 0.01})], workers=2)
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    with running.client(timeout=60) as c:
        for _ in range(3):
            c.train_step("m/0", x, t)
        full = c.get_weights("m/0", optimizer_state=True)
        assert any(name.startswith("optim.exp_avg.") for name in full)
        assert set(c.get_weights("m/0")) < set(full)
        c.set_weights("m/3", full, optimizer_state=True)  # m/3 is on the other worker
        losses = [(c.train_step("m/0", x, t), c.train_step("m/3", x, t)) for _ in range(3)]
        assert all(a == b for a, b in losses), losses
        a, b = c.get_weights("m/0", optimizer_state=True), c.get_weights("m/3", optimizer_state=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
        # Only the weights: the optimizer starts afresh, so the next steps differ.
        c.set_weights("m/2", c.get_weights("m/0"))
        assert c.train_step("m/2", x, t) == c.train_step("m/0", x, t)  # a step's loss comes before its update
        assert c.train_step("m/2", x, t) != c.train_step("m/0", x, t)
        missing = {k: v for k, v in full.items() if not k.startswith("optim.exp_avg_sq.")}
        try:
            c.set_weights("m/1", missing, optimizer_state=True)
            raise AssertionError("a partial optimizer state was accepted")
        except BadInput as exc:
            assert "missing" in str(exc)
    assert stop_and_check_clean(running) == 0


def test_a_weight_read_sees_exactly_the_jobs_accepted_before_it(cohort) -> None:
    """No barrier needed: the read is queued behind the steps submitted before it, ahead of those after."""
    running = cohort([mlp_group("m", 2, optimizer={"name": "sgd", "lr": 0.5})], workers=1)
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    with running.client(timeout=60) as c:
        start = c.get_weights("m/1")
        before = [c.submit("train_step", "m/1", x, t) for _ in range(5)]
        read = c.get_weights("m/1")
        after = [c.submit("train_step", "m/1", x, t) for _ in range(5)]
        for f in before + after:
            f.result(timeout=30)
        c.set_weights("m/0", start)
        for _ in range(5):
            c.train_step("m/0", x, t)
        want = c.get_weights("m/0")
        assert all(torch.equal(read[k], want[k]) for k in want)
    assert stop_and_check_clean(running) == 0
