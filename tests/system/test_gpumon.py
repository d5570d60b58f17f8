"""tools/gpumon.py against a real coordinator: JSON, Prometheus, no GPU, coordinator down.

Each coordinator is a real `python -m scheduler run` on a private ipc:// address in a
pytest temporary folder, started in its own session and always killed by the fixture's
finalizer. The monitor runs as users run it, `python tools/gpumon.py ...`, except where
a test needs to reach inside (a forced NVML failure, a timed sample).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from core.errors import CohortError
from scheduler import Client

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
GPUMON = str(TOOLS / "gpumon.py")
START_TIMEOUT_S = 60.0

CONFIG = """\
[coordinator]
address = "{address}"
workers = 1
device  = "cpu"
mps     = "off"

[[group]]
name      = "mlp"
factory   = "examples.models:mlp"
kwargs    = {{ d_in = 8, hidden = 16, d_out = 4 }}
count     = 3
input     = {{ shape = [-1, 8], dtype = "float32" }}
loss      = "cross_entropy"
optimizer = {{ name = "sgd", lr = 0.1 }}
"""


def stop_monitor(monitor: subprocess.Popen) -> int | None:
    """SIGTERM, as Ctrl-C would end it; killed if it does not exit. Its exit code (None if killed)."""
    monitor.send_signal(signal.SIGTERM)
    try:
        return monitor.wait(timeout=15)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()

def tool(name: str) -> Any:
    """Import a module of tools/ (a folder of scripts that import each other by name)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


class Coordinator:
    """One real coordinator process; start() and stop() may be called again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.address = f"ipc://{folder}/coordinator.sock"
        self.config = folder / "cohort.toml"
        self.config.write_text(CONFIG.format(address=self.address))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.folder / f"coordinator-{self.starts}.log", "wb")  # noqa: SIM115
        with log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scheduler", "run", "--config", str(self.config)],
                cwd=ROOT,
                # The run folder (worker sockets) goes here too, so a killed
                # coordinator leaves nothing behind in /tmp.
                env={**os.environ, "TMPDIR": str(self.folder)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with Client(self.address, timeout=1.0) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    pytest.fail(f"coordinator exited at start-up:\n{self.log()}")
                try:
                    client.models(timeout=0.5)
                    return
                except CohortError:
                    time.sleep(0.1)
        pytest.fail(f"coordinator not answering after {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return (self.folder / f"coordinator-{self.starts}.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the coordinator's session; SIGKILL it if it is still there after 10 s.

        Workers run in sessions of their own and die with the coordinator (they ask
        the kernel for SIGTERM when their parent dies).
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    coord = Coordinator(tmp_path_factory.mktemp("gm"))
    try:
        coord.start()
        yield coord
    finally:
        coord.stop()


def run_gpumon(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, GPUMON, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def submit_jobs(address: str) -> dict[str, Any]:
    """5 inferences on mlp/0, 2 steps on mlp/1, 1 step failing in the worker; stats before."""
    with Client(address, timeout=30) as client:
        before = client.stats()
        for _ in range(5):
            client.infer("mlp/0", torch.randn(4, 8))
        for _ in range(2):
            client.train_step("mlp/1", torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
        with pytest.raises(CohortError):  # class 9 of 4: the loss rejects it
            client.train_step("mlp/2", torch.randn(4, 8), torch.tensor([0, 1, 2, 9]))
    return before


def test_once_json_carries_coordinator_figures(coordinator: Coordinator) -> None:
    before = submit_jobs(coordinator.address)
    result = run_gpumon("--once", "--json", "--address", coordinator.address)
    sample = json.loads(result.stdout)

    stats = sample["coordinator"]
    assert sample["coordinator_error"] is None and stats is not None
    jobs, jobs_before = stats["jobs"], before["jobs"]
    assert jobs["submitted"] - jobs_before["submitted"] == 8
    assert jobs["completed"] - jobs_before["completed"] == 7
    assert jobs["failed"] - jobs_before["failed"] == 1
    errors, errors_before = jobs["errors"], jobs_before["errors"]
    assert errors.get("BadInput", 0) - errors_before.get("BadInput", 0) == 1
    models, models_before = stats["models"], before["models"]
    assert models["mlp/0"]["jobs"] - models_before["mlp/0"]["jobs"] == 5
    assert models["mlp/1"]["jobs"] - models_before["mlp/1"]["jobs"] == 2
    assert models["mlp/1"]["version"] - models_before["mlp/1"]["version"] == 2
    assert stats["jobs_per_s"] > 0 and stats["latency_ms"]["p99"] > 0
    assert stats["mps"]["mode"] == "off"
    [worker] = stats["workers"]
    assert worker["state"] == "ready" and worker["pid"] > 0
    assert worker["queued"] == 0 and worker["in_flight"] == 0
    assert worker["models"] == ["mlp/0", "mlp/1", "mlp/2"]
    assert sample["host"]["memory_total"] > 0 and 0 <= sample["host"]["cpu_percent"] <= 100
    if not sample["gpus"]:  # machines without a GPU or NVML: one line saying why
        assert sample["gpu_error"] and "\n" not in sample["gpu_error"]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_prometheus_endpoint_serves_figures(coordinator: Coordinator) -> None:
    submit_jobs(coordinator.address)
    command = [GPUMON, "--address", coordinator.address, "--interval", "0.5", "--prometheus", "0"]
    monitor = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert monitor.stdout is not None
        banner = monitor.stdout.readline()  # "serving cohort metrics at http://...:PORT/metrics"
        assert "/metrics" in banner, monitor.stderr.read() if monitor.stderr else banner
        url = banner.split(" at ", 1)[1].split()[0]
        metrics = scrape(url)
        with Client(coordinator.address, timeout=10) as client:
            stats = client.stats()
            # Later scrapes serve later figures.
            for _ in range(3):
                client.infer("mlp/0", torch.randn(2, 8))
            submitted = metrics[("cohort_jobs_submitted_total", frozenset())]
            deadline = time.monotonic() + 10
            while scrape(url)[("cohort_jobs_submitted_total", frozenset())] < submitted + 3:
                assert time.monotonic() < deadline, "the scraped figures never moved"
                time.sleep(0.2)
    finally:
        returncode = stop_monitor(monitor)
    assert returncode == 0

    def value(name: str, **labels: str) -> float:
        return metrics[(name, frozenset(labels.items()))]

    assert value("cohort_coordinator_up") == 1
    # Counters only grow between the scrape and the stats() call after it.
    assert 8 <= value("cohort_jobs_submitted_total") <= stats["jobs"]["submitted"]
    assert 1 <= value("cohort_jobs_failed_total") <= stats["jobs"]["failed"]
    assert value("cohort_job_errors_total", error="BadInput") >= 1
    assert 5 <= value("cohort_model_jobs_total", model="mlp/0") <= stats["models"]["mlp/0"]["jobs"]
    assert value("cohort_worker_state", worker="0", state="ready") == 1
    assert value("cohort_worker_queue_depth", worker="0") == 0
    assert value("cohort_worker_jobs_in_flight", worker="0") == 0
    assert value("cohort_worker_jobs_done_total", worker="0") >= 7
    assert value("cohort_job_latency_seconds", quantile="0.99") > 0
    assert value("cohort_mps_info", mode="off", requested="off") == 1
    assert value("cohort_host_memory_total_bytes") > 0
    assert 0 <= value("cohort_host_cpu_utilization_ratio") <= 1
    assert value("cohort_gpu_up") in (0, 1)
    assert abs(value("cohort_monitor_sample_timestamp_seconds") - time.time()) < 30


def test_no_gpu_path_says_why_in_one_line(coordinator: Coordinator) -> None:
    # NVML forced to fail as it does where the library is missing, whatever this
    # machine has; the coordinator figures must still be drawn.
    not_found = type("NVMLError_LibraryNotFound", (Exception,), {})

    def init() -> None:
        raise not_found("NVML Shared Library Not Found")

    gpumon_sample = tool("gpumon_sample")
    sampler = gpumon_sample.Sampler(
        tool("gpumon_nvml").NvmlSource(nvml=SimpleNamespace(nvmlInit=init)),
        tool("gpumon_coord").CoordinatorSource(coordinator.address, timeout=2.0),
    )
    try:
        sample = sampler.sample()
    finally:
        sampler.close()
    assert sample["gpus"] == [] and sample["gpu_error"] == "NVML library not found"
    history = tool("gpumon_history").History()
    history.add(sample)
    console = Console(record=True, width=120)
    console.print(tool("gpumon_view").render(sample, history))
    lines = console.export_text().splitlines()
    assert [line for line in lines if "GPU" in line and "util" not in line] == [
        "no GPU figures: NVML library not found"
    ]
    text = "\n".join(lines)
    assert "Workers" in text and "mlp/0" in text and "jobs/s" in text
    assert "unreachable" not in text

    # The real monitor on this machine: a GPU table, or the one line saying why not.
    view = run_gpumon("--once", "--width", "120", "--address", coordinator.address).stdout
    assert "Workers" in view and "ready" in view
    no_gpu = [line for line in view.splitlines() if line.startswith("no GPU figures: ")]
    assert len(no_gpu) == 1 or "GPUs" in view


def test_coordinator_down_is_reported_quickly(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/nobody.sock"
    coord_source = tool("gpumon_coord").CoordinatorSource(address, timeout=1.0)
    sampler = tool("gpumon_sample").Sampler(tool("gpumon_nvml").NvmlSource(), coord_source)
    try:
        for _ in range(2):  # the first one with a new client, the second with a fresh one
            started = time.monotonic()
            sample = sampler.sample()
            elapsed = time.monotonic() - started
            assert sample["coordinator"] is None
            assert sample["coordinator_error"].startswith("JobTimeout")
            assert sample["coordinator_down_since"] is not None
            assert elapsed < 2.5, f"a down coordinator held the sample for {elapsed:.1f} s"
    finally:
        sampler.close()

    result = run_gpumon("--once", "--json", "--interval", "0.5", "--address", address)
    cli_sample = json.loads(result.stdout)
    assert cli_sample["coordinator"] is None and cli_sample["coordinator_error"]


def read_lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def next_sample(lines: queue.Queue[str], deadline: float) -> dict[str, Any]:
    try:
        return json.loads(lines.get(timeout=max(0.0, deadline - time.monotonic())))
    except queue.Empty:
        pytest.fail("the monitor stopped printing samples")


def wait_for(lines: queue.Queue[str], up: bool, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        sample = next_sample(lines, deadline)
        if (sample["coordinator"] is not None) == up:
            return sample


def test_monitor_survives_coordinator_restart(coordinator: Coordinator) -> None:
    # Kills the shared coordinator and starts it again; the other tests count jobs
    # as differences, so they pass before or after this one.
    monitor = subprocess.Popen(
        [
            sys.executable,
            GPUMON,
            "--json",
            "--interval",
            "0.5",
            "--address",
            coordinator.address,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(monitor.stdout, lines), daemon=True).start()
    try:
        first = wait_for(lines, up=True, within=30)
        coordinator.stop(signal.SIGKILL)  # a crash, not a clean stop
        down = wait_for(lines, up=False, within=10)
        assert down["coordinator_error"]
        # While it is down the monitor keeps its pace: each stats() call gives up fast.
        later = [next_sample(lines, time.monotonic() + 5) for _ in range(3)]
        assert all(s["coordinator"] is None for s in later)
        gaps = [b["time"] - a["time"] for a, b in zip([down, *later], later)]
        assert max(gaps) < 2.0, gaps
        coordinator.start()
        back = wait_for(lines, up=True, within=30)
        assert back["coordinator"]["uptime_s"] < first["coordinator"]["uptime_s"] + 30
        assert back["coordinator"]["workers"][0]["pid"] != first["coordinator"]["workers"][0]["pid"]
        assert back["coordinator_down_since"] is None
        assert monitor.poll() is None, "the monitor exited"
    finally:
        returncode = stop_monitor(monitor)
    assert returncode == 0, monitor.stderr.read() if monitor.stderr else ""
