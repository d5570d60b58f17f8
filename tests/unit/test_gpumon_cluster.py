"""``gpumon.py --cluster``: a sample from a cluster client and its supervisors, and its view (fakes, no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console

TOOLS = str(Path(__file__).resolve().parents[2] / "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from gpumon_cluster import ClusterSampler, render_cluster  # noqa: E402

GIB = 2**30


class FakeRay:
    class _Ray:
        @staticmethod
        def get(ref: Any, timeout: float) -> Any:
            if isinstance(ref, Exception):
                raise ref
            return ref

    ray = _Ray()

    def supervisor(self, index: int) -> Any:
        figures = {"uuid": "GPU-aaaa", "name": "H200", "utilization": 87, "memory_used": 40 * GIB,
                   "memory_total": 141 * GIB, "power_w": 512.0}
        remote = figures if index == 0 else TimeoutError("slow node")
        return type("S", (), {"gpu_sample": type("M", (), {"remote": staticmethod(lambda: remote)})})()


class FakeClusterClient:
    def __init__(self) -> None:
        self._ray = FakeRay()
        self.closed = False

    def stats(self, timeout: float) -> dict[str, Any]:
        one = {"jobs_per_s": 120.5, "queued": 3, "in_flight": 2, "latency_ms": {"p50": 0.8, "p99": 4.0},
               "workers": [{"state": "ready"}, {"state": "starting"}]}
        return {"coordinators": [
            {"index": 0, "address": "tcp://10.0.0.1:4000", "state": "up", "incarnation": 1, "node": "abcdef123456",
             "gpu": "GPU-aaaa", "stats": one, "error": None},
            {"index": 1, "address": "tcp://10.0.0.2:4000", "state": "starting", "incarnation": 2, "node": "99",
             "gpu": "GPU-bbbb", "stats": None, "error": "JobTimeout: no answer"},
        ], "models": {"m/0": {}, "m/1": {}}, "jobs_per_s": 120.5, "queued": 3, "in_flight": 2}

    def close(self) -> None:
        self.closed = True


def test_a_cluster_sample_has_a_row_per_coordinator_with_its_gpu() -> None:
    sampler = ClusterSampler("auto", 1.0, connect=lambda address, timeout: FakeClusterClient())
    sample = sampler.sample()
    assert sample["error"] is None
    assert sample["totals"] == {"coordinators": 2, "up": 1, "models": 2, "jobs_per_s": 120.5, "queued": 3,
                                "in_flight": 2}
    rows = sample["coordinators"]
    assert rows[0]["gpu_figures"]["utilization"] == 87 and "slow node" in rows[1]["gpu_figures"]["error"]
    console = Console(width=200, record=True)
    console.print(render_cluster(sample))
    text = console.export_text()
    assert "1/2 coordinators answering, 2 models, 120.5 jobs/s" in text
    assert "87%" in text and "40.0/141 GiB" in text and "512 W" in text and "1/2" in text
    assert "JobTimeout: no answer" in text


def test_no_cluster_is_one_line_and_the_next_sample_tries_again() -> None:
    attempts = []

    def connect(address: str, timeout: float) -> Any:
        attempts.append(address)
        raise RuntimeError("no Ray cluster found")

    sampler = ClusterSampler("auto", 1.0, connect=connect)
    sample = sampler.sample()
    assert sample["error"] == "RuntimeError: no Ray cluster found" and sample["coordinators"] == []
    sampler.sample()
    assert len(attempts) == 2
    console = Console(width=120, record=True)
    console.print(render_cluster(sample))
    assert "unreachable: RuntimeError: no Ray cluster found (retrying)" in console.export_text()
