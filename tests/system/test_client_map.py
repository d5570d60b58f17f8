"""Calls in flight as a first-class use: ``map`` keeps N calls in flight, in order, sync and async."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from cohort_harness import mlp_group, stop_and_check_clean

from scheduler import AsyncClient, BadInput


def test_map_streams_batches_in_order_with_calls_in_flight(cohort) -> None:
    running = cohort([mlp_group("m", 2)], workers=1)
    batches = [torch.full((3, 8), float(i)) for i in range(20)]
    with running.client(timeout=60) as c:
        want = [c.infer("m/1", x) for x in batches]
        got = list(c.map("infer", "m/1", batches, depth=6))
        assert len(got) == 20  # joined calls (dynamic batching) may round the last bit differently
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        targets = [torch.zeros(3, dtype=torch.int64)] * 5
        losses = list(c.map("train_step", "m/0", batches[:5], targets, depth=3))
        assert len(losses) == 5 and all(isinstance(v, float) for v in losses)
        assert c.get_hparams("m/0")["step"] == 5
        stream = c.map("infer", "m/1", batches, depth=4)
        first = next(stream)
        stream.close()  # leaving early leaves nothing behind
        torch.testing.assert_close(first, want[0])
        with pytest.raises(BadInput):
            next(c.map("infer", "m/1", batches, depth=0))

        async def use_async() -> list[torch.Tensor]:
            async with AsyncClient(running.address, timeout=60) as a:
                return [y async for y in a.map("infer", "m/1", batches, depth=5)]

        got_async = asyncio.run(use_async())
        for a, b in zip(got_async, want):
            torch.testing.assert_close(a, b)
    assert stop_and_check_clean(running) == 0


def test_async_calls_in_flight_never_sleep_on_replies_already_waiting(cohort) -> None:
    """Many small calls in flight from several tasks: a send that takes the socket's pending
    replies with it must not leave the reader asleep (each round would then hang to its timeout)."""
    running = cohort([mlp_group("m", 2)], workers=1)
    batches = [torch.full((1, 8), float(i)) for i in range(64)]

    async def rounds() -> int:
        async with AsyncClient(running.address, timeout=20) as a:
            done = 0
            for _ in range(10):
                streams = [[y async for y in a.map("infer", f"m/{k % 2}", batches, depth=16)] for k in range(2)]
                results = await asyncio.gather(*(a.infer("m/0", x) for x in batches))
                done += sum(len(s) for s in streams) + len(results)
            return done

    assert asyncio.run(rounds()) == 10 * 3 * 64
    assert stop_and_check_clean(running) == 0


def test_map_on_the_calling_threads_socket_keeps_order_and_recovers_from_errors(cohort) -> None:
    """The stream goes out on the thread's own socket, several calls a message: results in order,
    a failing call raises at its turn and leaves the client sound, large inputs ask the
    coordinator's bound first, and a thread with submitted calls out keeps their order."""
    running = cohort([mlp_group("m", 2)], workers=1)
    batches = [torch.full((2, 8), float(i)) for i in range(40)]
    with running.client(timeout=60, shm=False) as c:
        got = list(c.map("infer", "m/0", batches, depth=16))
        for i, y in enumerate(got):
            torch.testing.assert_close(y, c.infer("m/0", batches[i]))
        bad = [*batches[:5], torch.randn(2, 9), *batches[5:10]]  # the sixth has the wrong width
        stream = c.map("infer", "m/1", bad, depth=8, timeout=10)
        first = next(stream)
        time.sleep(0.3)  # the stream's other answers wait in the socket: a blocking call must leave them
        torch.testing.assert_close(first, c.infer("m/1", batches[0]))
        for i in range(1, 5):
            torch.testing.assert_close(next(stream), c.infer("m/1", batches[i]))
        with pytest.raises(BadInput):
            next(stream)
        assert c.infer("m/1", batches[3]).shape == (2, 4)  # late answers of the abandoned calls are dropped
        big = [torch.randn(40_000, 8) for _ in range(3)]  # 1.3 MB each: over what is always answered
        assert [y.shape for y in c.map("infer", "m/0", big, depth=3)] == [(40_000, 4)] * 3
        futures = [c.submit("train_step", "m/0", batches[0], torch.zeros(2, dtype=torch.int64)) for _ in range(3)]
        step = c.get_hparams("m/0")["step"]  # ordered after the submitted steps
        assert step == 3
        assert [f.result() for f in futures] and len(list(c.map("infer", "m/0", batches[:4], depth=2))) == 4
    assert stop_and_check_clean(running) == 0


def test_a_stream_of_large_calls_and_one_that_stops_on_bad_input(cohort) -> None:
    """Calls small enough to go without asking the coordinator's bound, several of which together
    exceed it, all answered. A stream that stops on bad input leaves no call of its own waiting on
    the thread's socket."""
    running = cohort([mlp_group("m", 2)], workers=1, max_message_bytes=2_000_000)
    big = [torch.randn(28_000, 8) for _ in range(6)]  # 896 KB each: four in one message are 3.6 MB
    with running.client(timeout=30, shm=False, max_message_bytes=2_000_000) as c:
        assert [y.shape for y in c.map("infer", "m/0", big, depth=4)] == [(28_000, 4)] * 6
        bad = [torch.randn(2, 8), torch.randn(2, 8), "not a tensor", torch.randn(2, 8)]
        with pytest.raises(BadInput):
            list(c.map("infer", "m/0", bad, depth=4))
        assert len(c._direct().connection) == 0, "calls built for the stream were left waiting"
        assert c.infer("m/0", torch.randn(2, 8)).shape == (2, 4)
    assert stop_and_check_clean(running) == 0
