"""Every torch.compile mode, on four streams, against eager: same results, every call compiled."""

from __future__ import annotations

import pytest
import torch
from cohort_harness import mlp_group

pytestmark = pytest.mark.gpu
MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


def run_workload(c, g: torch.Generator) -> list:
    out = []
    for _ in range(3):
        x = torch.randn(16, 8, generator=g)
        out.append(c.ensemble("m", x))
        futures = [c.submit("infer", f"m/{k}", x) for k in (0, 2, 5, 7)]  # joined: a stacked vmap call
        out += [f.result() for f in futures]
        xs, ts = torch.randn(8, 16, 8, generator=g), torch.randint(0, 4, (8, 16), generator=g)
        out.append(torch.tensor(c.train_round("m", xs, ts)))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_compiled_fused_calls_equal_eager_on_four_streams(gpu_cohort, mode: str) -> None:
    eager = gpu_cohort([mlp_group("m", 8, optimizer={"name": "adam", "lr": 1e-3}, batching={"plan": "vmap"})],
                       mps="off", streams=4)
    compiled = gpu_cohort([mlp_group("m", 8, optimizer={"name": "adam", "lr": 1e-3},
                                     batching={"compile": mode, "plan": "vmap"})], mps="off", streams=4)
    with eager.client(timeout=600) as a, compiled.client(timeout=600) as b:
        want = run_workload(a, torch.Generator().manual_seed(0))
        got = run_workload(b, torch.Generator().manual_seed(0))
        for i, (w, g) in enumerate(zip(want, got)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"result {i}: {m}")
        worker = b.stats()["workers"][0]
    assert worker["compiled_calls"] > 0 and worker["eager_calls"] == 0, worker
