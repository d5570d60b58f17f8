"""``ClusterClient`` and ``AsyncClusterClient``: the calls of ``Client``, over every coordinator of a cluster.

    from scheduler import ClusterClient
    with ClusterClient(ray_address="auto") as c:     # the same calls as Client
        c.models()                                   # ModelInfo.coordinator: which coordinator holds it
        c.ensemble("mlp", x)                         # [K, ...] in model order, over every coordinator
        c.copy_weights(src="mlp/0", dst="mlp/900")   # across coordinators too

Ray is used to find the cluster, and nothing else: the placement table is read from the
``cohort-directory`` actor once (again when a coordinator's connection drops), and every
call then goes over ZeroMQ straight to the coordinators, through one ``Client`` (or
``AsyncClient``) each. How each call is cut and joined is ``routing``'s; a call on one
model is one plain ``Client`` call on its coordinator with that coordinator's id for it.

Calls on several coordinators are sent from the calling thread, one request per
coordinator, before any answer is awaited (``Client``'s ``_submit``, the path of
``submit``), so they run concurrently and a thread's requests still reach each
coordinator in the order it made them. The answer waits for every part; the first
error in model order is raised (parts on other coordinators may have run: a failed
``train_round`` may have stepped some blocks).

A coordinator that restarts (Ray brings it back after a death) keeps its address when
it can: calls in flight when it died fail (``ProtocolError``, as with ``Client``), calls
made while it restarts wait for it within their timeout, and it serves its models again
restored from their last host copies (or, where those are gone, their last snapshot). When a connection drops, the table is read again, so
a coordinator that had to move is found at its new address by the next call.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from core.errors import ConfigError, JobTimeout, ProtocolError, WorkerDied
from core.tensors import DEFAULT_MAX_MESSAGE_BYTES
from scheduler.client import Client, submitted_map
from scheduler.client_api import PUBLIC_CALLS, BaseClient
from scheduler.client_async import AsyncClient
from scheduler.client_core import DEFAULT_TIMEOUT_S, Call
from scheduler.cluster import NAMESPACE, SUPERVISOR_NAME
from scheduler.cluster.routing import (
    ROUTES,
    Coordinator,
    Placement,
    Plan,
    Router,
    SubCall,
    first_error,
    is_model_id,
)
from scheduler.security import CurveClient

__all__ = ["AsyncClusterClient", "ClusterClient"]

WAIT_MARGIN_S = 5.0  # past a part's own deadline, how long to wait for its client to say so
RAY_TIMEOUT_S = 30.0
RESTARTING = (ProtocolError, JobTimeout)  # a connection that dropped, or nobody listening


class _Builder(BaseClient):
    """A ``BaseClient`` whose calls return the ``Call`` they would make, and its timeout, unsent."""

    def __init__(self) -> None:  # no address, no core: it only builds
        pass

    def _call(self, call: Call, timeout: float | None) -> tuple[Call, float | None]:
        return call, timeout

    _submit = _call


_BUILDER = _Builder()


class RayLink:
    """The client's tie to Ray: the directory actor (and supervisors, for snapshots)."""

    def __init__(self, ray_address: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("ClusterClient needs Ray: pip install 'cohort[ray]'") from None
        from scheduler.cluster.directory import find_directory
        from scheduler.cluster.raylocal import answers, existing_address

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = existing_address(ray_address)
            if address is None:
                raise ConfigError("no Ray cluster found for ray_address='auto' (no $RAY_ADDRESS, no running `ray start`);"
                                  " start one with `cohort cluster --config FILE`")
            if not address.startswith("ray://") and not answers(address, 3.0):  # ray.init would retry for minutes
                raise ConfigError(f"no Ray cluster answers at {address}")
            in_main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if in_main else None
            ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
            if in_main:  # ray.init makes SIGTERM exit the process; a library leaves the caller's handler alone
                signal.signal(signal.SIGTERM, previous)
            self.started = True
        self.directory = find_directory()

    def check(self, table: dict[str, Any]) -> dict[str, Any]:
        if not table.get("layout") or not table.get("owner_alive"):
            raise ConfigError("the cohort cluster on this Ray cluster is not running (its `cohort cluster` process "
                              "stopped or died); start it again")
        return table

    def table(self) -> dict[str, Any]:
        return self.check(self.ray.get(self.directory.table.remote(), timeout=RAY_TIMEOUT_S))

    def supervisor(self, index: int) -> Any:
        return self.ray.get_actor(SUPERVISOR_NAME.format(index=index), namespace=NAMESPACE)

    def publish(self, staging: dict[int, str], final: str) -> list[Any]:
        """Refs of each coordinator's snapshot files moved to ``final`` under the cluster's indices."""
        return [self.supervisor(c).publish_snapshot.remote(path, final) for c, path in staging.items()]

    def record_snapshot(self, path: str) -> Any:
        return self.directory.record_snapshot.remote(path)

    def transfer(self, src: int, src_model: str, dst: int, dst_model: str, timeout: float) -> Any:
        """Ref of ``src_model``'s weights and optimizer state read by coordinator ``src``'s supervisor and
        written to ``dst_model`` by ``dst``'s: the bytes go node to node through Ray's object store,
        never through this client."""
        weights = self.supervisor(src).read_weights.remote(src_model, timeout)
        return self.supervisor(dst).write_weights.remote(dst_model, weights, timeout)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


class _ClusterBase:
    """What both flavours share: options, the placement table and its router, the routing decision."""

    _flavour: type[BaseClient] = Client

    def __init__(self, ray_address: str = "auto", *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, curve: CurveClient | None = None,
                 shm: bool | None = None, cuda_ipc: bool = False, local_link: bool = True) -> None:
        self.ray_address = ray_address
        self.timeout = timeout
        # Each coordinator's client as ``Client`` would be made for it (``shm``: large tensors through shared
        # memory to a coordinator on this machine; None decides by its address).
        self._options: dict[str, Any] = {"timeout": timeout, "max_message_bytes": max_message_bytes,
                                         "curve": curve or CurveClient.from_env(), "shm": shm,
                                         "cuda_ipc": cuda_ipc}
        if self._flavour is Client:  # a coordinator on this host over its Unix socket (AsyncClient: ZeroMQ only)
            self._options["local_link"] = local_link
        self._lock = threading.Lock()
        self._clients: dict[int, Any] = {}
        self._retired: list[Any] = []  # clients of a former address: closed with this client
        self._ray = RayLink(ray_address)
        try:
            self._use(self._ray.table())
        except BaseException:
            self._ray.close()
            raise

    def coordinators(self) -> list[Coordinator]:
        """Every coordinator as last read from the directory (``refresh`` reads it again): address, state,
        incarnation, node, GPU."""
        return [self._placement.coordinators[i] for i in sorted(self._placement.coordinators)]

    def _use(self, table: dict[str, Any]) -> None:
        """Route by ``table`` from now on; a new client for each coordinator whose address changed."""
        placement = Placement(table)
        with self._lock:
            for index, coordinator in placement.coordinators.items():
                current = self._clients.get(index)
                if current is None or current.address != coordinator.address:
                    if current is not None:
                        self._retired.append(current)
                    if coordinator.address:
                        self._clients[index] = self._flavour(coordinator.address, **self._options)
            self._placement = placement
            self._router = Router(placement)

    def _route(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
        """``(how, what)``: ``one`` SubCall, ``fan`` Plan, or a call of its own (``copy``, ``snapshot``, ``stats``)."""
        route = ROUTES.get(name)
        if route is None:
            raise NotImplementedError(f"{name} has no route in scheduler/cluster/routing.py ROUTES")
        router, kind = self._router, route.kind
        if kind == "either":
            target = args[0] if args else next((kwargs[k] for k in ("model", "target", "group") if k in kwargs), None)
            kind = "model" if is_model_id(target) else "group"
        if kind == "model":
            return "one", router.to_model(name, args, kwargs)
        if kind == "group":
            return "fan", router.to_group(name, args, kwargs, rows=route.rows)
        if kind == "submit":
            routed = router.submit(args, kwargs)
            return ("one", routed) if isinstance(routed, SubCall) else ("submit", routed)
        if kind == "models":
            return "fan", router.models(kwargs)
        if kind == "barrier":
            return "fan", router.barrier(args, kwargs)
        return kind, (args, kwargs)

    def _stats_plan(self, kwargs: dict[str, Any]) -> Plan:
        return self._router.everywhere("stats", (), kwargs, serving_only=True)  # a monitor must not wait on the dead

    def _join_stats(self, plan: Plan, outcomes: list[Any]) -> dict[str, Any]:
        """Every coordinator's ``stats()`` (or why it gave none), their models under cluster ids, and sums."""
        placement = self._placement
        answers = {call.coordinator: outcome for call, outcome in zip(plan.calls, outcomes)}
        entries, models = [], {}
        for index in range(placement.layout.coordinators):
            c = placement.coordinators.get(index, Coordinator(index, ""))
            outcome = answers.get(index, WorkerDied(f"coordinator {index} is {c.state}: {c.reason}"))
            ok = isinstance(outcome, dict)
            entries.append({"index": index, "address": c.address, "state": c.state, "incarnation": c.incarnation,
                            "node": c.node, "gpu": c.gpu, "stats": outcome if ok else None,
                            "error": None if ok else f"{type(outcome).__name__}: {outcome}"})
            for local_id, figures in (outcome.get("models", {}) if ok else {}).items():
                group, _, local = local_id.rpartition("/")
                cluster_index = placement.global_id(index, group, int(local))
                models[f"{group}/{cluster_index}"] = {**figures, "coordinator": index}
        if not any(e["stats"] for e in entries):  # nothing answered: raise why the first did not
            error = first_error([answers.get(i) for i in range(placement.layout.coordinators)])
            raise error if error is not None else WorkerDied("no coordinator is serving")
        answered = [e["stats"] for e in entries if e["stats"]]
        return {"cluster": True, "directory_version": placement.version, "coordinators": entries,
                "models": dict(sorted(models.items(), key=_model_order)),
                **{key: sum(s.get(key, 0) or 0 for s in answered) for key in ("jobs_per_s", "queued", "in_flight")}}

    def _snapshot_parts(self, path: Any) -> tuple[str, dict[int, str]]:
        final = os.path.abspath(os.fspath(path))
        token = uuid.uuid4().hex[:8]
        calls = self._router.everywhere("snapshot", (), {}).calls  # WorkerDied at once if one is down for good
        return final, {call.coordinator: os.path.join(final, f".cohort-c{call.coordinator}-{token}") for call in calls}

    @staticmethod
    def _snapshot_detail(final: str, details: list[dict[str, Any]], moved: list[int]) -> dict[str, Any]:
        return {"path": final, "files": sum(moved), "bytes": sum(d.get("bytes", 0) for d in details),
                "seconds": max((d.get("seconds", 0.0) for d in details), default=0.0), "coordinators": details}


def _model_order(item: tuple[str, Any]) -> tuple[str, int]:
    group, _, index = item[0].rpartition("/")
    return group, int(index)


def _public_calls(cls: type, coroutine: bool) -> type:
    """Give ``cls`` every public call of ``Client``, same name, signature and doc, each routed by ``_invoke``."""
    for name in PUBLIC_CALLS:
        template = getattr(BaseClient, name)
        if coroutine:
            async def method(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
                return await self._invoke(_name, args, kwargs)
        else:
            def method(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
                return self._invoke(_name, args, kwargs)
        functools.update_wrapper(method, template)
        method.__signature__ = inspect.signature(template)  # type: ignore[attr-defined]
        setattr(cls, name, method)
    return cls


# ---------------------------------------------------------------------- threads


@functools.partial(_public_calls, coroutine=False)
class ClusterClient(_ClusterBase):
    """``Client``'s calls over a cohort cluster; see the module docstring.

    >>> with ClusterClient(ray_address="auto") as c:
    ...     ys = c.ensemble("mlp", x)
    """

    _flavour = Client
    def map(self, op: str, target: str, inputs: Iterable[Any], targets: Iterable[Any] | None = None, *,
            depth: int = 4, timeout: float | None = None) -> Iterator[Any]:
        """As ``Client.map``, built on ``submit`` alone: over the cluster as over one coordinator."""
        return submitted_map(self, op, target, inputs, targets, depth=depth, timeout=timeout)

    def close(self) -> None:
        """Close every coordinator's client; leave Ray if this client joined it."""
        with self._lock:
            clients, self._clients = [*self._clients.values(), *self._retired], {}
            self._retired = []
        for client in clients:
            client.close()
        self._ray.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Read the placement table again (done by itself when a coordinator's connection drops)."""
        self._use(self._ray.table())

    def coordinators(self) -> list[Coordinator]:
        """Every coordinator as the directory lists it now: address, state, incarnation, node, GPU."""
        self.refresh()
        return super().coordinators()

    def _invoke(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        how, what = self._route(name, args, kwargs)
        if how == "one":
            return self._one(what)
        if how == "fan":
            return self._fan(what)
        if how == "submit":
            return self._submit_parts(what)
        if how == "copy":
            return self._copy(*what[0], **what[1])
        if how == "snapshot":
            return self._snapshot(*what[0], **what[1])
        if how == "stats":
            plan = self._stats_plan(what[1])
            return self._join_stats(plan, self._outcomes(plan))
        raise NotImplementedError(how)

    def _one(self, sub: SubCall) -> Any:
        try:
            return getattr(self._clients[sub.coordinator], sub.name)(*sub.args, **sub.kwargs)
        except RESTARTING:
            self._refresh_quietly()
            raise

    def _fan(self, plan: Plan) -> Any:
        if len(plan.calls) == 1:
            return plan.join([self._one(plan.calls[0])])
        outcomes = self._outcomes(plan)
        error = first_error(outcomes)
        if error is not None:
            raise error
        return plan.join(outcomes)

    def _send(self, plan: Plan) -> list[tuple[Future[Any], float]]:
        """Send every part from this thread (in order with its other requests), none awaited yet;
        each part's future and how long it may take."""
        calls = [(sub, *getattr(BaseClient, sub.name)(_BUILDER, *sub.args, **sub.kwargs)) for sub in plan.calls]
        sent = []
        for sub, call, timeout in calls:
            try:
                future = self._clients[sub.coordinator]._submit(call, timeout)
            except Exception as exc:  # noqa: BLE001 - a part that could not go fails alone
                future = Future()
                future.set_exception(exc)
            sent.append((future, self.timeout if timeout is None else timeout))
        return sent

    def _outcomes(self, plan: Plan) -> list[Any]:
        """Every part's result, or its exception, in the plan's order."""
        outcomes: list[Any] = []
        for future, wait in self._send(plan):
            try:
                outcomes.append(future.result(timeout=wait + WAIT_MARGIN_S))
            except FutureTimeout:
                outcomes.append(JobTimeout(f"no answer within {wait} s"))
            except Exception as exc:  # noqa: BLE001 - kept in its place, raised by the caller
                outcomes.append(exc)
        if any(isinstance(o, RESTARTING) for o in outcomes):
            self._refresh_quietly()
        return outcomes

    def _submit_parts(self, plan: Plan) -> Future[Any]:
        """``submit`` on a group: one future that settles once every part has (joined, or the first error)."""
        parts = [future for future, _ in self._send(plan)]
        joined: Future[Any] = Future()
        joined.set_running_or_notify_cancel()
        left = [len(parts)]
        lock = threading.Lock()

        def settle(_: Future[Any]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            outcomes = [f.exception() or f.result() for f in parts]
            error = first_error(outcomes)
            try:
                if error is not None:
                    joined.set_exception(error)
                else:
                    joined.set_result(plan.join(outcomes))
            except Exception as exc:  # noqa: BLE001 - a join that fails fails the future
                joined.set_exception(exc)

        for part in parts:
            part.add_done_callback(settle)
        return joined

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - the call's own error is what the caller must see
            pass

    def _copy(self, src: str, dst: str, *, timeout: float | None = None, through_ray: bool | None = None) -> None:
        """Within a coordinator, its own copy; across two, the model's weights and optimizer state read
        from one and written to the other (what ``copy_weights`` moves): on one node through this
        client (shared memory, when it is on that node too), across nodes (``through_ray``: None
        decides by the directory's nodes) by the two supervisors through Ray's object store, after
        a barrier on each model so that this client's earlier calls on them come first."""
        (cs, ls), (cd, ld) = self._router.copy(src, dst)
        if cs == cd:
            return self._one(SubCall(cs, "copy_weights", (ls, ld), {"timeout": timeout}))
        if through_ray is None:
            nodes = self._placement.coordinators
            through_ray = bool(nodes[cs].node and nodes[cd].node and nodes[cs].node != nodes[cd].node)
        if through_ray:
            t = self.timeout if timeout is None else timeout
            deadline = time.monotonic() + t
            self._fan(Plan([SubCall(cs, "barrier", ([ls],), {"timeout": t}),
                            SubCall(cd, "barrier", ([ld],), {"timeout": t})], lambda _: None))
            left = max(0.001, deadline - time.monotonic())
            try:  # the read and the write share what is left of the call's time
                self._ray.ray.get(self._ray.transfer(cs, ls, cd, ld, left / 2), timeout=left)
            except self._ray.ray.exceptions.GetTimeoutError:
                raise JobTimeout(f"copy_weights {src} -> {dst}: not done within {t} s") from None
            return None
        weights = self._one(SubCall(cs, "get_weights", (ls,), {"optimizer_state": True, "timeout": timeout}))
        return self._one(SubCall(cd, "set_weights", (ld, weights), {"optimizer_state": True, "timeout": timeout}))

    def _snapshot(self, path: Any, *, timeout: float | None = None) -> dict[str, Any]:
        """Each coordinator writes its models to a staging directory, which its supervisor (on its node)
        moves to ``path/<group>/<index>.safetensors`` under the cluster's indices."""
        final, staging = self._snapshot_parts(path)
        details = self._fan(Plan([SubCall(c, "snapshot", (p,), {"timeout": timeout}) for c, p in staging.items()],
                                 list))
        ray = self._ray.ray
        moved = ray.get(self._ray.publish(staging, final), timeout=self.timeout if timeout is None else timeout)
        ray.get(self._ray.record_snapshot(final), timeout=RAY_TIMEOUT_S)
        return self._snapshot_detail(final, details, moved)


# ---------------------------------------------------------------------- asyncio


@functools.partial(_public_calls, coroutine=True)
class AsyncClusterClient(_ClusterBase):
    """``AsyncClient``'s calls over a cohort cluster, as coroutines.

    >>> async with AsyncClusterClient() as c:
    ...     ys = await c.ensemble("mlp", x)
    """

    _flavour = AsyncClient
    map = AsyncClient.map  # built on submit alone

    async def close(self) -> None:
        with self._lock:
            clients, self._clients = [*self._clients.values(), *self._retired], {}
            self._retired = []
        for client in clients:
            await client.close()
        self._ray.close()

    async def __aenter__(self) -> AsyncClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def refresh(self) -> None:
        self._use(self._ray.check(await self._ray.directory.table.remote()))

    async def _invoke(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        how, what = self._route(name, args, kwargs)
        if how == "one":
            return await self._one(what)
        if how in ("fan", "submit"):  # an AsyncClient's submit is awaited like any call
            return await self._fan(what)
        if how == "copy":
            return await self._copy(*what[0], **what[1])
        if how == "snapshot":
            return await self._snapshot(*what[0], **what[1])
        if how == "stats":
            plan = self._stats_plan(what[1])
            return self._join_stats(plan, await self._outcomes(plan))
        raise NotImplementedError(how)

    async def _one(self, sub: SubCall) -> Any:
        try:
            return await getattr(self._clients[sub.coordinator], sub.name)(*sub.args, **sub.kwargs)
        except RESTARTING:
            await self._refresh_quietly()
            raise

    async def _fan(self, plan: Plan) -> Any:
        outcomes = await self._outcomes(plan)
        error = first_error(outcomes)
        if error is not None:
            raise error
        return plan.join(outcomes)

    async def _outcomes(self, plan: Plan) -> list[Any]:
        calls = [getattr(self._clients[s.coordinator], s.name)(*s.args, **s.kwargs) for s in plan.calls]
        outcomes = list(await asyncio.gather(*calls, return_exceptions=True))
        if any(isinstance(o, RESTARTING) for o in outcomes):
            await self._refresh_quietly()
        return outcomes

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:  # noqa: BLE001 - the call's own error is what the caller must see
            pass

    async def _copy(self, src: str, dst: str, *, timeout: float | None = None) -> None:
        (cs, ls), (cd, ld) = self._router.copy(src, dst)
        if cs == cd:
            return await self._one(SubCall(cs, "copy_weights", (ls, ld), {"timeout": timeout}))
        weights = await self._one(SubCall(cs, "get_weights", (ls,), {"optimizer_state": True, "timeout": timeout}))
        return await self._one(SubCall(cd, "set_weights", (ld, weights), {"optimizer_state": True,
                                                                          "timeout": timeout}))

    async def _snapshot(self, path: Any, *, timeout: float | None = None) -> dict[str, Any]:
        final, staging = self._snapshot_parts(path)
        details = await self._fan(Plan([SubCall(c, "snapshot", (p,), {"timeout": timeout})
                                        for c, p in staging.items()], list))
        moved = await asyncio.gather(*self._ray.publish(staging, final))
        await self._ray.record_snapshot(final)
        return self._snapshot_detail(final, details, list(moved))

