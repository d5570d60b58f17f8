"""Worker entry point: ``python -m workers --link-fd FD --notices-fd FD --worker-id N --beat PATH`` (started by
the coordinator)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from workers.worker import FATAL_DEVICE_EXIT, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m workers", description="cohort worker (started by the coordinator)")
    parser.add_argument("--link-fd", type=int, required=True, help="the inherited socket of the link to the coordinator")
    parser.add_argument("--notices-fd", type=int, required=True,
                        help="the inherited socket on which it names the jobs it answered directly")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--beat", required=True, help="file the worker stamps its heartbeat into")
    args = parser.parse_args()
    code = main(args.link_fd, args.notices_fd, args.worker_id, args.beat)
    if code == FATAL_DEVICE_EXIT:
        # The device context is broken: the interpreter's teardown (CUDA's own exit handlers
        # among it) could hang or abort on it, and the coordinator must see this exact code.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
