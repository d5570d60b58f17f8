"""The GPU executor's event waiter, with stand-in events (no GPU needed): a run that finishes
on one stream wakes the worker's loop at once, whatever runs longer on another stream."""

from __future__ import annotations

import select
import threading

from workers.streams import EventWaiter


class SlowEvent:
    """A stand-in for a blocking CUDA event: ``synchronize`` returns once released."""

    def __init__(self, done: bool = False) -> None:
        self.released = threading.Event()
        if done:
            self.released.set()

    def synchronize(self) -> None:
        self.released.wait()


def woken(waiter: EventWaiter, within_s: float) -> bool:
    readable, _, _ = select.select([waiter.read_fd], [], [], within_s)
    return bool(readable)


def test_a_short_run_on_one_stream_is_not_held_behind_a_long_run_on_another() -> None:
    waiter = EventWaiter()
    long_run, short_run = SlowEvent(), SlowEvent(done=True)
    try:
        waiter.watch(long_run, "stream 0")
        waiter.watch(short_run, "stream 1")
        assert woken(waiter, 2.0), "the short run's completion did not wake the loop while the long run went on"
        waiter.drain()
        assert not woken(waiter, 0.05), "woken with nothing finished"
        long_run.released.set()
        assert woken(waiter, 2.0)
    finally:
        long_run.released.set()
        waiter.close()


def test_events_of_one_stream_wake_the_loop_once_each() -> None:
    waiter = EventWaiter()
    events = [SlowEvent() for _ in range(3)]
    try:
        for event in events:
            waiter.watch(event, "stream 0")
        for event in events:
            assert not woken(waiter, 0.05)
            event.released.set()
            assert woken(waiter, 2.0)
            waiter.drain()
    finally:
        for event in events:
            event.released.set()
        waiter.close()
