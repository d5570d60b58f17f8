"""Worker entry point: ``python -m workers --address ipc://... --worker-id N`` (started by the coordinator)."""

from __future__ import annotations

import argparse
import sys

from workers.worker import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m workers", description="cohort worker (started by the coordinator)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--beat", required=True, help="file the worker stamps its heartbeat into")
    args = parser.parse_args()
    sys.exit(main(args.address, args.worker_id, args.beat))
