"""Backpressure and deadlines: a flood of submits is refused with Overloaded, never lost or hung;
jobs that pass their deadline in the queue are answered with JobTimeout and never run."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import psutil
import pytest
import torch
import zmq
from cohort_harness import mlp_group
from fixture_models import group

from core.codec import client_codec, unbundle
from core.messages import ErrorReply, Replies, SubmitJob
from core.tensors import encode_tensors
from scheduler import JobTimeout

FLOOD = 100_000
FLOOD_THREADS = 2
MAX_QUEUED = 2000
MAX_QUEUED_PER_MODEL = 500
JOB_TIMEOUT_S = 30.0          # far longer than the queue takes to drain (2000 jobs at a few hundred a second)
COORDINATOR_GROWTH_MB = 300
CLIENT_GROWTH_MB = 1024
MB = 1 << 20


def slowish_group() -> dict:
    """Four MLPs with a few ms of work per job on the CPU: the queue fills long before it drains."""
    return mlp_group("m", 4, kwargs={"d_in": 8, "hidden": 128, "d_out": 4, "depth": 4})


class PeakRss:
    """Sample the RSS of some processes in a thread; keep the peaks."""

    def __init__(self, **pids: int) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.baseline = {name: p.memory_info().rss for name, p in self.procs.items()}
        self.peak = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        for name, p in self.procs.items():
            try:
                self.peak[name] = max(self.peak[name], p.memory_info().rss)
            except psutil.Error:
                pass

    def growth_mb(self, name: str) -> float:
        return (self.peak[name] - self.baseline[name]) / MB


def outcome(future: Future) -> str:
    error = future.exception()
    return "ok" if error is None else type(error).__name__


@pytest.mark.timeout(180)
def test_flood_of_submits_is_refused_with_overloaded_and_nothing_is_lost(cohort) -> None:
    running = cohort([slowish_group()], max_queued=MAX_QUEUED, max_queued_per_model=MAX_QUEUED_PER_MODEL)
    x = torch.randn(2, 8)
    with running.client(timeout=JOB_TIMEOUT_S) as c:
        c.infer("m/0", x)  # warm: the worker has run the model once
        before = c.stats()["jobs"]
        per_thread: list[list[Future]] = [[] for _ in range(FLOOD_THREADS)]

        def flood(k: int) -> None:
            futures = per_thread[k]
            for i in range(k, FLOOD, FLOOD_THREADS):
                futures.append(c.submit("infer", f"m/{i % 4}", x))

        with PeakRss(coordinator=running.process.pid, client=psutil.Process().pid) as rss:
            t0 = time.monotonic()
            threads = [threading.Thread(target=flood, args=(k,)) for k in range(FLOOD_THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            submitted_s = time.monotonic() - t0
            futures = [f for fs in per_thread for f in fs]
            done, not_done = wait_futures(futures, timeout=JOB_TIMEOUT_S + 15)
            resolved_s = time.monotonic() - t0
            rss.sample()
        counts = Counter(outcome(f) for f in done)
        stats = c.stats()
        print(f"{len(futures)} submits from {FLOOD_THREADS} threads in {submitted_s:.1f} s; all resolved after "
              f"{resolved_s:.1f} s: {dict(counts)}; not done {len(not_done)}")
        print(f"coordinator RSS baseline {rss.baseline['coordinator'] / MB:.0f} MB, peak +{rss.growth_mb('coordinator'):.1f} MB; "
              f"client RSS baseline {rss.baseline['client'] / MB:.0f} MB, peak +{rss.growth_mb('client'):.1f} MB; "
              f"coordinator jobs {stats['jobs']}")

        assert len(futures) == FLOOD
        assert not not_done, f"{len(not_done)} futures never resolved"
        assert set(counts) <= {"ok", "Overloaded"}, (
            f"futures must end with a result or Overloaded, got {dict(counts)}; "
            f"e.g. {next((f.exception() for f in done if outcome(f) not in ('ok', 'Overloaded')), None)!r}")
        assert counts["Overloaded"] > 0 and counts["ok"] > 0
        # Every answer the coordinator gave reached the client: each completed job, each refusal.
        assert counts["ok"] == stats["jobs"]["completed"] - before["completed"], (dict(counts), stats["jobs"])
        if "rejected" in stats["jobs"]:
            assert counts["Overloaded"] == stats["jobs"]["rejected"] - before["rejected"], (dict(counts), stats["jobs"])
        assert rss.growth_mb("coordinator") < COORDINATOR_GROWTH_MB
        assert rss.growth_mb("client") < CLIENT_GROWTH_MB

    # Afterwards the coordinator serves as before: from a fresh client, a call and a burst that fits the bounds.
    per_thread.clear()
    del futures, done, not_done
    with running.client(timeout=30) as c:
        assert c.infer("m/1", x).shape == (2, 4)
        assert isinstance(c.train_step("m/2", x, torch.zeros(2, dtype=torch.int64)), float)
        burst = [c.submit("infer", f"m/{i % 4}", x) for i in range(400)]
        assert all(f.result(timeout=30).shape == (2, 4) for f in burst)
        stats = c.stats()
        assert stats["queued"] == 0 and stats["in_flight"] == 0
        assert all(m["queued"] == 0 for m in stats["models"].values())


def test_a_client_that_reads_its_answers_late_still_gets_every_one(cohort) -> None:
    """No answer may be dropped because its client did not read for a few seconds (DESIGN 9:
    "past the bound a client gets Overloaded, never silent loss"). The coordinator is full (one
    slow job, max_queued = 1); a raw DEALER socket stands in for a client whose reading stalls (the
    GIL, a slow done-callback, a loaded machine) while it keeps submitting at a steady pace, so the
    coordinator answers Overloaded in many separate messages that wait to be read."""
    running = cohort([group("slow", "sleepy")], max_queued=1)
    n = 6000
    tree, buffers = encode_tensors(torch.zeros(1, 4))
    codec = client_codec()
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(running.address)
    answers: Counter[str] = Counter()
    ids: set[int] = set()
    messages = 0
    with running.client(timeout=60) as c:
        slow = c.submit("infer", "slow/0", torch.full((1, 4), 12.0))  # fills the queue for 12 s
        deadline = time.monotonic() + 10
        while c.stats()["in_flight"] < 1:
            assert time.monotonic() < deadline, "the slow job did not start"
            time.sleep(0.02)
        try:
            t0 = time.monotonic()
            for i in range(1, n + 1):
                job = SubmitJob(i, "infer", "slow/1", tree, timeout_s=60.0)
                socket.send_multipart(codec.encode(job, buffers), copy=False)
                time.sleep(0.001)  # one request per coordinator step: one answer message each
            sent_s = time.monotonic() - t0
            time.sleep(1.0)
            while len(ids) < n and socket.poll(3_000):
                reply, reply_buffers = codec.decode([f.buffer for f in socket.recv_multipart(copy=False)])
                messages += 1
                items = unbundle(reply.replies, reply_buffers) if isinstance(reply, Replies) else [(reply, reply_buffers)]
                for item, _ in items:
                    ids.add(item.req_id)
                    answers[item.error if isinstance(item, ErrorReply) else type(item).__name__] += 1
        finally:
            socket.close(linger=0)
            context.term()
        slow.result(timeout=30)
        coordinator_jobs = c.stats()["jobs"]
    print(f"{n} jobs sent in {sent_s:.1f} s, answers read late: {len(ids)} in {messages} messages "
          f"{dict(answers)}; coordinator jobs {coordinator_jobs}")
    assert set(answers) <= {"JobDone", "Overloaded"}, dict(answers)
    assert len(ids) == n, f"{n - len(ids)} of {n} answers were dropped by the coordinator"


def test_a_thread_that_only_submits_does_not_keep_answered_futures_alive(cohort) -> None:
    """The client must not hold on to futures once they are answered and their caller dropped them."""
    running = cohort([mlp_group("m", 2)])
    x = torch.randn(2, 8)
    refs: list[weakref.ref] = []
    answered, release = threading.Event(), threading.Event()

    def submit_only() -> None:
        futures = [c.submit("infer", "m/0", x) for _ in range(500)]
        wait_futures(futures, timeout=30)
        refs.extend(weakref.ref(f) for f in futures)
        del futures
        answered.set()
        release.wait(30)  # this thread lives on, as a long-running producer would

    with running.client(timeout=30) as c:
        producer = threading.Thread(target=submit_only)
        producer.start()
        try:
            assert answered.wait(60)
            gc.collect()
            kept = sum(r() is not None for r in refs)
        finally:
            release.set()
            producer.join(30)
    print(f"answered futures still alive after the caller dropped them: {kept} of {len(refs)}")
    assert kept == 0, f"the client keeps {kept} of {len(refs)} answered futures alive"


@pytest.mark.parametrize("window", [None, 1], ids=["default_window", "window_1"])
def test_jobs_past_their_deadline_in_the_queue_time_out_and_never_run(cohort, window) -> None:
    settings = {} if window is None else {"window": window}
    running = cohort([group("slow", "sleepy")], **settings)  # slow/0 and slow/1 on one worker
    with running.client(timeout=30) as c:
        time.sleep(0.6)  # the worker reports its compute calls in heartbeats, every 0.25 s
        calls_before = c.stats()["workers"][0]["calls"]
        slow = c.submit("infer", "slow/0", torch.full((1, 4), 3.0))   # sleeps 3 s in the worker
        deadline = time.monotonic() + 10
        while c.stats()["in_flight"] < 1:
            assert time.monotonic() < deadline, "the slow job did not start"
            time.sleep(0.02)
        late = [c.submit("train_step", "slow/0", torch.zeros(1, 4), torch.zeros(1, 4), timeout=0.2) for _ in range(5)]
        late += [c.submit("infer", "slow/1", torch.zeros(1, 4), timeout=0.2) for _ in range(5)]
        for f in late:
            with pytest.raises(JobTimeout):
                f.result(timeout=5)
        slow.result(timeout=30)
        c.barrier()
        time.sleep(0.6)
        after = c.stats()
        versions = {m.id: m.version for m in c.models()}
        ran = after["workers"][0]["calls"] - calls_before
        print(f"window {window or 'default'}: jobs run by the worker {ran} (1 expected), versions {versions}, "
              f"coordinator jobs {after['jobs']}")
        assert versions["slow/0"] == 0, "a train_step that timed out in the queue changed the weights"
        assert ran == 1, f"the worker ran {ran - 1} job(s) that had passed their deadline"
        assert after["jobs"]["errors"].get("JobTimeout") == 10, after["jobs"]
        # Nothing else was disturbed: the same model answers normally afterwards.
        assert c.infer("slow/0", torch.zeros(1, 4), timeout=10).shape == (1, 4)
