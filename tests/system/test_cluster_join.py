"""``cohort cluster`` joining a Ray cluster that runs already: a second cluster on it is refused; a
coordinator whose restarts are spent is marked failed and its models' calls fail at once; Ctrl-C
ends every actor, placement group and process of cohort's while the Ray cluster runs on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the cluster needs Ray: pip install 'cohort[ray]'")

import torch  # noqa: E402
from cluster_harness import ROOT, RayHead, RunningCluster, cohort_shm, ray_environment  # noqa: E402

from scheduler import ClusterClient, WorkerDied  # noqa: E402
from scheduler.cluster.raylocal import address_file, answers  # noqa: E402
from tools.harness import alive, config_text  # noqa: E402

# Alone: it kills a coordinator and looks at what its run left, and another test's coordinator start would remove them.
pytestmark = [pytest.mark.timeout(300), pytest.mark.alone]

GROUPS = [{"name": "m", "factory": "examples.models:mlp", "kwargs": {"d_in": 4, "hidden": 8, "d_out": 2},
           "count": 2, "input": {"shape": [-1, 4], "dtype": "float32"}}]
SETTINGS = {"address": "tcp://127.0.0.1:5555", "workers": 1, "device": "cpu", "mps": "off"}


def test_joining_a_running_ray_leaves_it_as_it_was(tmp_path: Path) -> None:
    with ray_environment() as env:
        head = RayHead(tmp_path / "head")
        cluster = None
        try:
            cluster = RunningCluster(tmp_path / "cluster", env, SETTINGS, GROUPS,
                                     ["--coordinators", "2", "--max-restarts", "0"])
            cluster.wait_ready()
            assert f"joining the Ray cluster at {head.address}" in cluster.log()

            (tmp_path / "second.toml").write_text(config_text(SETTINGS, GROUPS), encoding="ascii")
            second = subprocess.run([sys.executable, "-m", "scheduler", "cluster", "--config",
                                     str(tmp_path / "second.toml"), "--coordinators", "1"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and "a cohort cluster already runs on this Ray cluster" in second.stdout

            with ClusterClient() as c:  # the first cluster is untouched by the refused one
                assert [m.coordinator for m in c.models()] == [0, 1]
                stats = c.stats()
                assert all(e["stats"]["address"].startswith("tcp://127.0.0.1:") for e in stats["coordinators"])
                pids = {e["stats"]["pid"] for e in stats["coordinators"]}
                pids |= {w["pid"] for e in stats["coordinators"] for w in e["stats"]["workers"]}
                run_ids = [e["stats"]["run_id"] for e in stats["coordinators"]]
                table = ray.get(ray.get_actor("cohort-directory", namespace="cohort").table.remote())
                pids |= {e["actor_pid"] for e in table["coordinators"].values()}

                os.kill(stats["coordinators"][1]["stats"]["pid"], signal.SIGKILL)  # no restarts left
                deadline = time.monotonic() + 30
                while "coordinator 1 failed for good" not in cluster.log():
                    assert time.monotonic() < deadline, cluster.log()[-3000:]
                    time.sleep(0.2)
                c.refresh()
                began = time.monotonic()
                with pytest.raises(WorkerDied, match="--max-restarts spent"):
                    c.infer("m/1", torch.randn(1, 4))
                assert time.monotonic() - began < 1.0
                assert c.infer("m/0", torch.randn(1, 4)).shape == (1, 2)  # the other one serves on

            assert cluster.stop(signal.SIGINT) == 0, cluster.log()[-3000:]
            assert cluster.left() == []
            deadline = time.monotonic() + 15
            while alive(pids) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert alive(pids) == [], "supervisors, coordinators or workers outlived Ctrl-C"
            assert cohort_shm(run_ids) == []
            assert answers(head.address) and address_file().read_text().strip() == head.address  # Ray runs on

            ray.init(address=head.address, logging_level="WARNING", log_to_driver=False)
            try:
                for name in ("cohort-directory", "cohort-coordinator-0", "cohort-coordinator-1"):
                    with pytest.raises(ValueError):
                        ray.get_actor(name, namespace="cohort")
                groups = ray.util.placement_group_table().values()
                assert groups and all(g["state"] == "REMOVED" for g in groups)
            finally:
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.close()
            head.stop()
