"""``sparkmpi bench exec``: an MPI program through ``sparkmpi exec`` against ``mpiexec``.

Side by side in one run, on a warm SparkSession (one job run first):

* ``exec_s``: a trivial compiled MPI program (init, rank, finalize; built
  here with the wheel's ``mpicc``) start to exit through
  :func:`sparkmpi.run_program`, median of ``--repeats``;
* ``mpiexec_s``: the same program under ``mpiexec -n RANKS`` (Hydra);
* ``spawn_s`` / ``mpiexec_spawn_s``: a Python parent of ``RANKS`` ranks that
  spawns 2 children, gathers from them and exits, both ways;
* ``exec_over_mpiexec``, ``spawn_over_mpiexec``: the ratios (aim: exec <= 3x).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from ..errors import UsageError

NAME = "exec"
HELP = "an MPI program through sparkmpi exec vs mpiexec (start to exit, and a spawn)"

TRIVIAL_C = r"""
#include <mpi.h>
int main(int argc, char **argv) { int r; MPI_Init(&argc, &argv); MPI_Comm_rank(MPI_COMM_WORLD, &r);
                                  MPI_Finalize(); return 0; }
"""
SPAWN_PY = """
import sys
from mpi4py import MPI
if len(sys.argv) > 1:
    p = MPI.Comm.Get_parent(); p.gather(MPI.COMM_WORLD.rank, root=0); p.Disconnect()
else:
    inter = MPI.COMM_WORLD.Spawn(sys.executable, args=[sys.argv[0], "child"], maxprocs=2)
    got = inter.gather(None, root=MPI.ROOT if MPI.COMM_WORLD.rank == 0 else MPI.PROC_NULL)
    assert MPI.COMM_WORLD.rank != 0 or got == [0, 1], got
    inter.Disconnect()
"""


def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="runs timed each way (default 10)")
    parser.add_argument("--master", default=None, help="Spark master (default local[RANKS])")


def _timed(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args) -> dict:
    if args.ranks < 1 or args.repeats < 1:
        raise UsageError("--ranks and --repeats must be >= 1")
    import sparkmpi
    from sparkmpi.launch.session import spark_session

    bin_dir = os.path.dirname(sys.executable)
    ranks, master = args.ranks, args.master or f"local[{args.ranks}]"
    print(f"bench exec: {ranks} ranks, master {master}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sparkmpi-bench-exec-") as folder:
        source, program = os.path.join(folder, "trivial.c"), os.path.join(folder, "trivial")
        with open(source, "w") as fh:
            fh.write(TRIVIAL_C)
        subprocess.run([os.path.join(bin_dir, "mpicc"), "-o", program, source], check=True, timeout=120)
        spawner = os.path.join(folder, "spawn.py")
        with open(spawner, "w") as fh:
            fh.write(SPAWN_PY)
        session = spark_session(master, "sparkmpi-bench-exec")

        def through_sparkmpi(argv):
            def once():
                result = sparkmpi.run_program(session, argv, ranks=ranks, timeout=120)
                if result.returncode != 0:
                    raise RuntimeError(f"{argv[-1]} failed under sparkmpi: {result.message}")
            return once

        def through_mpiexec(argv):
            def once():
                subprocess.run([os.path.join(bin_dir, "mpiexec"), "-n", str(ranks), *argv], check=True,
                               timeout=120, stdout=subprocess.DEVNULL)
            return once

        try:
            through_sparkmpi([program])()  # Spark warm: workers started, first stage done
            exec_s = _timed(through_sparkmpi([program]), args.repeats)
            mpiexec_s = _timed(through_mpiexec([program]), args.repeats)
            spawn_s = _timed(through_sparkmpi([sys.executable, spawner]), args.repeats)
            mpiexec_spawn_s = _timed(through_mpiexec([sys.executable, spawner]), args.repeats)
        finally:
            session.stop()
    print(f"  exec {exec_s:.3f} s vs mpiexec {mpiexec_s:.3f} s; spawn {spawn_s:.3f} s vs {mpiexec_spawn_s:.3f} s",
          file=sys.stderr)
    return {"ranks": ranks, "master": master, "repeats": args.repeats,
            "exec_s": exec_s, "mpiexec_s": mpiexec_s, "exec_over_mpiexec": exec_s / mpiexec_s,
            "spawn_s": spawn_s, "mpiexec_spawn_s": mpiexec_spawn_s, "spawn_over_mpiexec": spawn_s / mpiexec_spawn_s}
