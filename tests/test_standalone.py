"""sparkmpi.run on a real Spark standalone cluster (master + worker on 127.0.0.1)."""

import json
import os
import subprocess
import sys

import pytest

from sparkmpi.launch.standalone import LocalCluster

pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)


def test_jobs_on_a_local_standalone_cluster():
    with LocalCluster(workers=1, cores=2) as cluster:
        assert cluster.alive_workers() == 1
        env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
        done = subprocess.run([sys.executable, os.path.join(HERE, "standalone", "driver.py"), cluster.master_url],
                              capture_output=True, text=True, timeout=240, env=env)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
        assert done.returncode == 0 and lines, done.stderr[-3000:]
        report = json.loads(lines[-1][len("REPORT "):])
    assert report["allreduce"] == [[0, 3.0, 6], [1, 3.0, 22]]
    assert report["helper"] == [[0, 2, 4], [1, 2, 4]]
    failure = report["failure"]
    assert failure["rank"] == 1 and failure["partition"] == 1
    assert "detector file missing on rank one" in failure["message"]
    assert report["after_failure"] == [[0, 2, 4], [1, 2, 4]]
    # Master, worker and executor process groups are gone.
    assert all(proc.poll() is not None for _, proc in cluster.processes) or not cluster.processes
