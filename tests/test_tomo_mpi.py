"""Projection-distributed SIRT under a real ``mpiexec`` equals the one-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MPIEXEC = Path(sys.executable).with_name("mpiexec")

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mpi4py import MPI
    from sparkmpi.tomo import default_angles, project_volume, shepp_logan_3d, sirt, sirt_projections_rank
    from sparkmpi.tomo.io import TiltSeries
    from sparkmpi.tomo.mpi import projection_records, sirt_rank, split_records

    comm = MPI.COMM_WORLD
    n_angles = int(sys.argv[1])
    volume = shepp_logan_3d(32)[12:18]
    angles = default_angles(n_angles, 70.0)
    proj = project_volume(volume, angles)                 # (n_angles, n_slices, n_rays)
    serial = sirt(proj.transpose(1, 0, 2), angles, iterations=25, positivity=True)

    # contiguous share of the projections per rank, through the Spark-MPI style entry point
    records = split_records(projection_records(TiltSeries(proj, angles)), comm.rank, comm.size)
    out = list(sirt_rank(comm, records, n_slices=proj.shape[1], n_rays=proj.shape[2], only_root=False,
                         iterations=25, positivity=True))
    contiguous = out[0]
    # interleaved share through the per-rank function
    mine = slice(comm.rank, None, comm.size)
    interleaved = sirt_projections_rank(comm, proj[mine], angles[mine], iterations=25, positivity=True)

    local = np.array([np.abs(contiguous - serial).max(), np.abs(interleaved - serial).max(),
                      float(len(records))])
    worst = np.empty_like(local)
    comm.Allreduce(local[:2].copy(), worst[:2], op=MPI.MAX)
    counts = comm.allgather(len(records))
    if comm.rank == 0:
        print(json.dumps({"size": comm.size, "contiguous": float(worst[0]), "interleaved": float(worst[1]),
                          "counts": counts, "scale": float(np.abs(serial).max())}))
""")


def _run(tmp_path, ranks: int, n_angles: int) -> dict:
    script = tmp_path / "sirt_mpi.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(script), str(n_angles)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"mpiexec failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not in the virtual environment")
def test_sirt_over_two_ranks_equals_serial(tmp_path):
    result = _run(tmp_path, 2, 20)
    assert result["size"] == 2 and result["counts"] == [10, 10]
    assert result["contiguous"] < 1e-5 * result["scale"]
    assert result["interleaved"] < 1e-5 * result["scale"]


@pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not in the virtual environment")
def test_sirt_with_a_rank_holding_no_projections(tmp_path):
    result = _run(tmp_path, 3, 2)
    assert result["counts"] == [0, 1, 1]
    assert result["contiguous"] < 1e-5 * result["scale"]
