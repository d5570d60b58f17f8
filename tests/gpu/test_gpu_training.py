"""Fused training rounds on CUDA (K at the fusion threshold and above) along torch.optim's curves,
for SGD, Adam and AdamW, in float32 and bfloat16, and under bf16 autocast (precision = "bf16-mixed")."""

from __future__ import annotations

import time

import pytest
import torch
from cohort_harness import mlp_group
from torch import nn

from examples.models import mlp

pytestmark = pytest.mark.gpu

K = 4  # a group's fused rounds are compared with torch.optim (batching.plan = "vmap" pins them)
OPTIMIZERS = {
    "sgd": ({"name": "sgd", "lr": [0.05, 0.1, 0.2, 0.3], "momentum": 0.9},
            lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
    "adam": ({"name": "adam", "lr": [1e-3, 3e-3, 1e-2, 3e-2]}, lambda p, lr: torch.optim.Adam(p, lr=lr)),
    "adamw": ({"name": "adamw", "lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": 0.1},
              lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1)),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_rounds_follow_torch_optim(gpu_cohort, name: str, dtype: str) -> None:
    table, make_optimizer = OPTIMIZERS[name]
    bf16 = dtype == "bfloat16"
    factory = "fixture_models:mlp_bf16" if bf16 else "examples.models:mlp"
    group = mlp_group("m", K, factory=factory, optimizer=table, init={"seed": 3},
                      input={"shape": [-1, 8], "dtype": dtype}, batching={"plan": "vmap"})
    running = gpu_cohort([group], mps="off", workers=1)
    torch_dtype = getattr(torch, dtype)
    models, opts = [], []
    for k in range(K):
        torch.manual_seed(3 + k)
        model = mlp(d_in=8, hidden=16, d_out=4).to(torch_dtype).cuda()
        models.append(model)
        opts.append(make_optimizer(model.parameters(), table["lr"][k]))
    g = torch.Generator().manual_seed(0)
    tolerance = dict(rel=3e-2, abs=3e-2) if bf16 else dict(rel=1e-4, abs=1e-5)
    with running.client(timeout=120) as c:
        for step in range(30):
            x = torch.randn(16, 8, generator=g).to(torch_dtype)
            t = torch.randint(0, 4, (16,), generator=g)
            got = c.train_round("m", torch.stack([x] * K), torch.stack([t] * K))
            want = []
            for model, opt in zip(models, opts):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x.cuda()), t.cuda())
                loss.backward()
                opt.step()
                want.append(loss.item())
            assert got == pytest.approx(want, **tolerance), f"step {step}"
        worker = c.stats()["workers"][0]
    assert worker["eager_calls"] >= 30, worker  # every round went through the fused (vmap) path


def test_plans_are_measured_on_the_device_and_results_do_not_change(gpu_cohort) -> None:
    """On a GPU the workers time their candidates with the device synchronised around the call,
    report them, and whatever they choose gives the per-model results."""
    running = gpu_cohort([mlp_group("p", 8, init={"seed": 0})], mps="off", workers=1)
    models = []
    for k in range(8):
        torch.manual_seed(k)
        models.append(mlp(d_in=8, hidden=16, d_out=4).cuda().eval())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 8, generator=g) for _ in range(2000)]
    with running.client(timeout=120) as c:
        futures = [c.submit("infer", f"p/{j % 8}", x) for j, x in enumerate(xs)]
        for j, f in enumerate(futures):
            with torch.no_grad():
                torch.testing.assert_close(f.result(), models[j % 8](xs[j].cuda()).cpu(), atol=1e-4, rtol=1e-4)
        time.sleep(0.6)
        worker = c.stats()["workers"][0]
    [plan] = [p for p in worker["plans"] if p["op"] == "infer"]
    assert "one_by_one" in plan["per_job_us"] and any(k.startswith("vmap@") for k in plan["per_job_us"]), plan
    assert all(cost > 0 for cost in plan["per_job_us"].values()), plan


def test_bf16_mixed_rounds_follow_torch_autocast_on_cuda(gpu_cohort) -> None:
    """``precision = "bf16-mixed"`` on a GPU: float32 weights and Adam state, forward and loss under
    ``torch.autocast("cuda", torch.bfloat16)``, fused, along plain PyTorch's curve."""
    group = mlp_group("mx", K, optimizer={"name": "adam", "lr": 1e-2}, init={"seed": 5}, precision="bf16-mixed",
                      batching={"plan": "vmap"})
    running = gpu_cohort([group], mps="off", workers=1)
    models, opts = [], []
    for k in range(K):
        torch.manual_seed(5 + k)
        model = mlp(d_in=8, hidden=16, d_out=4).cuda()
        models.append(model)
        opts.append(torch.optim.Adam(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(2)
    with running.client(timeout=120) as c:
        for step in range(20):
            x, t = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            got = c.train_round("mx", x, t)  # one shared batch
            want = []
            for model, opt in zip(models, opts):
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x.cuda()), t.cuda())
                loss.backward()
                opt.step()
                want.append(loss.item())
            assert got == pytest.approx(want, rel=2e-2, abs=2e-2), f"step {step}"
        weights = c.get_weights("mx/1")
        assert all(v.dtype == torch.float32 for v in weights.values())
        for name, value in weights.items():
            torch.testing.assert_close(value, models[1].state_dict()[name].cpu(), atol=2e-2, rtol=2e-2, msg=name)
