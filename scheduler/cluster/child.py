"""A coordinator under a supervisor actor: ``python -m scheduler.cluster.child PARENT_PID run --config FILE``.

It is ``cohort run`` that also dies with its supervisor: before anything else it asks
the kernel for SIGTERM when its parent exits (PR_SET_PDEATHSIG), so a supervisor killed
by Ray or by SIGKILL still takes its coordinator down cleanly (the coordinator stops its
workers and MPS daemon and removes its shared memory on SIGTERM). Done here rather than
in a ``preexec_fn``, which is unsafe in a process with threads, as a Ray worker is.

A Ray worker runs with SIGINT blocked, and a blocked signal stays blocked across
``exec``: unblocked here, or the coordinator (and its workers) would never see the
Ctrl-C its supervisor sends to stop it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        print("usage: python -m scheduler.cluster.child PARENT_PID run --config FILE", file=sys.stderr)
        return 2
    parent = int(argv[0])
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        return 1
    from scheduler.cli import main as cohort

    return cohort(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
