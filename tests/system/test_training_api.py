"""The training calls of a sweep or PBT through a real coordinator: shared batches, evaluation,
run-time hyperparameters ordered with jobs, new trials, precision, and the errors for bad input."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from cohort_harness import mlp_group, stop_and_check_clean
from torch import nn

from examples.models import mlp
from scheduler import BadInput, ConfigError, UnknownModel

K = 4
LRS = [0.05, 0.1, 0.2, 0.4]


def reference(k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed + k)
    return mlp(d_in=8, hidden=16, d_out=4)


def test_a_sweep_on_shared_batches_with_a_schedule_equals_plain_pytorch(cohort) -> None:
    schedule = {"name": "cosine", "total_steps": 10, "min_lr": 0.001}
    running = cohort([mlp_group("s", K, optimizer={"name": "sgd", "lr": LRS, "momentum": 0.9}, schedule=schedule)],
                     workers=2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(8)]
    models = [reference(k) for k in range(K)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, lr in zip(models, LRS)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.001) for o in opts]
    with running.client(timeout=60) as c:
        for step, (x, t) in enumerate(batches):
            got = c.train_round("s", x, t)  # one batch, sent once, for every model
            want = []
            for m, o, s in zip(models, opts, scheds):
                o.zero_grad()
                loss = nn.functional.cross_entropy(m(x), t)
                loss.backward()
                o.step()
                s.step()
                want.append(loss.item())
            assert got == pytest.approx(want, abs=1e-4), f"step {step}"
        x, t = batches[0]
        evaluated = c.evaluate("s", x, t)
        with torch.no_grad():
            want = [nn.functional.cross_entropy(m.eval()(x), t).item() for m in models]
        assert evaluated == pytest.approx(want, abs=1e-4)
        assert c.evaluate("s/2", x, t) == pytest.approx(want[2], abs=1e-4)
        stacked = c.evaluate("s", torch.stack([x] * K), torch.stack([t] * K))
        assert stacked == pytest.approx(want, abs=1e-4)
        hp = c.get_hparams("s/3")
        assert hp["lr"] == pytest.approx(0.4) and hp["step"] == 8 and hp["momentum"] == pytest.approx(0.9)
    assert stop_and_check_clean(running) == 0


def test_precision_through_a_coordinator_follows_plain_pytorch(cohort) -> None:
    """``bf16-mixed``: float32 weights, forward and loss under bf16 autocast, as plain PyTorch does it;
    ``bf16``: weights stored in bfloat16 (bf16 inputs welcome), optimizer arithmetic as torch.optim's."""
    mixed = mlp_group("mx", K, optimizer={"name": "adam", "lr": 0.01}, precision="bf16-mixed")
    half = mlp_group("hf", K, optimizer={"name": "adam", "lr": 0.01}, precision="bf16",
                     input={"shape": [-1, 8], "dtype": "bfloat16"})
    running = cohort([mixed, half], workers=2)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(5)]
    autocast_models = [reference(k) for k in range(K)]
    autocast_opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in autocast_models]
    half_models = [reference(k).to(torch.bfloat16) for k in range(K)]
    half_opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in half_models]
    with running.client(timeout=60) as c:
        for step, (x, t) in enumerate(batches):
            want_mixed, want_half = [], []
            for m, o in zip(autocast_models, autocast_opts):
                o.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(m(x), t)
                loss.backward()
                o.step()
                want_mixed.append(loss.item())
            for m, o in zip(half_models, half_opts):
                o.zero_grad()
                loss = nn.functional.cross_entropy(m(x.bfloat16()), t)
                loss.backward()
                o.step()
                want_half.append(loss.item())
            assert c.train_round("mx", x, t) == pytest.approx(want_mixed, rel=2e-2, abs=2e-2), f"bf16-mixed step {step}"
            assert c.train_round("hf", x.bfloat16(), t) == pytest.approx(want_half, rel=3e-2, abs=3e-2), f"bf16 step {step}"
        weights = c.get_weights("mx/1")
        assert all(v.dtype == torch.float32 for v in weights.values()), "bf16-mixed keeps float32 weights"
        for name, value in c.get_weights("hf/2").items():
            assert value.dtype == torch.bfloat16, name
            torch.testing.assert_close(value, half_models[2].state_dict()[name], atol=3e-2, rtol=3e-2, msg=name)
        for name, value in weights.items():
            torch.testing.assert_close(value, autocast_models[1].state_dict()[name], atol=2e-2, rtol=2e-2, msg=name)
    assert stop_and_check_clean(running) == 0


def test_set_hparams_is_ordered_with_the_models_jobs_and_survives_a_replacement(cohort) -> None:
    running = cohort([mlp_group("p", K, optimizer={"name": "sgd", "lr": 0.1})], workers=1, heartbeat_timeout_s=5)
    x, t = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with running.client(timeout=60) as c:
        first = [c.submit("train_step", "p/1", x, t) for _ in range(3)]
        c.set_hparams("p/1", lr=0.0)  # queued behind the three steps, ahead of the next ones
        later = [c.submit("train_step", "p/1", x, t) for _ in range(3)]
        for f in first + later:
            f.result(timeout=30)
        frozen = c.get_weights("p/1")
        c.train_step("p/1", x, t)
        assert all(torch.equal(frozen[k], v) for k, v in c.get_weights("p/1").items()), "lr 0 still moved the model"
        assert c.get_hparams("p/1") == pytest.approx({**c.get_hparams("p/1"), "lr": 0.0, "step": 7})
        c.set_hparams("p", lr=[0.01, 0.02, 0.03, 0.04], momentum=0.5)
        c.barrier()  # the host copies now hold the new hyperparameters
        pid = c.stats()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (c.stats()["workers"][0]["restarts"] == 1 and c.stats()["workers"][0]["state"] == "ready"):
            assert time.monotonic() < deadline, "no replacement"
            time.sleep(0.2)
        assert [c.get_hparams(f"p/{k}")["lr"] for k in range(K)] == pytest.approx([0.01, 0.02, 0.03, 0.04])
        assert c.get_hparams("p/2")["momentum"] == pytest.approx(0.5)
    assert stop_and_check_clean(running) == 0


def test_exploit_and_reset_as_pbt_and_asha_use_them(cohort) -> None:
    running = cohort([mlp_group("q", K, optimizer={"name": "adam", "lr": 0.01})], workers=2)
    x, t = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with running.client(timeout=60) as c:
        for _ in range(3):
            c.train_round("q", x, t)
        c.copy_weights("q/0", "q/3")  # exploit: the best onto the worst, across workers
        c.set_hparams("q/3", lr=0.005)  # explore
        assert c.get_hparams("q/3")["lr"] == pytest.approx(0.005) and c.get_hparams("q/0")["lr"] == pytest.approx(0.01)
        versions = {m.id: m.version for m in c.models()}
        c.reset("q/1", seed=42)  # a new trial in the slot
        torch.manual_seed(42)
        fresh = mlp(d_in=8, hidden=16, d_out=4)
        got = c.get_weights("q/1")
        assert all(torch.equal(got[k], v) for k, v in fresh.state_dict().items())
        assert c.get_hparams("q/1")["step"] == 0
        assert {m.id: m.version for m in c.models()}["q/1"] == versions["q/1"] + 1
    assert stop_and_check_clean(running) == 0


def test_bad_training_input_gets_a_clear_typed_error(cohort) -> None:
    running = cohort([mlp_group("b", K)], workers=1)
    x, t = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with running.client(timeout=30) as c:
        with pytest.raises(BadInput, match="not a sgd setting"):
            c.set_hparams("b/0", learning_rate=0.1)
        with pytest.raises(BadInput, match="give one, or one per model"):
            c.set_hparams("b", lr=[0.1, 0.2])
        with pytest.raises(BadInput, match="out of range"):
            c.set_hparams("b/1", lr=-1.0)
        with pytest.raises(BadInput, match="not finite"):
            c.set_hparams("b/1", lr=float("nan"))
        with pytest.raises(BadInput, match="dtype must be float32"):
            c.train_round("b", x.bfloat16(), t)
        with pytest.raises(BadInput, match="stacked"):
            c.train_round("b", torch.stack([x] * K), t)  # stacked inputs, shared targets
        with pytest.raises(BadInput, match="needs targets"):
            c.evaluate("b", x, None)
        with pytest.raises(UnknownModel):
            c.get_hparams("b/9")
        assert c.train_round("b", x, t) and c.stats()["workers"][0]["restarts"] == 0
    assert stop_and_check_clean(running) == 0


@pytest.mark.parametrize(("schedule", "key"), [
    ({"name": "cosine", "total_steps": 0}, "schedule.total_steps"),
    ({"name": "cosine", "total_steps": 10, "warmup_steps": 10}, "schedule.warmup_steps"),
    ({"name": "step", "step_size": 2, "gamma": 1.5}, "schedule.gamma"),
    ({"name": "exponential"}, "schedule.name"),
    ({"name": "step", "total_steps": 5}, "schedule.total_steps"),
])
def test_a_schedule_with_impossible_values_fails_start_up_naming_the_key(tmp_path, schedule, key) -> None:
    from scheduler.config import parse_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"group": [mlp_group("s", 2, schedule=schedule)]})
