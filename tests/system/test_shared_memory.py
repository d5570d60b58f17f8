"""Bulk tensors of a client on the coordinator's machine go through shared memory, not the sockets;
results are the same, and a client that dies mid-call leaves nothing that is not cleaned up."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cohort_harness import mlp_group, stop_and_check_clean

from core.errors import BadInput, JobFailed, JobTimeout
from scheduler import client_core
from scheduler.leftovers import remove_stale

SCALE = {"name": "s", "factory": "examples.models:scale", "kwargs": {"d": 256}, "count": 1,
         "input": {"shape": [-1, 256], "dtype": "float32"}, "loss": "mse", "optimizer": {"name": "sgd", "lr": 0.01}}


def arenas(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"cohort-{pid}-*-arena"))


def test_large_tensors_of_a_local_client_go_through_shared_memory(cohort) -> None:
    running = cohort([SCALE, mlp_group("m", 4, kwargs={"d_in": 256, "hidden": 16, "d_out": 4},
                                       input={"shape": [-1, 256], "dtype": "float32"})], workers=1)
    run_id = running.info["run_id"]
    x = torch.randn(2048, 256)  # 2 MB in, 2 MB out
    with running.client(timeout=60, shm=False) as plain, running.client(timeout=60) as local:
        want = plain.infer("s/0", x)
        got = local.infer("s/0", x)
        assert torch.equal(got, want)
        assert arenas(os.getpid()), "the local client made no arena"
        assert list(Path("/dev/shm").glob(f"cohort-{run_id}-w*-out")), "the worker sent its result through the socket"
        ts = torch.randint(0, 4, (2048,))
        # Losses agree to float32 rounding, not bit for bit: the worker chooses by measuring whether a
        # call over the group runs as one vmap'd call or model by model, which sum in different orders.
        before = plain.evaluate("m", x, ts)
        losses = local.train_round("m", x, ts)  # the shared batch through the arena
        assert losses == pytest.approx(before, rel=1e-5)  # a step's loss is computed before its update
        xs, tss = torch.randn(4, 600, 256), torch.randint(0, 4, (4, 600))  # stacked: sliced by rows in the arena
        assert local.evaluate("m", xs, tss) == pytest.approx(plain.evaluate("m", xs, tss), rel=1e-5)
        weights = {k: torch.randn_like(v) for k, v in plain.get_weights("s/0").items()}
        weights["weight"] = torch.randn(256)
        local.set_weights("s/0", weights)
        assert torch.equal(plain.get_weights("s/0")["weight"], weights["weight"])
        for _ in range(50):  # the ring is reused: regions go back as replies come
            assert torch.equal(local.infer("s/0", x), x * weights["weight"])
    assert arenas(os.getpid()) == [], "the client's arena outlived it"
    assert stop_and_check_clean(running) == 0


def mapped_file(address: int) -> str:
    """The file this process has mapped at ``address`` ('' for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(n, 16) for n in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""


def test_a_local_clients_results_are_tensors_over_shared_memory_held_while_used(cohort) -> None:
    running = cohort([SCALE], workers=1)
    x = torch.randn(2048, 256)
    with running.client(timeout=60) as local:
        w = local.get_weights("s/0")["weight"]
        kept = local.infer("s/0", x)
        assert mapped_file(kept.data_ptr()).endswith("-out"), "the result was copied out of the worker's arena"
        part = kept[100:200]  # a view keeps the region as well
        del kept
        for _ in range(40):  # 80 MB of results come and go around the one still held
            assert torch.equal(local.infer("s/0", x * 2), x * 2 * w)
        assert torch.equal(part, (x * w)[100:200]), "a held result was overwritten"
        assert local.stats()["workers"][0]["restarts"] == 0
    assert stop_and_check_clean(running) == 0


def test_a_shared_input_is_computed_on_where_it_lies(cohort) -> None:
    running = cohort([SCALE], workers=1)
    x = torch.randn(2048, 256)
    with running.client(timeout=60) as local, running.client(timeout=60, shm=False) as remote:
        w = local.get_weights("s/0")["weight"]
        buf = local.shared((2048, 256))
        assert buf.shape == (2048, 256) and buf.dtype == torch.float32
        assert "-arena" in mapped_file(buf.data_ptr())
        buf.copy_(x)
        arena = local._core._arena
        regions = arena.held()
        assert torch.equal(local.infer("s/0", buf), x * w)
        buf.mul_(3)  # filled again in place: the next call sees the new values
        assert torch.equal(local.infer("s/0", buf[:1024]), (3 * x * w)[:1024])  # a contiguous part of it
        assert arena.held() == regions, "the shared input was copied into a region of its own"
        assert torch.equal(local.infer("s/0", buf.t().contiguous().t()), 3 * x * w)  # a copy: still right
        plain = remote.shared((2048, 256))  # no shared memory for this client: an ordinary tensor
        assert mapped_file(plain.data_ptr()) == "" or "-arena" not in mapped_file(plain.data_ptr())
        plain.copy_(x)
        assert torch.equal(remote.infer("s/0", plain), x * w)
        with pytest.raises(BadInput):
            local.shared((-1, 4))
        del buf
        gc.collect()
        local.infer("s/0", x)  # a call takes a region: the freed tensor's is reclaimed on the way
        assert arena.held() < regions
    assert stop_and_check_clean(running) == 0


def test_a_client_that_sees_another_dev_shm_uses_the_sockets(cohort, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a client in another container does, reaching the coordinator over loopback: the two
    identities differ, so nothing goes through an arena the other side cannot see."""
    running = cohort([SCALE], workers=1)
    monkeypatch.setattr(client_core, "shm_identity", lambda: "another-dev-shm")
    x = torch.randn(2048, 256)
    with running.client(timeout=60) as elsewhere:
        w = elsewhere.get_weights("s/0")["weight"]
        got = elsewhere.infer("s/0", x)
        assert torch.equal(got, x * w)
        assert not mapped_file(got.data_ptr()).endswith("-out"), "a result in an arena this client cannot see"
        assert arenas(os.getpid()) == [], "inputs went into an arena the coordinator cannot see"
        assert torch.equal(elsewhere.infer("s/0", x[:8]), (x * w)[:8])
    assert stop_and_check_clean(running) == 0


def test_a_client_killed_mid_call_harms_nothing_and_its_arena_is_cleaned(cohort) -> None:
    running = cohort([SCALE], workers=1)
    script = textwrap.dedent(f"""
        import sys, torch
        from scheduler import Client
        c = Client({running.address!r}, timeout=60)
        c.infer("s/0", torch.randn(4096, 256))  # the worker has read this client's arena
        futures = [c.submit("infer", "s/0", torch.randn(4096, 256)) for _ in range(20)]
        print("submitted", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"submitted"
    [arena] = arenas(child.pid)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    with running.client(timeout=60) as c:
        x = torch.randn(4096, 256)
        assert torch.equal(c.infer("s/0", x), x * c.get_weights("s/0")["weight"])
        worker = c.stats()["workers"][0]
        assert worker["restarts"] == 0
    # The worker that mapped the dead client's arena removes it and lets its memory go.
    maps = Path(f"/proc/{worker['pid']}/maps")
    deadline = time.monotonic() + 10
    while (arenas(child.pid) or arena in maps.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert arenas(child.pid) == [], "the dead client's arena is still there"
    assert arena not in maps.read_text(), "the worker still maps the dead client's arena"
    assert stop_and_check_clean(running) == 0


def test_the_next_start_removes_an_arena_no_worker_read() -> None:
    script = textwrap.dedent("""
        import sys
        from scheduler.client_core import ClientCore
        import torch
        core = ClientCore(shm=True)
        core.shared((1024,), torch.float32)  # its arena is made, and no worker ever maps it
        print("made", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"made"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert arenas(child.pid), "expected the killed client's arena to be left behind"
    remove_stale()  # what the next coordinator start does
    assert arenas(child.pid) == []


def test_a_cpu_coordinator_refuses_tensors_on_a_clients_gpu_and_goes_on(cohort) -> None:
    """CUDA IPC references reach only a GPU coordinator on the client's machine: a CPU one refuses
    them with BadInput (a client only sends them after a hello that says cuda) and keeps serving."""
    from core.cuda_ipc import CudaIpcHandle, CudaRef
    from core.messages import SubmitJob
    from core.tensors import NO_TENSORS, TensorMeta, TensorTree

    running = cohort([SCALE], workers=1)
    handle = CudaIpcHandle(0, b"\x01" * 64, 1 << 20, 0, b"\x02" * 16, 0, b"", False)
    tree = TensorTree("tensor", (TensorMeta("float32", (4, 256)),), cuda=(CudaRef(handle, "GPU-x", 0),))
    with running.client(timeout=30) as c:
        forged = client_core.Call("infer", SubmitJob(0, "infer", "s/0", tree, NO_TENSORS), client_core.as_outputs)
        with pytest.raises(BadInput, match="CUDA IPC"):
            c._call(forged, 30)
        x = torch.randn(4, 256)
        assert torch.equal(c.infer("s/0", x), x)  # the scale model starts at ones
    assert stop_and_check_clean(running) == 0


def held_regions(run_id: str) -> list[int]:
    """Offsets of the regions a worker's result arena holds (state 1 in a region header)."""
    [path] = Path("/dev/shm").glob(f"cohort-{run_id}-w*-out*")
    data = path.read_bytes()[: 32 << 20]
    return [at for at in range(0, len(data) - 16, 64)
            if int.from_bytes(data[at:at + 8], "little") == 1 and 0 < int.from_bytes(data[at + 8:at + 16], "little") < 10_000]


def test_a_result_that_comes_after_its_call_timed_out_is_given_back(cohort) -> None:
    sleepy = {**SCALE, "name": "z", "factory": "fixture_models:sleepy", "kwargs": {"d": 256}}
    running = cohort([sleepy], workers=1)
    x = torch.randn(2048, 256)  # 2 MB out: the result comes in the worker's arena
    x[0, 0] = 0
    with running.client(timeout=60) as c:
        c.infer("z/0", x)
        gc.collect()
        slow = x.clone()
        slow[0, 0] = 1.5
        with pytest.raises(JobTimeout):
            c.infer("z/0", slow, timeout=0.5)
        time.sleep(2.0)  # the late answer comes while the next call waits for its own
        got = c.infer("z/0", x)
        del got
        gc.collect()
        assert held_regions(running.info["run_id"]) == [], "a late result's region is held for good"
    assert stop_and_check_clean(running) == 0


def test_a_failed_part_is_answered_only_once_the_others_stopped_reading_the_clients_memory(cohort, tmp_path) -> None:
    seen = tmp_path / "seen.txt"
    group = {**SCALE, "name": "g", "factory": "fixture_models:witness", "kwargs": {"d": 256, "seen": str(seen)},
             "count": 2, "loss": "cross_entropy"}
    running = cohort([group], workers=2)
    with running.client(timeout=60) as c:
        assert len({w["id"] for w in c.stats()["workers"] if w["models"]}) == 2, "one model on each worker"
        xs = c.shared((2, 1024, 256))
        xs.copy_(torch.ones(2, 1024, 256))
        xs[0, 0, 1] = 5000.0  # model 0 fails at once
        xs[1, 0, 0] = 1.5  # model 1 reads its rows after 1.5 s
        want = float(xs[1].double().sum())
        with pytest.raises(JobFailed, match="too hot"):
            c.evaluate("g", xs, torch.randint(0, 4, (2, 1024)))
        xs.fill_(3.0)  # answered: the caller may reuse its buffer now
        deadline = time.monotonic() + 10
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert [float(v) for v in seen.read_text().split()] == [want]
    assert stop_and_check_clean(running) == 0


def test_a_client_pid_that_names_no_process_never_crashes_the_worker(cohort, monkeypatch) -> None:
    mlp = mlp_group("m", 1, kwargs={"d_in": 8, "hidden": 16, "d_out": 65536})  # 1 MB results: the worker's arena
    running = cohort([mlp], workers=1)
    x = torch.randn(4, 8)
    start = client_core.ClientCore.start

    def forged(self, call, timeout, now=None):
        call = start(self, call, timeout, now)
        if isinstance(call.message, client_core.SubmitJob):
            call.message.client_pid = 1 << 40
        return call

    with running.client(timeout=30) as good:
        want = good.infer("m/0", x)
        with running.client(timeout=30) as bad:
            monkeypatch.setattr(client_core.ClientCore, "start", forged)
            kept = bad.infer("m/0", x)
            monkeypatch.setattr(client_core.ClientCore, "start", start)
            time.sleep(1.2)  # the worker checks its readers about once a second
            for _ in range(3):
                assert torch.equal(good.infer("m/0", x), want)
            assert torch.equal(kept, want)
        assert good.stats()["workers"][0]["restarts"] == 0
    assert stop_and_check_clean(running) == 0
