"""The client's sans-I/O core, fed frames by hand: no socket, no thread, no coordinator.

Requests are read back with the coordinator's codec and replies are made with it, so
what is checked here is what crosses the wire.
"""

from __future__ import annotations

import pytest
import torch

from core.codec import coordinator_client_codec, unbundle
from core.errors import BadInput, JobFailed, JobTimeout, ProtocolError, UnknownModel, WorkerDied
from core.messages import (
    JOB_OPS,
    Ack,
    BarrierRequest,
    ErrorReply,
    GetWeights,
    Hello,
    HelloReply,
    JobDone,
    ListModels,
    ModelInfo,
    ModelsReply,
    Replies,
    Requests,
    SubmitJob,
    WeightsReply,
)
from core.tensors import encode_tensors
from scheduler.client_core import (
    ALWAYS_ANSWERED_BYTES,
    JOB_RESULTS,
    MIN_TIME_LEFT_S,
    SHM_MIN_BYTES,
    Call,
    ClientCore,
    Connection,
    as_models,
    as_none,
    as_weights,
    job,
)

ADDRESS = "ipc:///nowhere/coordinator.sock"
server = coordinator_client_codec()


def _started(call: Call, core: ClientCore | None = None, timeout: float = 10.0, now: float = 100.0) -> Call:
    return (core or ClientCore()).start(call, timeout, now=now)


def _on_the_wire(frames: list) -> list[tuple]:  # type: ignore[type-arg]
    """The requests (with their buffers) a client's frames carry, as the coordinator reads them."""
    message, buffers = server.decode(frames)
    return unbundle(message.requests, buffers) if isinstance(message, Requests) else [(message, buffers)]


def _reply(message, buffers=None) -> list:  # type: ignore[no-untyped-def, type-arg]
    return server.encode(message, buffers)


# --------------------------------------------------------------------------- requests


def test_start_stamps_id_timeout_and_deadline() -> None:
    core = ClientCore()
    a = _started(job("infer", "m/0", torch.zeros(2, 3)), core, timeout=7.0, now=50.0)
    b = _started(Call("models", ListModels(0), as_models), core)
    assert (a.req_id, a.message.timeout_s, a.deadline) == (1, 7.0, 57.0)
    assert b.req_id == 2 and not hasattr(b.message, "timeout_s")


def test_job_frames_carry_inputs_then_targets() -> None:
    x, t = torch.arange(6.0).reshape(2, 3), torch.tensor([1, 0])
    call = _started(job("train_step", "m/1", x, t))
    [(message, buffers)] = _on_the_wire(Connection(ADDRESS).frames([call], now=100.0))
    assert isinstance(message, SubmitJob)
    assert (message.req_id, message.op, message.target) == (call.req_id, "train_step", "m/1")
    assert [bytes(b) for b in buffers] == [x.numpy().tobytes(), t.numpy().tobytes()]


@pytest.mark.parametrize(("op", "targets", "match"), [
    ("fly", None, "unknown op 'fly'"),
    ("train_step", None, "train_step needs targets"),
    ("train_round", None, "train_round needs targets"),
])
def test_job_refuses_what_cannot_be_a_job(op: str, targets: object, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        job(op, "m/0", torch.zeros(1), targets)


def test_every_job_op_has_a_result_and_the_client_keeps_no_list_of_its_own() -> None:
    assert set(JOB_RESULTS) == set(JOB_OPS)
    import scheduler.client as client_module

    assert not hasattr(client_module, "JOB_OPS")


def test_a_request_carries_the_time_its_call_has_left() -> None:
    connection = Connection(ADDRESS)
    call = _started(job("infer", "m/0", torch.zeros(1)), timeout=10.0, now=100.0)
    [(early, _)] = _on_the_wire(connection.frames([call], now=100.0))
    [(late, _)] = _on_the_wire(connection.frames([call], now=106.5))
    [(past, _)] = _on_the_wire(connection.frames([call], now=130.0))
    assert early.timeout_s == pytest.approx(10.0)
    assert late.timeout_s == pytest.approx(3.5)
    assert past.timeout_s == MIN_TIME_LEFT_S


def test_a_request_without_a_timeout_gets_none() -> None:
    call = _started(Call("models", ListModels(0), as_models), now=100.0)
    [(message, _)] = _on_the_wire(Connection(ADDRESS).frames([call], now=105.0))
    assert message == ListModels(call.req_id)


def test_several_calls_go_as_one_bundle_with_their_buffers_in_order() -> None:
    core = ClientCore()
    calls = [_started(job("infer", "m/0", torch.full((1,), float(i))), core) for i in range(3)]
    calls.insert(1, _started(Call("barrier", BarrierRequest(0, ["m"]), as_none), core))
    items = _on_the_wire(Connection(ADDRESS).frames(calls, now=101.0))
    assert [m.req_id for m, _ in items] == [c.req_id for c in calls]
    assert [len(b) for _, b in items] == [1, 0, 1, 1]
    assert [torch.frombuffer(bytearray(b[0]), dtype=torch.float32).item() for _, b in items if b] == [0.0, 1.0, 2.0]
    assert all(m.timeout_s == pytest.approx(9.0) for m, _ in items)


# --------------------------------------------------------------------------- size checks


def _big_call(nbytes: int) -> Call:
    tree, buffers = encode_tensors(torch.zeros(nbytes, dtype=torch.uint8))
    return Call("infer", SubmitJob(0, "infer", "m/0", tree), as_none, buffers)


def test_small_messages_need_no_bound_and_always_pass() -> None:
    core = ClientCore(max_message_bytes=10)
    small = _big_call(ALWAYS_ANSWERED_BYTES)
    assert not core.needs_bound(small)
    core.check_size(small)


def test_a_large_message_asks_the_coordinator_for_its_bound_once() -> None:
    core = ClientCore()
    big = _big_call(ALWAYS_ANSWERED_BYTES + 1)
    assert core.needs_bound(big)
    hello = _started(core.hello(), core)
    assert isinstance(hello.message, Hello)
    connection = Connection(ADDRESS)
    connection.add(hello)
    [settled] = connection.receive(_reply(HelloReply(hello.req_id, 1, "x", 5 << 20)))
    core.greeted(settled.result())
    assert core.server_bound == 5 << 20 and not core.needs_bound(big)
    core.check_size(big)


@pytest.mark.parametrize(("client_bound", "server_bound"), [(2 << 20, 8 << 20), (8 << 20, 2 << 20)])
def test_size_is_checked_against_the_smaller_bound(client_bound: int, server_bound: int) -> None:
    core = ClientCore(max_message_bytes=client_bound)
    core.server_bound = server_bound
    core.check_size(_big_call(2 << 20))
    with pytest.raises(BadInput, match=f"exceed the message bound of {2 << 20} bytes"):
        core.check_size(_big_call((2 << 20) + 1))


def test_check_size_without_the_bound_is_a_mistake_of_the_caller() -> None:
    with pytest.raises(RuntimeError, match="hello"):
        ClientCore().check_size(_big_call(ALWAYS_ANSWERED_BYTES + 1))


# --------------------------------------------------------------------------- replies


def _pending(*calls: Call) -> Connection:
    connection = Connection(ADDRESS)
    for call in calls:
        connection.add(call)
    return connection


def test_a_reply_settles_its_call_with_the_result() -> None:
    y = torch.arange(4.0).reshape(2, 2)
    call = _started(job("infer", "m/0", torch.zeros(1)))
    connection = _pending(call)
    tree, buffers = encode_tensors(y)
    [settled] = connection.receive(_reply(JobDone(call.req_id, tree), buffers))
    assert settled.call is call and settled.error is None
    torch.testing.assert_close(settled.result(), y)
    assert call not in connection and len(connection) == 0


@pytest.mark.parametrize(("op", "losses", "want"), [
    ("train_step", [0.25], 0.25), ("train_round", [0.5, 1.5], [0.5, 1.5]), ("train_round", None, []),
])
def test_training_replies_become_losses(op: str, losses: list[float] | None, want: object) -> None:
    call = _started(job(op, "m", torch.zeros(1), torch.zeros(1)))
    [settled] = _pending(call).receive(_reply(JobDone(call.req_id, losses=losses)))
    assert settled.result() == want


def test_a_bundle_of_replies_settles_each_call_with_its_own_buffers() -> None:
    core = ClientCore()
    jobs = [_started(job("infer", "m/0", torch.zeros(1)), core) for _ in range(2)]
    weights = _started(Call("get_weights", GetWeights(0, "m/0"), as_weights), core)
    models = _started(Call("models", ListModels(0), as_models), core)
    connection = _pending(*jobs, weights, models)
    t0, b0 = encode_tensors(torch.tensor([1.0, 2.0]))
    t1, b1 = encode_tensors(torch.tensor([3.0]))
    tw, bw = encode_tensors({"w": torch.ones(2, 2), "b": torch.zeros(2)})
    info = ModelInfo("m/0", "m", 0, 0, 3, "cpu")
    bundle = Replies(0, [JobDone(jobs[1].req_id, t1), ModelsReply(models.req_id, [info]),
                         WeightsReply(weights.req_id, tw), JobDone(jobs[0].req_id, t0)])
    settled = connection.receive(_reply(bundle, [*b1, *bw, *b0]))
    results = {s.call.req_id: s.result() for s in settled}
    assert [s.call for s in settled] == [jobs[1], models, weights, jobs[0]]
    torch.testing.assert_close(results[jobs[0].req_id], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(results[jobs[1].req_id], torch.tensor([3.0]))
    assert results[models.req_id] == [info]
    assert set(results[weights.req_id]) == {"w", "b"}
    torch.testing.assert_close(results[weights.req_id]["w"], torch.ones(2, 2))
    assert len(connection) == 0


@pytest.mark.parametrize("cls", [UnknownModel, BadInput, WorkerDied, JobTimeout, JobFailed])
def test_an_error_reply_raises_its_class_with_the_remote_traceback(cls: type) -> None:
    call = _started(job("infer", "m/0", torch.zeros(1)))
    [settled] = _pending(call).receive(_reply(ErrorReply(call.req_id, cls.__name__, "it went wrong", "Traceback: x")))
    with pytest.raises(cls, match="it went wrong") as info:
        settled.result()
    assert type(info.value) is cls and info.value.remote_traceback == "Traceback: x"


def test_an_error_inside_a_bundle_fails_only_its_call() -> None:
    core = ClientCore()
    good, bad = _started(Call("barrier", BarrierRequest(0), as_none), core), _started(job("infer", "m/9", torch.zeros(1)), core)
    bundle = Replies(0, [ErrorReply(bad.req_id, "UnknownModel", "no model m/9"), Ack(good.req_id)])
    by_call = {s.call: s for s in _pending(good, bad).receive(_reply(bundle))}
    assert by_call[good].result() is None
    assert isinstance(by_call[bad].error, UnknownModel)


def test_a_reply_to_no_pending_call_is_ignored() -> None:
    call = _started(Call("models", ListModels(0), as_models))
    connection = _pending(call)
    assert connection.receive(_reply(ModelsReply(call.req_id + 100, []))) == []
    connection.forget(call)  # timed out: its answer comes late
    assert connection.receive(_reply(ModelsReply(call.req_id, []))) == []


def test_an_unreadable_message_settles_nothing() -> None:
    call = _started(Call("models", ListModels(0), as_models))
    connection = _pending(call)
    assert connection.receive([b"\x01\x00garbage"]) == []
    assert connection.receive(_reply(Replies(0, [JobDone(call.req_id, encode_tensors(torch.ones(1))[0])]))) == []
    assert call in connection


@pytest.mark.parametrize("reply", [Ack(1), JobDone(1)])
def test_a_reply_of_the_wrong_kind_is_a_protocol_error(reply: object) -> None:
    call = _started(Call("models", ListModels(0), as_models))
    [settled] = _pending(call).receive(_reply(reply))
    with pytest.raises(ProtocolError, match=f"expected ModelsReply, got {type(reply).__name__}"):
        settled.result()


def test_a_reply_whose_tensors_do_not_decode_fails_its_call_as_a_protocol_error() -> None:
    call = _started(job("infer", "m/0", torch.zeros(1)))
    tree, _ = encode_tensors(torch.zeros(4))
    [settled] = _pending(call).receive(_reply(JobDone(call.req_id, tree), [b"\x00" * 3]))
    with pytest.raises(ProtocolError, match="needs 16 bytes"):
        settled.result()


def test_a_reply_that_breaks_its_reader_fails_its_call_as_a_protocol_error() -> None:
    def broken(reply: object, buffers: list) -> None:  # type: ignore[type-arg]
        raise KeyError("surprise")

    call = _started(Call("models", ListModels(0), broken))
    [settled] = _pending(call).receive(_reply(ModelsReply(call.req_id, [])))
    with pytest.raises(ProtocolError, match="bad reply: KeyError"):
        settled.result()


# --------------------------------------------------------------------------- drops, deadlines, close


def test_a_drop_fails_the_calls_sent_and_keeps_the_ones_still_to_go() -> None:
    core = ClientCore()
    sent, waiting = _started(job("infer", "m/0", torch.zeros(1)), core), _started(job("infer", "m/1", torch.zeros(1)), core)
    connection = _pending(sent, waiting)
    connection.sent([sent])
    [settled] = connection.dropped()
    assert settled.call is sent
    with pytest.raises(ProtocolError, match=f"infer: the connection to the coordinator at {ADDRESS} dropped"):
        settled.result()
    assert waiting in connection and sent not in connection


@pytest.mark.parametrize(("sent", "wording"), [(True, "no answer from"), (False, "could not reach the coordinator at")])
def test_expiry_says_whether_the_call_went_out(sent: bool, wording: str) -> None:
    call = _started(Call("models", ListModels(0), as_models))
    connection = _pending(call)
    if sent:
        connection.sent([call])
    with pytest.raises(JobTimeout, match=f"models: {wording} {ADDRESS}"):
        connection.expire(call).result()
    assert call not in connection


def test_close_fails_every_call_still_waiting() -> None:
    core = ClientCore()
    calls = [_started(Call("models", ListModels(0), as_models), core) for _ in range(3)]
    connection = _pending(*calls)
    connection.sent(calls[:1])
    settled = connection.close()
    assert [s.call for s in settled] == calls and len(connection) == 0
    assert all(isinstance(s.error, ProtocolError) and "closed" in str(s.error) for s in settled)


def test_resolve_hands_the_outcome_to_the_future_once() -> None:
    from concurrent.futures import Future

    core = ClientCore()
    ok, failed = _started(Call("barrier", BarrierRequest(0), as_none), core), _started(job("infer", "m", torch.zeros(1)), core)
    for call in (ok, failed):
        call.future = Future()
    connection = _pending(ok, failed)
    bundle = Replies(0, [Ack(ok.req_id), ErrorReply(failed.req_id, "Overloaded", "full")])
    for settled in connection.receive(_reply(bundle)):
        settled.resolve()
    connection.expire(ok).resolve()  # already done: no second outcome
    assert ok.future.result(0) is None
    assert type(failed.future.exception(0)).__name__ == "Overloaded"


# --------------------------------------------------------------------------- the two flavours


def test_every_call_is_written_once_and_both_flavours_get_it() -> None:
    import inspect

    from scheduler import AsyncClient, Client
    from scheduler.client_api import PUBLIC_CALLS, BaseClient

    assert set(PUBLIC_CALLS) == {"submit", "infer", "train_step", "ensemble", "train_round", "models", "barrier",
                                 "get_weights", "set_weights", "copy_weights", "snapshot", "stats",
                                 "evaluate", "set_hparams", "get_hparams", "reset"}
    for name in PUBLIC_CALLS:
        declared = getattr(BaseClient, name)
        assert getattr(Client, name) is declared, f"Client.{name} is written again"
        coroutine = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(coroutine), f"AsyncClient.{name} is not a coroutine function"
        assert inspect.signature(coroutine) == inspect.signature(declared)
        assert coroutine.__doc__ == declared.__doc__ and declared.__doc__


@pytest.mark.parametrize("same", [True, False])
def test_a_local_client_uses_shared_memory_only_where_the_coordinator_sees_it_too(same: bool) -> None:
    core = ClientCore(shm=True)
    try:
        big = _big_call(SHM_MIN_BYTES)
        assert core.needs_bound(big)  # under the bound, but the coordinator must say what it sees first
        hello = _started(core.hello(), core)
        connection = Connection(ADDRESS)
        connection.add(hello)
        theirs = core.identity if same else "another /dev/shm"
        [settled] = connection.receive(_reply(HelloReply(hello.req_id, 1, "x", 5 << 20, theirs)))
        core.greeted(settled.result())
        assert core.shm_ok is same and not core.needs_bound(big)
        _started(big, core)
        assert bool(big.message.inputs.shm) is same  # in the client's arena, or through the socket
        assert big.message.shm_results and big.message.shm_identity == core.identity  # the coordinator decides
        assert (big.buffers == []) is same
    finally:
        core.close()


def test_no_shared_tensor_after_close_leaves_an_arena_behind() -> None:
    core = ClientCore(shm=True)
    core.shm_ok = True
    core.close()
    with pytest.raises(ProtocolError, match="closed"):
        core.shared((1024,), torch.float32)
    assert core._arena is None
