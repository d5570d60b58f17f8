"""Training through cohort ends where plain in-process PyTorch ends (CPU, within 1e-5)."""

from __future__ import annotations

import torch
from cohort_harness import mlp_group
from torch import nn

from examples.models import mlp

K = 3
STEPS = 12
LRS = [0.2, 0.1, 0.05]


def reference_models(seed: int) -> list[nn.Module]:
    models = []
    for index in range(K):
        torch.manual_seed(seed + index)
        models.append(mlp(d_in=8, hidden=16, d_out=4))
    return models


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(STEPS)]


def plain_training(models: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                   data: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[list[float]]:
    curves = []
    for model, opt, batches_k in zip(models, optimizers, data):
        curve = []
        for x, t in batches_k:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    return curves


def assert_weights_equal(client, group: str, models: list[nn.Module], atol: float = 1e-5) -> None:
    for index, model in enumerate(models):
        got = client.get_weights(f"{group}/{index}")
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=f"{group}/{index} {name}")


def accuracy(logits: torch.Tensor, t: torch.Tensor) -> float:
    return (logits.argmax(-1) == t).float().mean().item()


def test_train_step_matches_plain_pytorch_sgd_and_adam(cohort) -> None:
    groups = [
        mlp_group("sgd", K, optimizer={"name": "sgd", "lr": LRS, "momentum": 0.9, "weight_decay": 1e-4},
                  init={"seed": 10}),
        mlp_group("adam", K, optimizer={"name": "adam", "lr": [1e-2, 3e-3, 1e-3]}, init={"seed": 20}),
    ]
    running = cohort(groups, workers=2)
    data = [batches(100 + k) for k in range(K)]
    sgd_models, adam_models = reference_models(10), reference_models(20)
    sgd_opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4) for m, lr in zip(sgd_models, LRS)]
    adam_opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(adam_models, [1e-2, 3e-3, 1e-3])]
    want_sgd = plain_training(sgd_models, sgd_opts, data)
    want_adam = plain_training(adam_models, adam_opts, data)

    with running.client(timeout=30) as c:
        for group, want in (("sgd", want_sgd), ("adam", want_adam)):
            got = [[c.train_step(f"{group}/{k}", x, t) for x, t in data[k]] for k in range(K)]
            for k in range(K):
                assert got[k] == pytest_approx(want[k]), f"{group}/{k} loss curve"
        assert_weights_equal(c, "sgd", sgd_models)
        assert_weights_equal(c, "adam", adam_models)
        x_eval, t_eval = batches(999)[0]
        for k in range(K):
            got_logits = c.infer(f"sgd/{k}", x_eval)
            with torch.no_grad():
                want_logits = sgd_models[k](x_eval)
            torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
            assert accuracy(got_logits, t_eval) == accuracy(want_logits, t_eval)
        versions = {m.id: m.version for m in c.models()}
        assert versions["sgd/0"] == STEPS and versions["adam/2"] == STEPS


def pytest_approx(values: list[float]):
    import pytest

    return pytest.approx(values, abs=1e-5, rel=0)


def test_train_round_matches_per_model_steps(cohort) -> None:
    running = cohort([mlp_group("m", K, optimizer={"name": "adamw", "lr": [1e-2, 5e-3, 1e-3], "weight_decay": 0.05},
                                init={"seed": 30})], workers=2)
    data = [batches(200 + k) for k in range(K)]
    models = reference_models(30)
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05) for m, lr in zip(models, [1e-2, 5e-3, 1e-3])]
    want = plain_training(models, opts, data)
    with running.client(timeout=30) as c:
        rounds = []
        for step in range(STEPS):
            xs = torch.stack([data[k][step][0] for k in range(K)])
            ts = torch.stack([data[k][step][1] for k in range(K)])
            rounds.append(c.train_round("m", xs, ts))
        for k in range(K):
            assert [r[k] for r in rounds] == pytest_approx(want[k])
        assert_weights_equal(c, "m", models)


def test_ensemble_equals_stacked_per_model_outputs(cohort) -> None:
    running = cohort([mlp_group("e", 5, init={"seed": 3})], workers=2)
    x = torch.randn(7, 8)
    with running.client(timeout=30) as c:
        ys = c.ensemble("e", x)
        assert ys.shape == (5, 7, 4)
        per_model = torch.stack([c.infer(f"e/{k}", x) for k in range(5)])
        torch.testing.assert_close(ys, per_model, atol=1e-5, rtol=0)
        torch.manual_seed(3 + 4)
        reference = mlp(d_in=8, hidden=16, d_out=4)
        with torch.no_grad():
            torch.testing.assert_close(ys[4], reference(x), atol=1e-5, rtol=0)


def test_snapshot_reloads_to_the_same_weights(cohort, tmp_path) -> None:
    running = cohort([mlp_group("s", K, init={"seed": 5})])
    x, t = batches(7)[0]
    with running.client(timeout=30) as c:
        for k in range(K):
            c.train_step(f"s/{k}", x, t)
        c.snapshot(tmp_path / "ckpt")
        before = {k: c.get_weights(f"s/{k}") for k in range(K)}
    files = sorted(p.name for p in (tmp_path / "ckpt" / "s").iterdir())
    assert files == [f"{k}.safetensors" for k in range(K)]
    reloaded = cohort([mlp_group("s", K, init={"safetensors": str(tmp_path / "ckpt" / "s" / "{index}.safetensors")})])
    with reloaded.client(timeout=30) as c:
        for k in range(K):
            after = c.get_weights(f"s/{k}")
            assert after.keys() == before[k].keys()
            for name in after:
                assert torch.equal(after[name], before[k][name]), name


def test_set_and_copy_weights(cohort) -> None:
    running = cohort([mlp_group("w", 3, init={"seed": 1})], workers=2)
    x = torch.randn(4, 8)
    with running.client(timeout=30) as c:
        w0 = c.get_weights("w/0")
        zeroed = {k: torch.zeros_like(v) for k, v in w0.items()}
        c.set_weights("w/2", zeroed)
        assert torch.count_nonzero(c.infer("w/2", x)) == 0
        c.copy_weights(src="w/0", dst="w/2")
        torch.testing.assert_close(c.infer("w/2", x), c.infer("w/0", x), atol=0, rtol=0)
