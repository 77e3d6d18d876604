"""sparkmpi.run on a real Spark standalone cluster (master + worker on 127.0.0.1)."""

import json
import os
import subprocess
import sys

import pytest

from sparkmpi.launch.standalone import LocalCluster

pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)


def _cluster_processes(groups, marker):
    """Live processes in one of the process groups ``groups`` or whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and (int(fields[2]) in groups or marker in cmdline):
            found.append(f"{entry} (group {fields[2]}): {cmdline[:200]}")
    return found


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_jobs_on_a_local_standalone_cluster():
    with LocalCluster(workers=1, cores=2) as cluster:
        groups = {proc.pid for _, proc in cluster.processes}   # each started in its own session
        assert len(groups) == 2 and all(os.getpgid(pid) == pid for pid in groups)
        assert len(_cluster_processes(groups, cluster.master_url)) >= 2
        assert cluster.alive_workers() == 1
        env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
        done = subprocess.run([sys.executable, os.path.join(HERE, "standalone", "driver.py"), cluster.master_url],
                              capture_output=True, text=True, timeout=180, env=env)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
        assert done.returncode == 0 and lines, done.stderr[-3000:]
        report = json.loads(lines[-1][len("REPORT "):])
    assert report["allreduce"] == [[0, 3.0, 6], [1, 3.0, 22]]
    assert report["helper"] == [[0, 2, 4], [1, 2, 4]]
    failure = report["failure"]
    assert failure["rank"] == 1 and failure["partition"] == 1
    assert "detector file missing on rank one" in failure["message"]
    assert report["after_failure"] == [[0, 2, 4], [1, 2, 4]]
    # The executor killed mid-job: a clear error within seconds, and a new executor for the next job.
    lost = report["lost"]
    assert lost is not None and lost["type"] == "JobFailed", lost
    # (Spark's own text for now: "the Spark stage failed: An error occurred while calling ...".)
    assert lost["seconds"] < 60 and lost["message"].startswith("MPI world sparkmpi_"), lost
    # Found by the leak check: MPICH's segment of the lost job stays in /dev/shm unless someone removes
    # it (the driver script does, by the job's id); once the launcher removes it, this list is empty.
    assert all(path.startswith("/dev/shm/mpich_") for path in lost["segments_left"]), lost
    (before,), (after,) = report["executor_before"], report["executor_after"]
    assert before != after and not _running(before)
    # Master, worker and executor processes (by process group and by the master's URL) are gone.
    assert not _running(after)
    assert _cluster_processes(groups, cluster.master_url) == []
