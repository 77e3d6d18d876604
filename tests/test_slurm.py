"""The README's SLURM recipe, exactly as written, through a real sbatch on simulated hosts.

Four hosts (network namespaces, see sparkmpi.launch.testbed), each running a
real slurmd under its host name; slurmctld and munged on the bridge.  The
recipe is read out of README.md, submitted with ``sbatch --wait``, and must
start Spark standalone on the allocation and run an MPI job across the nodes.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PIPELINE = '''
import json, socket
from pyspark.sql import SparkSession
import sparkmpi

def rank(comm, records):
    from mpi4py import MPI
    return [(comm.rank, comm.size, socket.gethostname(), comm.allreduce(sum(records), op=MPI.SUM))]

spark = SparkSession.builder.getOrCreate()
rdd = spark.sparkContext.parallelize(range(40), 4)
print("RESULT " + json.dumps(sparkmpi.run(rdd, rank)), flush=True)
spark.stop()
'''


def readme_recipe():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("### SLURM"):]
    return re.search(r"```sh\n(#!/bin/bash\n.*?)```", section, re.S).group(1)


def test_the_readme_sbatch_recipe_runs_an_mpi_job_across_slurm_nodes(tmp_path):
    from sparkmpi.launch import testbed as tb
    from sparkmpi.launch import testbed_slurm

    reason = tb.unavailable_reason() or testbed_slurm.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    recipe = readme_recipe()
    nodes = int(re.search(r"--nodes=(\d+)", recipe).group(1))
    home = tmp_path / "home"
    home.mkdir()
    (home / "sparkmpi").mkdir()                          # the recipe sources $HOME/sparkmpi/.venv
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), home / "sparkmpi" / ".venv")
    submit = tmp_path / "submit"
    submit.mkdir()
    (submit / "job.sh").write_text(recipe)
    (submit / "my_pipeline.py").write_text(PIPELINE)
    bed = tb.up(nodes, spark=False)
    cluster = None
    try:
        cluster = testbed_slurm.SlurmCluster(bed).start()
        env = dict(cluster.environment(), HOME=str(home))
        done = subprocess.run(["sbatch", "--wait", "--parsable", "job.sh"], cwd=submit, env=env,
                              capture_output=True, text=True, timeout=400)
        job = done.stdout.strip().split(";")[0]
        out = (submit / f"slurm-{job}.out").read_text() if job else ""
        assert done.returncode == 0, f"{done.stderr}\n{out[-5000:]}"
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert lines, out[-5000:]
        result = json.loads(lines[-1][len("RESULT "):])
    finally:
        if cluster is not None:
            cluster.stop()
        problems = bed.down()
        assert not problems and not bed.leftovers(), (problems, bed.leftovers())
        shutil.rmtree(bed.log_dir, ignore_errors=True)
        if cluster is not None:
            shutil.rmtree(cluster.folder, ignore_errors=True)
    assert [r[0] for r in result] == [0, 1, 2, 3] and all(r[1] == 4 for r in result)
    assert all(r[3] == sum(range(40)) for r in result)
    assert {r[2] for r in result} <= {h.hostname for h in bed.hosts}
    assert len({r[2] for r in result}) >= 2, result      # across nodes, not one
