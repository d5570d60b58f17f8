"""Unit tests for tools/gpumon.py and its helpers, on fakes: no GPU, no coordinator.

tests/system/test_gpumon.py runs the monitor against a real coordinator.
"""

from __future__ import annotations

import copy
import importlib
import sys
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
            "compile": {"loaded": 3, "compiled": 0, "seconds": 0.0, "shapes": []},
            "plans": [{"group": "mlp", "op": "infer", "inputs": "64x64 float32", "in_use": {1: "one_by_one", 8: "vmap@8"},
                       "per_job_us": {"one_by_one": 35.0, "vmap@8": 12.5, "concat@4": 2100.0}, "pinned": False,
                       "notes": ["vmap has no batching rule for aten::foo (torch loops there)"]}],
        },
        {
            "id": 1,
            "pid": 4243,
            "state": "starting",
            "device": "cuda:0",
            "models": ["mlp/2"],
            "queued": 0,
            "in_flight": 0,
            "jobs_done": 7,
            "restarts": 1,
            "compile": {"loaded": 1, "compiled": 2, "seconds": 41.25, "shapes": []},
        },
    ],
    "queued": 3,
    "in_flight": 2,
    "jobs": {"submitted": 20, "completed": 17, "failed": 1, "errors": {"WorkerDied": 1}},
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
    assert "starting" in out and "4243" in out
    assert "p50 1.2 ms" in out and "p99 4.5 ms" in out
    assert "mlp/0" in out and "3.5 jobs/s" in out
    assert "GPU 0 util  ▂▅▇  87%" in out  # 10%, 50%, 87% on the fixed 0..100 scale
    assert "jobs/s      ███  3.5" in out
    assert "unreachable" not in out and "no GPU figures" not in out
    assert "3 loaded" in out and "1 loaded, 2 compiled in 41.2 s" in out  # worker 1 compiled at run time
    assert "1: one_by_one, 8: vmap@8" in out  # the plan in use per load, cheapest measured cost first
    assert "vmap@8 12 us  one_by_one 35 us  concat@4 2.10 ms" in out and "aten::foo" in out


def test_render_without_gpu_or_coordinator_says_why_in_one_line() -> None:
    sampler = Sampler(
        FakeGpu([], "NVML library not found"),
        FakeCoordinator(None, "JobTimeout: no answer in 0.5 s"),
    )
    sample = sampler.sample()
    history = History()
    history.add(sample)
    out = text_of(render(sample, history))
    assert "no GPU figures: NVML library not found" in out
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
        ("cohort_worker_queue_depth", (("worker", "0"),)): 3,
        ("cohort_worker_jobs_in_flight", (("worker", "0"),)): 2,
        ("cohort_queue_depth", ()): 3,
        ("cohort_jobs_in_flight", ()): 2,
        ("cohort_job_errors_total", (("error", "WorkerDied"),)): 1,
        ("cohort_worker_restarts_total", (("worker", "1"),)): 1,
        ("cohort_jobs_completed_total", ()): 17,
        ("cohort_jobs_failed_total", ()): 1,
        ("cohort_jobs_per_second", ()): 3.5,
        ("cohort_job_latency_seconds", (("quantile", "0.5"),)): 0.00125,
        ("cohort_job_latency_seconds", (("quantile", "0.99"),)): 0.0045,
        ("cohort_model_jobs_total", (("model", "mlp/0"),)): 9,
        ("cohort_model_jobs_unfinished", (("model", "mlp/1"),)): 2,
        ("cohort_model_version", (("model", "mlp/0"),)): 2,
        ("cohort_gpu_sm_clock_hertz", (("gpu", "0"),)): 1980e6,
        (
            "cohort_gpu_info",
            (("gpu", "0"), ("name", "NVIDIA H100 80GB HBM3"), ("uuid", "GPU-1234")),
        ): 1,
        ("cohort_gpu_up", ()): 1,
        ("cohort_coordinator_up", ()): 1,
        ("cohort_worker_state", (("worker", "1"), ("state", "starting"))): 1,
        ("cohort_mps_info", (("mode", "on"), ("requested", "auto"))): 1,
        ("cohort_worker_compiled_shapes", (("worker", "0"), ("how", "loaded"))): 3,
        ("cohort_worker_compiled_shapes", (("worker", "1"), ("how", "compiled"))): 2,
        ("cohort_worker_compile_seconds_total", (("worker", "1"),)): 41.25,
        ("cohort_plan_job_cost_seconds", (("worker", "0"), ("group", "mlp"), ("op", "infer"),
                                          ("inputs", "64x64 float32"), ("plan", "vmap@8"))): 12.5e-6,
        ("cohort_plan_in_use", (("worker", "0"), ("group", "mlp"), ("op", "infer"), ("inputs", "64x64 float32"),
                                ("jobs", "8"), ("plan", "vmap@8"))): 1,
    }
    for (name, labels), value in expected.items():
        assert metrics[(name, frozenset(labels))] == pytest.approx(value), name
    server = {"gpu": "0", "pid": "999", "name": "nvidia-cuda-mps-server", "role": "mps_server"}
    worker = {"gpu": "0", "pid": "4242", "name": "python3", "role": "process", "worker": "0"}
    process_memory = "cohort_gpu_process_memory_used_bytes"
    assert metrics[(process_memory, frozenset({**server, "worker": ""}.items()))] == 30 * 2**20
    assert metrics[(process_memory, frozenset(worker.items()))] == 5 * GIB
    assert metrics[("cohort_host_memory_used_bytes", frozenset())] > 0
    assert 0 <= metrics[("cohort_host_cpu_utilization_ratio", frozenset())] <= 1


def test_prometheus_reports_coordinator_and_gpu_down() -> None:
    sampler = Sampler(FakeGpu([], "NVML library not found"), FakeCoordinator(None, "down"))
    metrics = scrape(sampler)
    assert metrics[("cohort_coordinator_up", frozenset())] == 0
    assert metrics[("cohort_gpu_up", frozenset())] == 0
    assert ("cohort_jobs_per_second", frozenset()) not in metrics


def test_nvml_source_lists_mps_clients_apart() -> None:
    # Under MPS the clients are only in the MPS list; the server in the ordinary one.
    nvml = fake_nvml()
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        SimpleNamespace(pid=7, usedGpuMemory=GIB)
    ]
    nvml.nvmlDeviceGetMPSComputeRunningProcesses = lambda h: [
        SimpleNamespace(pid=8, usedGpuMemory=2 * GIB),
        SimpleNamespace(pid=9, usedGpuMemory=3 * GIB),
    ]
    names = {7: ("nvidia-cuda-mps-server", ""), 8: ("python3", ""), 9: ("python3", "")}
    gpus, error = NvmlSource(nvml=nvml, describe_process=names.__getitem__).sample()
    assert error is None
    rows = [
        (p["pid"], p["mps_server"], p["mps_client"], p["memory_used"]) for p in gpus[0]["processes"]
    ]
    assert rows == [(7, True, False, GIB), (8, False, True, 2 * GIB), (9, False, True, 3 * GIB)]


def test_nvml_source_falls_back_to_older_functions() -> None:
    # pynvml's unversioned names call _v3 and raise NVMLLibraryMismatchError (not an
    # NVMLError) on drivers without it; _v2 must be used instead, and a field failing
    # that way must cost that field only.
    mismatch = type("NVMLLibraryMismatchError", (Exception,), {})

    def too_new(*_: Any) -> Any:
        raise mismatch("driver lacks _v3")

    nvml = fake_nvml()
    nvml.NVMLLibraryMismatchError = mismatch
    nvml.nvmlDeviceGetComputeRunningProcesses = too_new
    nvml.nvmlDeviceGetComputeRunningProcesses_v2 = lambda h: [
        SimpleNamespace(pid=8, usedGpuMemory=GIB)
    ]
    nvml.nvmlDeviceGetPowerUsage = too_new
    gpus, error = NvmlSource(nvml=nvml, describe_process=lambda pid: ("python3", "")).sample()
    assert error is None
    assert [p["pid"] for p in gpus[0]["processes"]] == [8]
    assert gpus[0]["power_w"] is None and gpus[0]["utilization"] == 70


def test_sampler_marks_workers_and_remembers_when_coordinator_went_down() -> None:
    coordinator = FakeCoordinator(STATS)
    sampler = Sampler(FakeGpu([copy.deepcopy(GPU)]), coordinator)
    sample = sampler.sample()
    assert [p["cohort_worker"] for p in sample["gpus"][0]["processes"]] == [None, 0]
    assert sample["coordinator_down_since"] is None
    coordinator.result = (None, "JobTimeout: no answer")
    first_down = sampler.sample()
    second_down = sampler.sample()
    assert first_down["coordinator_down_since"] == first_down["time"]
    assert second_down["coordinator_down_since"] == first_down["time"]
    coordinator.result = (STATS, None)
    assert sampler.sample()["coordinator_down_since"] is None


def test_render_mps_note_and_error_breakdown() -> None:
    # MPS on per the coordinator, with clients that NVML lists as MPS clients.
    gpu = {
        **GPU,
        "processes": [
            {
                "pid": 4242,
                "name": "python3",
                "memory_used": GIB,
                "mps_client": True,
                "cohort_worker": 0,
            },
        ],
    }
    sample = Sampler(FakeGpu([gpu]), FakeCoordinator(STATS)).sample()
    out = text_of(render(sample, History()))
    assert "cohort worker 0 (MPS client)" in out
    assert "utilization is per GPU only" in " ".join(out.split())
    assert "failed 1 (WorkerDied 1)" in out
    # No GPU processes at all: one line, and still the MPS note.
    sample = Sampler(FakeGpu([{**GPU, "processes": []}]), FakeCoordinator(STATS)).sample()
    out = text_of(render(sample, History()))
    assert "GPU processes: none" in out and "nvidia-cuda-mps-server" in out


def test_render_coordinator_down_for_how_long() -> None:
    sample = {
        "time": 1000.0,
        "address": "ipc:///tmp/x.sock",
        "gpus": [],
        "gpu_error": "NVML library not found",
        "coordinator": None,
        "coordinator_error": "JobTimeout: no answer",
        "coordinator_down_since": 925.0,
    }
    out = text_of(render(sample, History()))
    assert "coordinator: unreachable at ipc:///tmp/x.sock for 1m15s (retrying)" in out


def test_frame_turns_a_failing_render_into_one_line() -> None:
    class OddSampler:
        def sample(self) -> dict[str, Any]:
            return {"gpus": 5}  # not a list: History.add fails on it

    out = text_of(gpumon.frame(OddSampler(), History()))
    assert out.startswith("monitor: cannot draw this sample (TypeError") and "retrying" in out


def test_default_address_is_the_clients() -> None:
    # The monitor keeps its own copy so it starts where cohort cannot be imported.
    from scheduler import client, config

    assert tool("gpumon_coord").DEFAULT_ADDRESS == config.DEFAULT_ADDRESS
    assert tool("gpumon_coord").ADDRESS_ENV == config.ADDRESS_ENV
    assert tool("gpumon_coord").default_address() == client.default_address()


@pytest.mark.parametrize(
    "argv",
    [
        ["--address", "127.0.0.1:5555"],
        ["--interval", "0"],
        ["--export-svg", "x.svg"],
        ["--once", "--json", "--export-text", "x.txt"],
        ["--width", "10"],
    ],
)
def test_bad_command_lines_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        gpumon.parse_args(argv)


def test_coordinator_timeout_is_short() -> None:
    sampler = gpumon.make_sampler("ipc:///nonexistent.sock", interval=30.0)
    assert sampler.coordinator.timeout == gpumon.MAX_COORDINATOR_TIMEOUT_S
    sampler = gpumon.make_sampler("ipc:///nonexistent.sock", interval=0.01)
    assert sampler.coordinator.timeout == gpumon.MIN_COORDINATOR_TIMEOUT_S


def test_once_exports_svg_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg, txt = tmp_path / "view.svg", tmp_path / "view.txt"
    address = f"ipc://{tmp_path}/nobody.sock"
    argv = ["--once", "--interval", "0.3", "--width", "100", "--address", address]
    assert gpumon.main([*argv, "--export-svg", str(svg), "--export-text", str(txt)]) == 0
    printed = capsys.readouterr().out
    text = txt.read_text()
    assert "coordinator: unreachable at" in text
    assert "no GPU figures: " in text or "GPUs" in text
    assert text.strip() == printed.strip()
    assert svg.read_text().startswith("<svg") and "unreachable" in svg.read_text()


def test_prometheus_port_taken_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    sampler = Sampler(FakeGpu([]), FakeCoordinator(None, "down"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert gpumon.run_prometheus(sampler, port, "127.0.0.1", 0.1) == 1
    assert capsys.readouterr().err.startswith(f"gpumon: cannot serve on 127.0.0.1:{port}")


def test_render_shows_a_snapshot_being_written() -> None:
    writing = {"path": "/data/ckpt", "files_done": 3, "files": 8, "bytes_done": 3 * GIB, "bytes": 8 * GIB,
               "elapsed_s": 75.0}
    sample = Sampler(FakeGpu([GPU]), FakeCoordinator({**STATS, "snapshots": [writing]})).sample()
    out = " ".join(text_of(render(sample, History())).split())
    assert "snapshot /data/ckpt: 3/8 files, 3.0 GiB of 8.0 GiB, 1m15s" in out
    quiet = text_of(render(Sampler(FakeGpu([GPU]), FakeCoordinator(STATS)).sample(), History()))
    assert "snapshot" not in quiet
