"""Routing a cluster call to its coordinators and joining the answers, without Ray or sockets."""

from __future__ import annotations

import inspect
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

import scheduler
from core.errors import BadInput, ProtocolError, UnknownModel, WorkerDied
from core.messages import ModelInfo
from scheduler.client_api import PUBLIC_CALLS, BaseClient
from scheduler.cluster.client import ClusterClient
from scheduler.cluster.layout import plan_layout
from scheduler.cluster.routing import ROUTES, Placement, Router, SubCall, join
from scheduler.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def table(counts: dict[str, int], coordinators: int = 2, **states: str) -> dict[str, Any]:
    raw = {"group": [{"name": n, "factory": "examples.models:mlp", "count": k,
                      "input": {"shape": [-1, 8], "dtype": "float32"}} for n, k in counts.items()]}
    layout = plan_layout(parse_config(raw), coordinators)
    return {"version": 3, "owner_alive": True, "layout": layout.as_dict(),
            "coordinators": {i: {"address": f"ipc:///c{i}", "state": states.get(f"c{i}", "up"), "incarnation": 1,
                                 "reason": "restarts spent"} for i in range(coordinators)}}


def router(counts: dict[str, int] | None = None, **states: str) -> Router:
    return Router(Placement(table(counts or {"m": 6}, **states)))


# ---------------------------------------------------------------------- the public surface


def test_every_public_call_of_client_is_routed_with_its_signature() -> None:
    """A call added to Client (client_api.PUBLIC_CALLS) must get a route, or this fails naming it."""
    missing = [name for name in PUBLIC_CALLS if name not in ROUTES]
    assert missing == [], f"add these calls to scheduler/cluster/routing.py ROUTES: {missing}"
    for name in PUBLIC_CALLS:
        assert inspect.signature(getattr(ClusterClient, name)) == inspect.signature(getattr(scheduler.Client, name))
        assert getattr(ClusterClient, name).__doc__ == getattr(BaseClient, name).__doc__
        assert inspect.iscoroutinefunction(getattr(scheduler.AsyncClusterClient, name)), name
    for flavour, cluster in ((scheduler.Client, ClusterClient), (scheduler.AsyncClient, scheduler.AsyncClusterClient)):
        assert inspect.signature(cluster.map) == inspect.signature(flavour.map)  # built on submit alone
    for option in inspect.signature(scheduler.Client).parameters:  # the same options, but the address
        if option != "address":
            assert option in inspect.signature(ClusterClient).parameters, option


def test_import_scheduler_loads_neither_ray_nor_the_cluster() -> None:
    code = ("import sys, scheduler; assert 'ray' not in sys.modules and 'scheduler.cluster' not in sys.modules; "
            "from scheduler import ClusterClient, AsyncClusterClient; assert 'ray' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------- routes


def test_a_model_call_goes_to_its_coordinator_with_its_local_id() -> None:
    r = router()
    x = torch.randn(2, 8)
    sub = r.to_model("infer", ("m/4", x), {"timeout": 3})
    assert (sub.coordinator, sub.args[0], sub.args[1] is x, sub.kwargs) == (1, "m/1", True, {"timeout": 3})
    assert r.to_model("get_weights", (), {"model": "m/2"}).kwargs == {"model": "m/2"}
    for bad in ("m/6", "m/x", "nope/1", "m"):
        with pytest.raises(UnknownModel):
            r.to_model("infer", (bad, x), {})
    with pytest.raises(WorkerDied, match="coordinator 1 .*m/3..5.* is failed: restarts spent"):
        router(c1="failed").to_model("infer", ("m/5", x), {})


def test_stacked_inputs_and_targets_are_cut_shared_ones_are_not() -> None:
    r = router({"m": 5})
    xs, ts = torch.randn(5, 4, 8), torch.randint(0, 4, (5, 4))
    plan = r.to_group("train_round", ("m", xs, ts), {"timeout": 1})
    assert [c.coordinator for c in plan.calls] == [0, 1]
    assert torch.equal(plan.calls[1].args[1], xs[3:]) and torch.equal(plan.calls[1].args[2], ts[3:])
    x, t = xs[0], ts[0]
    shared = r.to_group("train_round", ("m", x, t), {})
    assert all(c.args[1] is x and c.args[2] is t for c in shared.calls)
    with pytest.raises(BadInput, match="need 5 rows for group 'm', got 4"):
        r.to_group("train_round", ("m", xs[:4], ts[:4]), {})
    ensemble = r.to_group("ensemble", ("m", torch.randn(5, 8)), {}, rows=False)
    assert all(c.args[1].shape == (5, 8) for c in ensemble.calls)
    keyword = r.to_group("evaluate", ("m",), {"inputs": xs, "targets": ts})
    assert keyword.calls[0].kwargs["targets"].shape == (3, 4)


def test_per_model_keyword_lists_are_cut_scalars_are_not() -> None:
    plan = router({"m": 5}).to_group("set_hparams", ("m",), {"lr": [0.1, 0.2, 0.3, 0.4, 0.5], "momentum": 0.9})
    assert [c.kwargs for c in plan.calls] == [{"lr": [0.1, 0.2, 0.3], "momentum": 0.9},
                                              {"lr": [0.4, 0.5], "momentum": 0.9}]
    with pytest.raises(BadInput, match="lr has 2 values; give one, or one per model \\(5\\)"):
        router({"m": 5}).to_group("set_hparams", ("m",), {"lr": [0.1, 0.2]})


def test_results_join_in_model_order() -> None:
    a, b = torch.zeros(2, 3), torch.ones(1, 3)
    assert torch.equal(join([a, b]), torch.cat([a, b]))
    assert [t.shape[0] for t in join([(a, a), (b, b)])] == [3, 3]
    assert join([{"y": a}, {"y": b}])["y"].shape == (3, 3)
    assert join([[1.0, 2.0], [3.0]]) == [1.0, 2.0, 3.0]
    assert join([{"lr": [0.1]}, {"lr": [0.2, 0.3]}]) == {"lr": [0.1, 0.2, 0.3]}
    assert join([None, None]) is None


def test_barrier_scopes_go_to_the_coordinators_they_name() -> None:
    r = router({"m": 6, "n": 1})
    assert [(c.coordinator, c.args) for c in r.barrier((None,), {}).calls] == [(0, (None,)), (1, (None,))]
    plan = r.barrier((["m/4", "n", "m/0"],), {"timeout": 2})
    assert [(c.coordinator, c.args[0]) for c in plan.calls] == [(0, ["n", "m/0"]), (1, ["m/1"])]
    assert [c.coordinator for c in r.barrier(("n",), {}).calls] == [0]


def test_models_come_back_under_cluster_ids() -> None:
    r = router({"m": 5})
    plan = r.models({})
    local = [[ModelInfo(f"m/{i}", "m", i, 0, 0, "cpu") for i in range(3)],
             [ModelInfo(f"m/{i}", "m", i, 1, 7, "cpu") for i in range(2)]]
    out = plan.join(local)
    assert [(m.id, m.index, m.coordinator, m.worker, m.version) for m in out][2:] == [
        ("m/2", 2, 0, 0, 0), ("m/3", 3, 1, 1, 7), ("m/4", 4, 1, 1, 7)]


def test_submit_routes_by_its_target() -> None:
    r = router({"m": 4})
    one = r.submit(("infer", "m/3", torch.randn(1, 8)), {})
    assert isinstance(one, SubCall) and one.coordinator == 1 and one.args[1] == "m/1"
    plan = r.submit(("train_round", "m", torch.randn(4, 2, 8), torch.zeros(4, 2, dtype=torch.long)), {})
    assert [c.args[2].shape[0] for c in plan.calls] == [2, 2]
    ensemble = r.submit(("ensemble", "m", torch.randn(4, 8)), {})
    assert [c.args[2].shape[0] for c in ensemble.calls] == [4, 4]


def test_copy_checks_groups() -> None:
    r = router({"m": 4, "n": 2})
    assert r.copy("m/0", "m/3") == ((0, "m/0"), (1, "m/1"))
    with pytest.raises(BadInput, match="different groups"):
        r.copy("m/0", "n/1")


# ---------------------------------------------------------------------- ClusterClient over fake coordinators


class FakeClient:
    """A coordinator's ``Client``: answers from its own little table of models."""

    made: list[FakeClient] = []

    def __init__(self, address: str, **options: Any) -> None:
        self.address = address
        self.sent: list[tuple[str, Any]] = []
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.closed = False
        self.fail: Exception | None = None
        self.stats_answer: dict[str, Any] | None = None
        FakeClient.made.append(self)

    def _submit(self, call: Any, timeout: float | None) -> Future[Any]:
        self.sent.append((call.op, call.message))
        future: Future[Any] = Future()
        if self.fail is not None:
            future.set_exception(self.fail)
        elif call.op == "stats":
            future.set_result(self.stats_answer)
        elif call.op == "train_round":
            rows = call.message.inputs.metas[0].shape[0]
            future.set_result([float(len(self.address))] * rows)
        else:
            future.set_result(None)
        return future

    def get_weights(self, model: str, *, optimizer_state: bool = False, timeout: float | None = None) -> Any:
        self.sent.append(("get_weights", (model, optimizer_state)))
        return {"w": torch.full((2,), float(model.rpartition("/")[2]))}

    def set_weights(self, model: str, weights: Any, *, optimizer_state: bool = False,
                    timeout: float | None = None) -> None:
        self.sent.append(("set_weights", (model, optimizer_state)))
        self.weights[model] = weights

    def copy_weights(self, src: str, dst: str, *, timeout: float | None = None) -> None:
        self.sent.append(("copy_weights", (src, dst)))

    def barrier(self, scope: Any = None, *, timeout: float | None = None) -> None:
        self.sent.append(("barrier", scope))

    def infer(self, model: str, inputs: Any, *, timeout: float | None = None) -> Any:
        if self.fail is not None:
            raise self.fail
        return model

    def close(self) -> None:
        self.closed = True


class FakeRay:
    def __init__(self, tables: list[dict[str, Any]]) -> None:
        self.tables = tables
        self.closed = False

    def table(self) -> dict[str, Any]:
        return self.tables.pop(0) if len(self.tables) > 1 else self.tables[0]

    def close(self) -> None:
        self.closed = True


def fake_cluster(*tables: dict[str, Any]) -> ClusterClient:
    c = ClusterClient.__new__(ClusterClient)
    c.ray_address, c.timeout = "auto", 5.0
    c._options, c._clients, c._retired = {}, {}, []
    import threading

    c._lock = threading.Lock()
    c._flavour = FakeClient  # type: ignore[assignment]
    c._ray = FakeRay(list(tables))  # type: ignore[assignment]
    c._use(c._ray.table())
    return c


def test_a_group_call_goes_out_to_every_block_before_any_answer_and_joins() -> None:
    c = fake_cluster(table({"m": 5}))
    losses = c.train_round("m", torch.randn(5, 2, 8), torch.zeros(5, 2, dtype=torch.long))
    assert losses == [9.0] * 5  # each block's answer, in model order
    assert [len(fake.sent) for fake in c._clients.values()] == [1, 1]
    future = c.submit("train_round", "m", torch.randn(5, 2, 8), torch.zeros(5, 2, dtype=torch.long))
    assert future.result(1) == [9.0] * 5
    c.barrier(["m/4"])
    assert [op for op, _ in c._clients[1].sent] == ["train_round", "train_round", "barrier"]
    c.close()
    assert all(fake.closed for fake in c._clients.values()) or not c._clients


def test_copy_across_coordinators_moves_weights_and_optimizer_state() -> None:
    c = fake_cluster(table({"m": 4}))
    c.copy_weights("m/1", "m/2")  # 0:m/1 -> 1:m/0
    assert c._clients[0].sent == [("get_weights", ("m/1", True))]
    assert c._clients[1].sent == [("set_weights", ("m/0", True))]
    assert torch.equal(c._clients[1].weights["m/0"]["w"], torch.ones(2))
    c.copy_weights("m/0", "m/1")
    assert c._clients[0].sent[-1] == ("copy_weights", ("m/0", "m/1"))


def test_a_dropped_connection_rereads_the_table_and_follows_a_moved_coordinator() -> None:
    moved = table({"m": 4})
    moved["coordinators"][1]["address"] = "ipc:///c1-new"
    c = fake_cluster(table({"m": 4}), moved)
    old = c._clients[1]
    old.fail = ProtocolError("the connection dropped")
    with pytest.raises(ProtocolError):
        c.infer("m/3", torch.randn(1, 8))
    assert c._clients[1].address == "ipc:///c1-new" and c._clients[1] is not old
    assert c.infer("m/3", torch.randn(1, 8)) == "m/1"
    c.close()
    assert old.closed  # retired clients are closed with the cluster client


def test_a_coordinator_down_for_good_fails_calls_at_once_but_not_stats() -> None:
    c = fake_cluster(table({"m": 4}, c1="failed"))
    with pytest.raises(WorkerDied, match="coordinator 1"):
        c.models()
    with pytest.raises(WorkerDied, match="coordinator 1"):
        c.barrier()
    with pytest.raises(WorkerDied, match="coordinator 1"):
        c.snapshot("/tmp/never")
    c._clients[0].stats_answer = {"models": {"m/1": {"jobs": 5}}, "jobs_per_s": 2.0}
    stats = c.stats()
    assert [e["error"] is None for e in stats["coordinators"]] == [True, False]
    assert "failed: restarts spent" in stats["coordinators"][1]["error"] and stats["models"] == {
        "m/1": {"jobs": 5, "coordinator": 0}}
