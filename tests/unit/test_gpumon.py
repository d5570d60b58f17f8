"""Unit tests for tools/gpumon.py and its helpers; no GPU and no coordinator needed."""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def tool(name: str) -> Any:
    """Import a module of tools/.

    tools/ is a folder of scripts, not a package: its modules import each other by
    bare name, as they do when run as `python tools/gpumon.py`.
    """
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


gpumon = tool("gpumon")
CoordinatorSource = tool("gpumon_coord").CoordinatorSource
BLOCKS = tool("gpumon_history").BLOCKS
History = tool("gpumon_history").History
sparkline = tool("gpumon_history").sparkline
NvmlSource = tool("gpumon_nvml").NvmlSource
serve = tool("gpumon_prom").serve
Sampler = tool("gpumon_sample").Sampler
render = tool("gpumon_view").render

GIB = 2**30

STATS: dict[str, Any] = {
    "cohort_version": "0.1.0",
    "uptime_s": 125.0,
    "address": "tcp://127.0.0.1:5555",
    "device": "cuda:0",
    "mps": {"mode": "on", "requested": "auto", "reason": ""},
    "workers": [
        {
            "id": 0,
            "pid": 4242,
            "state": "ready",
            "device": "cuda:0",
            "models": ["mlp/0", "mlp/1"],
            "queued": 3,
            "in_flight": 2,
            "jobs_done": 10,
            "restarts": 0,
        },
        {
            "id": 1,
            "pid": 4243,
            "state": "restarting",
            "device": "cuda:0",
            "models": ["mlp/2"],
            "queued": 0,
            "in_flight": 0,
            "jobs_done": 7,
            "restarts": 1,
        },
    ],
    "queued": 3,
    "in_flight": 2,
    "jobs": {"submitted": 20, "completed": 17, "failed": 1},
    "jobs_per_s": 3.5,
    "latency_ms": {"p50": 1.25, "p90": 2.0, "p99": 4.5},
    "models": {
        "mlp/0": {"jobs": 9, "version": 2, "worker": 0, "queued": 1},
        "mlp/1": {"jobs": 5, "version": 1, "worker": 0, "queued": 2},
        "mlp/3": {"jobs": 3, "version": 1, "worker": 1, "queued": 0},
    },
}

GPU: dict[str, Any] = {
    "index": 0,
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-1234",
    "utilization": 87,
    "memory_utilization": 40,
    "memory_used": 20 * GIB,
    "memory_total": 80 * GIB,
    "power_w": 312.5,
    "power_limit_w": 700.0,
    "temperature_c": 55,
    "clock_sm_mhz": 1980,
    "clock_mem_mhz": 2619,
    "processes": [
        {
            "pid": 999,
            "name": "nvidia-cuda-mps-server",
            "command": "",
            "memory_used": 30 * 2**20,
            "mps_server": True,
        },
        {
            "pid": 4242,
            "name": "python3",
            "command": "python -m workers --id 0",
            "memory_used": 5 * GIB,
            "mps_server": False,
        },
    ],
}


class FakeGpu:
    def __init__(self, gpus: list[dict[str, Any]], error: str | None = None) -> None:
        self.result = (gpus, error)

    def sample(self) -> tuple[list[dict[str, Any]], str | None]:
        return self.result


class FakeCoordinator:
    address = "tcp://127.0.0.1:5555"

    def __init__(self, stats: dict[str, Any] | None, error: str | None = None) -> None:
        self.result = (stats, error)

    def sample(self) -> tuple[dict[str, Any] | None, str | None]:
        return self.result


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=120)
    console.print(renderable)
    return console.export_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sparkline_scales_and_marks_gaps() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 50, 100], 0, 100) == "▁" + BLOCKS[4] + "█"
    assert sparkline([150, -5], 0, 100) == "█▁"  # clamped to the fixed scale
    assert sparkline([1.0, None, 2.0]) == BLOCKS[4] + " █"  # 3.5 rounds up
    assert sparkline([None, None]) == "  "
    assert sparkline([0, 0, 0]) == "▁▁▁"


def test_history_keeps_last_samples_and_gaps() -> None:
    history = History(length=3)
    for util in (10, 20, 30, 40):
        history.add(
            {
                "gpus": [{"index": 0, "utilization": util}],
                "coordinator": {"jobs_per_s": util / 10},
            }
        )
    history.add({"gpus": [], "coordinator": None})
    assert list(history.gpu_util[0]) == [30.0, 40.0, None]
    assert list(history.jobs_per_s) == [3.0, 4.0, None]


def test_render_with_gpu_shows_every_section() -> None:
    sample = Sampler(FakeGpu([GPU]), FakeCoordinator(STATS)).sample()
    history = History()
    for util in (10, 50, 87):
        history.add({**sample, "gpus": [{**GPU, "utilization": util}]})
    out = text_of(render(sample, history))
    assert "NVIDIA H100 80GB HBM3" in out
    assert "87%" in out and "55 °C" in out and "312 / 700 W" in out
    assert "20.0/80.0 GiB (25%)" in out
    assert "nvidia-cuda-mps-server" in out and "MPS server" in out
    assert "cohort worker 0" in out  # GPU process matched to the worker's pid
    assert "MPS on" in out
    assert "restarting" in out and "4243" in out
    assert "p50 1.2 ms" in out and "p99 4.5 ms" in out
    assert "mlp/0" in out and "3.5 jobs/s" in out
    assert "GPU 0 util  ▂▅▇  87%" in out  # 10%, 50%, 87% on the fixed 0..100 scale
    assert "jobs/s      ███  3.5" in out
    assert "unreachable" not in out and "no GPU" not in out


def test_render_without_gpu_or_coordinator_says_why_in_one_line() -> None:
    sampler = Sampler(
        FakeGpu([], "NVML library not found"),
        FakeCoordinator(None, "JobTimeout: no answer in 0.5 s"),
    )
    sample = sampler.sample()
    history = History()
    history.add(sample)
    out = text_of(render(sample, history))
    assert "no GPU: NVML library not found" in out
    assert "coordinator: unreachable at tcp://127.0.0.1:5555 (retrying)" in out
    assert "host" in out and "CPU" in out


def test_render_tolerates_odd_stats() -> None:
    odd = {
        "workers": [{"id": 0}],
        "models": {"m": None},
        "latency_ms": {},
        "jobs": None,
        "jobs_per_s": "fast",
    }
    sample = Sampler(FakeGpu([{"index": 0}]), FakeCoordinator(odd)).sample()
    history = History()
    history.add(sample)
    assert "Workers" in text_of(render(sample, history))


class RaisingSource:
    address = "tcp://x"

    def sample(self) -> Any:
        raise RuntimeError("boom")


def test_sampler_survives_sources_that_raise() -> None:
    sample = Sampler(RaisingSource(), RaisingSource()).sample()
    assert sample["gpus"] == [] and "boom" in sample["gpu_error"]
    assert sample["coordinator"] is None and "boom" in sample["coordinator_error"]


class FakeClient:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.closed = False

    def stats(self, timeout: float) -> dict[str, Any]:
        if self.fail:
            raise TimeoutError(f"no answer in {timeout} s")
        return STATS

    def close(self) -> None:
        self.closed = True


def test_coordinator_source_recreates_client_after_failure() -> None:
    clients: list[FakeClient] = []

    def connect(address: str, timeout: float) -> FakeClient:
        clients.append(FakeClient(fail=len(clients) == 0))
        return clients[-1]

    source = CoordinatorSource("tcp://127.0.0.1:1", 0.5, connect=connect)
    stats, error = source.sample()
    assert stats is None and error == "TimeoutError: no answer in 0.5 s"
    assert clients[0].closed
    stats, error = source.sample()
    assert stats == STATS and error is None and len(clients) == 2


def fake_nvml() -> SimpleNamespace:
    class NVMLError(Exception):
        pass

    def unsupported(*_: Any) -> Any:
        raise NVMLError("Not Supported")

    return SimpleNamespace(
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        NVML_CLOCK_MEM=2,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100",
        nvmlDeviceGetUUID=lambda h: "GPU-1",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=70, memory=30),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=GIB, total=8 * GIB),
        nvmlDeviceGetPowerUsage=lambda h: 250_000,
        nvmlDeviceGetEnforcedPowerLimit=unsupported,
        nvmlDeviceGetTemperatureV=unsupported,
        nvmlDeviceGetTemperature=lambda h, sensor: 60,
        nvmlDeviceGetClockInfo=lambda h, kind: 1500 if kind == 1 else 2600,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=7, usedGpuMemory=GIB),
            SimpleNamespace(pid=8, usedGpuMemory=None),
        ],
    )


def test_nvml_source_reads_fields_and_marks_mps_server() -> None:
    names = {7: ("nvidia-cuda-mps-server", ""), 8: ("python3", "python -m workers")}
    source = NvmlSource(nvml=fake_nvml(), describe_process=names.__getitem__)
    gpus, error = source.sample()
    assert error is None
    gpu = gpus[0]
    assert gpu["name"] == "NVIDIA H100" and gpu["utilization"] == 70
    assert gpu["power_w"] == 250.0 and gpu["power_limit_w"] is None  # unsupported field
    assert gpu["temperature_c"] == 60 and gpu["clock_sm_mhz"] == 1500
    assert [p["mps_server"] for p in gpu["processes"]] == [True, False]
    assert gpu["processes"][1]["memory_used"] is None


def test_nvml_source_reports_missing_library_in_one_line() -> None:
    # Named as pynvml names it: the source maps the class name to a readable line.
    library_not_found = type("NVMLError_LibraryNotFound", (Exception,), {})

    def missing() -> None:
        raise library_not_found("NVML Shared Library Not Found")

    nvml = SimpleNamespace(nvmlInit=missing)
    assert NvmlSource(nvml=nvml).sample() == ([], "NVML library not found")


def test_once_json_without_gpu_or_coordinator() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "gpumon.py"),
            "--once",
            "--json",
            "--interval",
            "0.5",
            "--address",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    sample = json.loads(result.stdout)
    assert set(sample) >= {"time", "host", "gpus", "coordinator"}
    assert sample["coordinator"] is None and sample["coordinator_error"]
    assert sample["host"]["memory_total"] > 0
    if not sample["gpus"]:  # this is the case on machines without a GPU
        assert sample["gpu_error"]
    # Bounded by the 0.5 s client timeout plus interpreter and import start-up.
    assert time.monotonic() - started < 30


def test_once_renders_view() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "gpumon.py"),
            "--once",
            "--interval",
            "0.5",
            "--address",
            f"tcp://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "coordinator: unreachable at" in result.stdout


def test_prometheus_and_once_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        gpumon.parse_args(["--once", "--prometheus", "9100"])


def scrape(sampler: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Serve the sampler's metrics on a free port, scrape them once over HTTP, stop."""
    server, thread = serve(sampler.sample, 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=5)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_prometheus_scrape_shows_figures() -> None:
    metrics = scrape(Sampler(FakeGpu([GPU]), FakeCoordinator(STATS)))
    expected = {
        ("cohort_gpu_utilization_ratio", (("gpu", "0"),)): 0.87,
        ("cohort_gpu_memory_used_bytes", (("gpu", "0"),)): 20 * GIB,
        ("cohort_gpu_power_watts", (("gpu", "0"),)): 312.5,
        ("cohort_gpu_temperature_celsius", (("gpu", "0"),)): 55,
        ("cohort_queue_depth", (("worker", "0"),)): 3,
        ("cohort_jobs_in_flight", (("worker", "0"),)): 2,
        ("cohort_jobs_completed_total", ()): 17,
        ("cohort_jobs_failed_total", ()): 1,
        ("cohort_jobs_per_second", ()): 3.5,
        ("cohort_job_latency_seconds", (("quantile", "0.5"),)): 0.00125,
        ("cohort_job_latency_seconds", (("quantile", "0.99"),)): 0.0045,
        ("cohort_model_jobs_total", (("model", "mlp/0"),)): 9,
        ("cohort_coordinator_up", ()): 1,
        ("cohort_worker_state", (("worker", "1"), ("state", "restarting"))): 1,
        ("cohort_mps_info", (("mode", "on"), ("requested", "auto"))): 1,
    }
    for (name, labels), value in expected.items():
        assert metrics[(name, frozenset(labels))] == pytest.approx(value), name
    mps_server = {
        "gpu": "0",
        "pid": "999",
        "name": "nvidia-cuda-mps-server",
        "mps_server": "true",
    }
    assert metrics[("cohort_gpu_process_memory_used_bytes", frozenset(mps_server.items()))]
    assert metrics[("cohort_host_memory_used_bytes", frozenset())] > 0
    assert ("cohort_host_cpu_percent", frozenset()) in metrics


def test_prometheus_reports_coordinator_and_gpu_down() -> None:
    sampler = Sampler(FakeGpu([], "NVML library not found"), FakeCoordinator(None, "down"))
    metrics = scrape(sampler)
    assert metrics[("cohort_coordinator_up", frozenset())] == 0
    assert metrics[("cohort_gpu_up", frozenset())] == 0
    assert ("cohort_jobs_per_second", frozenset()) not in metrics
