"""cohort's monitor: GPU (NVML), host and coordinator figures in one view.

    python tools/gpumon.py [--address ADDR] [--interval S] [--once] [--json]
                           [--prometheus PORT [--prometheus-bind HOST]]
                           [--export-svg FILE] [--export-text FILE] [--width COLS]
    python tools/gpumon.py --cluster [--ray-address ADDR] [--interval S] [--once] [--json]

Live terminal view by default; `--once` prints one view and exits (`--export-svg` and
`--export-text` also save that view, for screenshots); `--json` prints samples as JSON
lines (with `--once`, one line); `--prometheus PORT` serves the same figures on
http://HOST:PORT/metrics until Ctrl-C. No GPU, no NVML or no coordinator is reported
in the view and never ends the monitor. `--cluster` watches every coordinator of a cohort
cluster on Ray instead, each GPU read on its own node (tools/gpumon_cluster.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gpumon_coord import CoordinatorSource, default_address
from gpumon_history import History
from gpumon_nvml import NvmlSource
from gpumon_sample import Sampler
from gpumon_view import render
from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

ADDRESS_SCHEMES = ("tcp://", "ipc://")
# A stats() call is answered in milliseconds; anything much slower means the
# coordinator is down or stuck, and the view should say so within a refresh or two.
MIN_COORDINATOR_TIMEOUT_S = 0.25
MAX_COORDINATOR_TIMEOUT_S = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the address defaults as cohort's Client does."""
    parser = argparse.ArgumentParser(description="Live view of cohort's GPU and coordinator.")
    parser.add_argument(
        "--address",
        default=default_address(),
        help="coordinator address (default: $COHORT_ADDRESS, else %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between samples (default: %(default)s); the coordinator "
        f"timeout is the same, at most {MAX_COORDINATOR_TIMEOUT_S:g} s",
    )
    parser.add_argument("--once", action="store_true", help="print one sample and exit")
    parser.add_argument("--json", action="store_true", help="print samples as JSON lines")
    parser.add_argument(
        "--prometheus",
        type=int,
        metavar="PORT",
        help="serve the figures for Prometheus on PORT until Ctrl-C",
    )
    parser.add_argument(
        "--prometheus-bind",
        default="127.0.0.1",
        metavar="HOST",
        help="interface for --prometheus (default: loopback only)",
    )
    parser.add_argument(
        "--export-svg",
        metavar="FILE",
        help="with --once: also save the view as an SVG image",
    )
    parser.add_argument(
        "--export-text",
        metavar="FILE",
        help="with --once: also save the view as plain text",
    )
    parser.add_argument(
        "--width",
        type=int,
        metavar="COLS",
        help="draw the view this many columns wide (default: the terminal's)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="watch every coordinator of a cohort cluster on Ray (needs cohort[ray])",
    )
    parser.add_argument(
        "--ray-address",
        default="auto",
        help="with --cluster: the Ray cluster (default: %(default)s, a running `ray start`)",
    )
    args = parser.parse_args(argv)
    if args.cluster and args.prometheus is not None:
        parser.error("--cluster has a terminal view and --json; --prometheus watches one coordinator")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if args.width is not None and args.width < 40:
        parser.error("--width must be at least 40")
    if not args.address.startswith(ADDRESS_SCHEMES):
        # The client connects in its I/O thread, where a malformed address only
        # shows as a timeout; say what is wrong here instead.
        parser.error(f"--address {args.address!r}: expected {' or '.join(ADDRESS_SCHEMES)}...")
    if args.prometheus is not None and (args.once or args.json):
        parser.error("--prometheus serves until Ctrl-C; use it without --once and --json")
    if (args.export_svg or args.export_text) and not (args.once and not args.json):
        parser.error("--export-svg and --export-text save the view of --once (no --json)")
    return args


def make_sampler(address: str, interval: float) -> Sampler:
    """Real sources; a short coordinator timeout, so a dead one never stalls the view."""
    timeout = min(max(interval, MIN_COORDINATOR_TIMEOUT_S), MAX_COORDINATOR_TIMEOUT_S)
    return Sampler(NvmlSource(), CoordinatorSource(address, timeout=timeout))


def print_json(sample: dict[str, Any]) -> None:
    """One sample as one JSON line; a sample JSON cannot hold becomes an error line."""
    try:
        # default=str: a stats field of an unexpected type must not lose the line.
        line = json.dumps(sample, default=str)
    except (TypeError, ValueError) as exc:
        line = json.dumps({"time": sample.get("time"), "monitor_error": str(exc)})
    print(line, flush=True)


def run_once(sampler: Sampler, args: argparse.Namespace, console: Console) -> None:
    """One sample, as JSON or as one rendered view (saved too, if asked)."""
    if args.json:
        print_json(sampler.sample())
        return
    console.print(frame(sampler, History()))
    if args.export_svg:
        Path(args.export_svg).write_text(
            console.export_svg(title="cohort gpumon", clear=False), encoding="utf-8"
        )
    if args.export_text:
        Path(args.export_text).write_text(console.export_text(clear=False), encoding="utf-8")


def run_json_lines(sampler: Sampler, interval: float) -> None:
    """One JSON line per interval, for logging to a file or piping to jq."""
    while True:
        started = time.monotonic()
        print_json(sampler.sample())
        pause(started, interval)


def run_live(sampler: Sampler, interval: float, console: Console) -> None:
    """Redraw the view every interval until Ctrl-C."""
    history = History()
    with Live(Text("sampling..."), console=console, auto_refresh=False) as live:
        while True:
            started = time.monotonic()
            live.update(frame(sampler, history), refresh=True)
            pause(started, interval)


def run_prometheus(sampler: Sampler, port: int, bind: str, interval: float) -> int:
    """Sample every interval on this thread and serve the latest sample until Ctrl-C.

    Scrapes read the latest sample instead of taking one: a scrape then never waits
    on a dead coordinator, and the coordinator client is only ever used from this
    thread (Client keeps a socket for each thread that calls it, and the HTTP server
    answers each scrape on a new thread).
    """
    from gpumon_prom import serve  # only this mode needs prometheus_client

    started = time.monotonic()
    latest = sampler.sample()
    # The lambda reads `latest` when called, so it serves each new sample; rebinding
    # a name is atomic, so a scrape sees the old sample or the new one, never a mix.
    try:
        server, thread = serve(lambda: latest, port, bind)
    except OSError as exc:  # port taken, or no such interface: the user must choose
        print(f"gpumon: cannot serve on {bind}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        print(
            f"serving cohort metrics at http://{bind}:{server.server_port}/metrics (Ctrl-C stops)",
            flush=True,
        )
        while thread.is_alive():
            pause(started, interval)
            started = time.monotonic()
            latest = sampler.sample()
    finally:
        server.shutdown()
        server.server_close()
    return 0


def frame(sampler: Sampler, history: History) -> RenderableType:
    """Sample, remember and render; on any failure one line saying why.

    Odd figures from a newer or broken coordinator must cost one frame, never the
    refresh loop.
    """
    try:
        sample = sampler.sample()
        history.add(sample)
        return render(sample, history)
    except Exception as exc:  # noqa: BLE001 - a bad frame must not end the loop
        return Text(
            f"monitor: cannot draw this sample ({type(exc).__name__}: {exc}); retrying",
            style="red",
        )


def pause(started: float, interval: float) -> None:
    """Sleep out the rest of the interval, so samples stay evenly spaced."""
    time.sleep(max(0.0, interval - (time.monotonic() - started)))


def run_cluster(args: argparse.Namespace, console: Console) -> int:
    """`--cluster`: a row per coordinator of a cohort cluster, until Ctrl-C (or once)."""
    from gpumon_cluster import ClusterSampler, render_cluster

    timeout = min(max(args.interval, MIN_COORDINATOR_TIMEOUT_S), MAX_COORDINATOR_TIMEOUT_S)
    sampler = ClusterSampler(args.ray_address, timeout)
    try:
        if args.once:
            sample = sampler.sample()
            if args.json:
                print_json(sample)
            else:
                console.print(render_cluster(sample))
            return 0
        if args.json:
            while True:
                started = time.monotonic()
                print_json(sampler.sample())
                pause(started, args.interval)
        with Live(Text("sampling..."), console=console, auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                live.update(render_cluster(sampler.sample()), refresh=True)
                pause(started, args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        sampler.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cluster:
        return run_cluster(args, Console(width=args.width))
    sampler = make_sampler(args.address, args.interval)
    console = Console(width=args.width, record=bool(args.export_svg or args.export_text))
    try:
        if args.once:
            run_once(sampler, args, console)
        elif args.prometheus is not None:
            return run_prometheus(sampler, args.prometheus, args.prometheus_bind, args.interval)
        elif args.json:
            run_json_lines(sampler, args.interval)
        else:
            run_live(sampler, args.interval, console)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how users leave the monitor: not an error
    except BrokenPipeError:
        # `gpumon.py --json | head`: the reader has gone, so has our reason to run.
        # stdout goes to /dev/null so the interpreter's final flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        sampler.close()
    return 0


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (systemd, docker stop) ends the monitor as cleanly as Ctrl-C does."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Run as `python tools/gpumon.py`, only tools/ is on the path; the checkout root
    # makes `scheduler` importable even where cohort is not pip-installed.
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    sys.exit(main())
