"""The monitor's figures for Prometheus.

A custom collector turns the sample its callable returns into metric families on
every scrape; the monitor hands it the latest sample of its own loop (see
gpumon.run_prometheus). Metrics live in their own CollectorRegistry: the global one
would also export this process's Python internals and would make two monitors in one
process collide.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

# (sample key, metric name, help, scale): per-GPU gauges labelled by GPU index.
_GPU_GAUGES = (
    ("utilization", "cohort_gpu_utilization_ratio", "GPU busy fraction (NVML)", 0.01),
    (
        "memory_utilization",
        "cohort_gpu_memory_utilization_ratio",
        "Fraction of time GPU memory was read or written (NVML)",
        0.01,
    ),
    ("memory_used", "cohort_gpu_memory_used_bytes", "GPU memory in use", 1),
    ("memory_total", "cohort_gpu_memory_total_bytes", "GPU memory in all", 1),
    ("power_w", "cohort_gpu_power_watts", "GPU power draw", 1),
    ("power_limit_w", "cohort_gpu_power_limit_watts", "Enforced GPU power limit", 1),
    ("temperature_c", "cohort_gpu_temperature_celsius", "GPU core temperature", 1),
    ("clock_sm_mhz", "cohort_gpu_sm_clock_hertz", "SM clock", 1e6),
    ("clock_mem_mhz", "cohort_gpu_memory_clock_hertz", "Memory clock", 1e6),
)

# (worker key, metric name, help, kind): per-worker figures labelled by worker id.
_WORKER_METRICS = (
    ("queued", "cohort_worker_queue_depth", "Jobs queued for the worker", "gauge"),
    (
        "in_flight",
        "cohort_worker_jobs_in_flight",
        "Jobs sent to the worker and not yet answered",
        "gauge",
    ),
    (
        "jobs_done",
        "cohort_worker_jobs_done_total",
        "Jobs the worker finished",
        "counter",
    ),
    (
        "restarts",
        "cohort_worker_restarts_total",
        "Times the worker was restarted",
        "counter",
    ),
)


class CohortCollector(Collector):
    """Turns one sample per scrape into Prometheus metric families."""

    def __init__(self, sample: Callable[[], Mapping[str, Any]]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Metric]:
        sample = self._sample()
        yield from _gauge(
            "cohort_monitor_sample_timestamp_seconds",
            "When the monitor took the figures served here (Unix time)",
            sample.get("time"),
        )
        yield from _host_metrics(sample.get("host") or {})
        yield from _gpu_metrics(sample)
        yield from _coordinator_metrics(sample.get("coordinator"))


def serve(
    sample: Callable[[], Mapping[str, Any]], port: int, addr: str = "127.0.0.1"
) -> tuple[Any, threading.Thread]:
    """Serve /metrics on addr:port from a private registry; returns (server, thread).

    Stop it with `server.shutdown(); server.server_close()`. Port 0 picks a free port,
    read back from `server.server_port`.
    """
    registry = CollectorRegistry()
    registry.register(CohortCollector(sample))
    return start_http_server(port, addr=addr, registry=registry)


def _gauge(name: str, doc: str, value: Any) -> Iterator[Metric]:
    """A single-value gauge, left out when the figure is unknown (not exported as 0)."""
    if _is_number(value):
        yield GaugeMetricFamily(name, doc, value=float(value))


def _host_metrics(host: Mapping[str, Any]) -> Iterator[Metric]:
    cpu = host.get("cpu_percent")
    yield from _gauge(
        "cohort_host_cpu_utilization_ratio",
        "Host CPU busy fraction, all cores",
        cpu / 100.0 if _is_number(cpu) else None,
    )
    yield from _gauge(
        "cohort_host_memory_used_bytes",
        "Host memory not available for reuse",
        host.get("memory_used"),
    )
    yield from _gauge(
        "cohort_host_memory_total_bytes", "Host memory in all", host.get("memory_total")
    )


def _gpu_metrics(sample: Mapping[str, Any]) -> Iterator[Metric]:
    gpus = sample.get("gpus") or []
    yield GaugeMetricFamily("cohort_gpu_up", "1 when NVML answered", value=1.0 if gpus else 0.0)
    info = GaugeMetricFamily("cohort_gpu_info", "GPU name and UUID", labels=["gpu", "name", "uuid"])
    for gpu in gpus:
        info.add_metric([str(gpu.get("index")), str(gpu.get("name")), str(gpu.get("uuid"))], 1)
    yield info
    for key, name, doc, scale in _GPU_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["gpu"])
        for gpu in gpus:
            if _is_number(gpu.get(key)):
                family.add_metric([str(gpu.get("index"))], gpu[key] * scale)
        yield family
    processes = GaugeMetricFamily(
        "cohort_gpu_process_memory_used_bytes",
        "GPU memory per process (MPS clients included); role is mps_server, mps_client or process",
        labels=["gpu", "pid", "name", "role", "worker"],
    )
    for gpu in gpus:
        for proc in gpu.get("processes") or []:
            if _is_number(proc.get("memory_used")):
                worker = proc.get("cohort_worker")
                labels = [
                    str(gpu.get("index")),
                    str(proc.get("pid")),
                    str(proc.get("name")),
                    _process_role(proc),
                    "" if worker is None else str(worker),
                ]
                processes.add_metric(labels, proc["memory_used"])
    yield processes


def _process_role(proc: Mapping[str, Any]) -> str:
    if proc.get("mps_server"):
        return "mps_server"
    return "mps_client" if proc.get("mps_client") else "process"


def _coordinator_metrics(stats: Mapping[str, Any] | None) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "cohort_coordinator_up",
        "1 when the coordinator answered stats()",
        value=1.0 if stats else 0.0,
    )
    if not stats:
        return
    yield from _gauge(
        "cohort_coordinator_uptime_seconds", "Coordinator uptime", stats.get("uptime_s")
    )
    mps = stats.get("mps") or {}
    info = GaugeMetricFamily(
        "cohort_mps_info", "MPS mode in use and requested", labels=["mode", "requested"]
    )
    info.add_metric([str(mps.get("mode", "")), str(mps.get("requested", ""))], 1)
    yield info
    yield from _gauge("cohort_queue_depth", "Jobs queued, all workers", stats.get("queued"))
    yield from _gauge(
        "cohort_jobs_in_flight",
        "Jobs sent to workers and not yet answered, all workers",
        stats.get("in_flight"),
    )
    yield from _gauge(
        "cohort_jobs_per_second",
        "Jobs finished per second over the coordinator's recent window",
        stats.get("jobs_per_s"),
    )
    jobs = stats.get("jobs") or {}
    for key in ("submitted", "completed", "failed"):
        if _is_number(jobs.get(key)):
            yield CounterMetricFamily(
                f"cohort_jobs_{key}_total",
                f"Jobs {key} since the coordinator started",
                value=jobs[key],
            )
    errors = CounterMetricFamily(
        "cohort_job_errors_total", "Failed jobs by error type", labels=["error"]
    )
    for error, count in (jobs.get("errors") or {}).items():
        if _is_number(count):
            errors.add_metric([str(error)], count)
    yield errors
    yield _latency(stats.get("latency_ms") or {})
    yield from _worker_metrics(stats.get("workers") or [])
    yield from _model_metrics(stats.get("models") or {})


def _latency(latency_ms: Mapping[str, Any]) -> Metric:
    # Exported as a gauge per quantile: the coordinator sends percentiles, not the
    # count and sum a Prometheus summary needs.
    family = GaugeMetricFamily(
        "cohort_job_latency_seconds",
        "Job latency percentiles over the coordinator's recent jobs",
        labels=["quantile"],
    )
    for key, value in latency_ms.items():
        if str(key).startswith("p") and _is_number(value):
            family.add_metric([_quantile(str(key))], value / 1000.0)
    return family


def _quantile(key: str) -> str:
    """'p50' -> '0.5', 'p999' -> '0.999': the quantile labels Prometheus expects."""
    digits = key[1:]
    return str(float("0." + digits)) if digits.isdigit() else digits


def _worker_metrics(workers: list[Mapping[str, Any]]) -> Iterator[Metric]:
    # State as a label on a constant 1: the usual way to export an enum.
    state = GaugeMetricFamily("cohort_worker_state", "Worker state", labels=["worker", "state"])
    for worker in workers:
        state.add_metric([str(worker.get("id")), str(worker.get("state"))], 1)
    yield state
    for key, name, doc, kind in _WORKER_METRICS:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = cls(name, doc, labels=["worker"])
        for worker in workers:
            if _is_number(worker.get(key)):
                family.add_metric([str(worker.get("id"))], worker[key])
        yield family
    yield from _compile_metrics(workers)
    yield from _plan_metrics(workers)


def _plan_metrics(workers: list[Mapping[str, Any]]) -> Iterator[Metric]:
    labels = ["worker", "group", "op", "inputs"]
    cost = GaugeMetricFamily("cohort_plan_job_cost_seconds",
                             "Measured cost per job of each way a worker can run a kind of call", labels=[*labels, "plan"])
    in_use = GaugeMetricFamily("cohort_plan_in_use", "The plan a worker runs a kind of call with, per jobs at once (1)",
                               labels=[*labels, "jobs", "plan"])
    for worker in workers:
        for plan in worker.get("plans") or []:
            if not isinstance(plan, Mapping):
                continue
            key = [str(worker.get("id")), str(plan.get("group")), str(plan.get("op")), str(plan.get("inputs"))]
            for label, us in (plan.get("per_job_us") or {}).items():
                if _is_number(us):
                    cost.add_metric([*key, str(label)], us / 1e6)
            for jobs, label in (plan.get("in_use") or {}).items():
                in_use.add_metric([*key, str(jobs), str(label)], 1)
    yield from (cost, in_use)


def _compile_metrics(workers: list[Mapping[str, Any]]) -> Iterator[Metric]:
    shapes = GaugeMetricFamily("cohort_worker_compiled_shapes",
                               "Compiled call shapes per worker, by how they came (loaded from the compile cache or "
                               "compiled by the worker)", labels=["worker", "how"])
    seconds = CounterMetricFamily("cohort_worker_compile_seconds", "Seconds a worker spent compiling call shapes",
                                  labels=["worker"])
    refused = CounterMetricFamily("cohort_worker_refused_recompiles", "Compiled calls that would have recompiled in "
                                  "steady state and ran eagerly instead", labels=["worker"])
    for worker in workers:
        info = worker.get("compile")
        if not isinstance(info, Mapping):
            continue
        wid = str(worker.get("id"))
        for how in ("loaded", "compiled"):
            if _is_number(info.get(how)):
                shapes.add_metric([wid, how], info[how])
        if _is_number(info.get("seconds")):
            seconds.add_metric([wid], info["seconds"])
        if _is_number(info.get("recompiles")):
            refused.add_metric([wid], info["recompiles"])
    yield from (shapes, seconds, refused)


def _model_metrics(models: Mapping[str, Any]) -> Iterator[Metric]:
    jobs = CounterMetricFamily(
        "cohort_model_jobs_total", "Jobs finished per model, failed ones included", labels=["model"]
    )
    # The coordinator's per-model "queued" counts jobs accepted and not yet finished,
    # those already running on a worker included.
    queued = GaugeMetricFamily(
        "cohort_model_jobs_unfinished",
        "Jobs accepted for the model and not yet finished (queued or running)",
        labels=["model"],
    )
    version = GaugeMetricFamily(
        "cohort_model_version", "Weights version per model", labels=["model"]
    )
    for model_id, entry in models.items():
        info = entry or {}
        for family, key in ((jobs, "jobs"), (queued, "queued"), (version, "version")):
            if _is_number(info.get(key)):
                family.add_metric([str(model_id)], info[key])
    yield from (jobs, queued, version)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
