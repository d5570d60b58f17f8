"""cohort past one GPU: one normal coordinator per GPU, placed, restarted and found through Ray.

Ray is the control plane only; the data path stays cohort's own (ZeroMQ from the client
straight to the coordinator that holds the model). The modules, from the bottom up:

    layout.py      the models cut into one block per coordinator; each coordinator's config (no Ray)
    routing.py     a cluster call as calls to coordinators, and their results joined (no Ray, no I/O)
    directory.py   the placement table: a named, detached actor ``cohort-directory`` (namespace ``cohort``)
    raylocal.py    join a running Ray, or start a local head as ``ray start --head`` does, and stop it
    supervisor.py  the actor that runs one coordinator on its GPU and brings it back after a death
    child.py       the coordinator's entry under a supervisor (dies with it)
    launcher.py    ``cohort cluster``: all of the above, until Ctrl-C
    client.py      ``ClusterClient`` and ``AsyncClusterClient``: ``Client``'s calls over the cluster

Nothing here is imported by ``import scheduler``; Ray itself is imported only where a
module talks to it, so ``pip install cohort`` without the ``ray`` extra still imports
every module (and ``ClusterClient`` says what to install when it is made).
"""

NAMESPACE = "cohort"
DIRECTORY_NAME = "cohort-directory"
SUPERVISOR_NAME = "cohort-coordinator-{index}"
