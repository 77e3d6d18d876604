"""External MPI programs as ranks: ``sparkmpi exec``, ``run_program`` and ``pipe`` with a C code
compiled here by the mpich wheel's ``mpicc``; real Spark, real MPICH."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import sparkmpi
from sparkmpi import cli
from sparkmpi.errors import InvalidArgument, InvalidArgumentType, JobFailed

MPICC = os.path.join(os.path.dirname(sys.executable), "mpicc")

# Rank r makes values (r + 1) * i for i < N (N from argv), prints its own sum,
# and rank 0 prints the Allreduce'd sum and sum of squares; "crash" makes rank 1
# segfault after the first barrier; "abort" makes rank 1 call MPI_Abort(..., 3).
STATS_C = r"""
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long n = argc > 1 ? atol(argv[1]) : 10;
    const char *mode = argc > 2 ? argv[2] : "";
    double local[2] = {0, 0}, total[2];
    for (long i = 0; i < n; i++) { double v = (rank + 1.0) * i; local[0] += v; local[1] += v * v; }
    printf("rank %d of %d sum %.1f\n", rank, size, local[0]);
    fflush(stdout);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 1 && strcmp(mode, "crash") == 0) raise(SIGSEGV);
    if (rank == 1 && strcmp(mode, "abort") == 0) MPI_Abort(MPI_COMM_WORLD, 3);
    MPI_Allreduce(local, total, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("total %.1f %.1f\n", total[0], total[1]);
    MPI_Finalize();
    return 0;
}
"""

# ``pipe``'s program: reads one number per stdin line, prints how many it read and
# its sum, then rank 0 prints the global sum.
PIPE_SUM_C = r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    double x, local = 0, total;
    long count = 0;
    while (scanf("%lf", &x) == 1) { local += x; count++; }
    MPI_Allreduce(&local, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    printf("%d %ld %.3f\n", rank, count, local);
    if (rank == 0) printf("total %.3f\n", total);
    MPI_Finalize();
    return 0;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The C programs above, compiled with the wheel's mpicc into a temporary folder."""
    folder = tmp_path_factory.mktemp("mpi-programs")
    built = {}
    for name, source in (("stats", STATS_C), ("pipe_sum", PIPE_SUM_C)):
        (folder / f"{name}.c").write_text(source)
        subprocess.run([MPICC, "-O1", "-o", str(folder / name), str(folder / f"{name}.c")], check=True,
                       timeout=120)
        built[name] = str(folder / name)
    return built


def expected_totals(n, ranks):
    values = np.concatenate([(r + 1.0) * np.arange(n) for r in range(ranks)])
    return values.sum(), (values ** 2).sum()


def test_run_program_compiled_code_matches_numpy(spark, programs):
    result = sparkmpi.run_program(spark, [programs["stats"], "1000"], ranks=2, timeout=60)
    assert result.returncode == 0 and result.exit_codes == [0, 0], result.message
    total, squares = expected_totals(1000, 2)
    assert result.stdout[0].decode().splitlines() == [f"rank 0 of 2 sum {(np.arange(1000)).sum():.1f}",
                                                      f"total {total:.1f} {squares:.1f}"]
    assert result.stdout[1].decode() == f"rank 1 of 2 sum {2.0 * np.arange(1000).sum():.1f}\n"


def test_exec_cli_streams_prefixed_output_and_exits_zero(spark, programs, capfd):
    code = cli.main(["exec", "-n", "2", "--prefix-rank", "--", programs["stats"], "10"])
    out, err = capfd.readouterr()
    total, squares = expected_totals(10, 2)
    assert code == 0, err
    assert sorted(out.splitlines()) == sorted(["[0] rank 0 of 2 sum 45.0", "[1] rank 1 of 2 sum 90.0",
                                               f"[0] total {total:.1f} {squares:.1f}"])


def test_exec_files_reach_every_executor_and_the_ranks_run_beside_them(spark, tmp_path, capfd):
    # Names of their own: Spark refuses a second addFile of one name from another path.
    data, reader = tmp_path / f"numbers_{tmp_path.name}.txt", tmp_path / f"reader_{tmp_path.name}.py"
    data.write_text("\n".join(str(k) for k in range(1, 11)) + "\n")
    reader.write_text(textwrap.dedent(f"""
        import os, sys
        from mpi4py import MPI
        shipped = os.path.dirname(os.path.abspath(sys.argv[0]))  # the executor's copy (SparkFiles' folder)
        here = os.getcwd() == os.environ["SPARKMPI_FILES_DIR"] == shipped
        total = sum(int(line) for line in open("{data.name}"))
        print(MPI.COMM_WORLD.rank, here, shipped != {str(tmp_path)!r}, MPI.COMM_WORLD.allreduce(total))
    """))
    code = cli.main(["exec", "-n", "2", "--files", f"{data},{reader}", "--", "python", reader.name])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert sorted(out.splitlines()) == ["0 True True 110", "1 True True 110"]


def test_exec_cli_segfault_on_one_rank_fails_cleanly(spark, programs, capfd):
    started = time.monotonic()
    code = cli.main(["exec", "-n", "2", "--", programs["stats"], "10", "crash"])
    out, err = capfd.readouterr()
    assert code == 11  # Hydra's mpiexec exits with the signal number too
    assert "rank 1 (on " in err and "SIGSEGV" in err, err
    assert "rank 0 of 2" in out  # output written before the crash still arrived
    assert time.monotonic() - started < 30


def test_mpi_abort_code_is_the_exit_status(spark, programs):
    result = sparkmpi.run_program(spark, [programs["stats"], "10", "abort"], ranks=2, timeout=60)
    assert result.returncode == 3 and "MPI_Abort with exit code 3" in result.message
    assert result.message.startswith("rank 1 (on ")


def test_pipe_feeds_partitions_to_a_compiled_code(sc, programs):
    numbers = np.random.default_rng(7).uniform(-5, 5, size=101).round(3)
    rdd = sc.parallelize(numbers.tolist(), 2)
    parts = rdd.glom().collect()
    lines = sparkmpi.pipe(rdd, [programs["pipe_sum"]], timeout=60)
    assert lines.getNumPartitions() == 2  # an RDD, like RDD.pipe: partition i holds rank i's lines
    assert lines.glom().collect() == [[f"0 {len(parts[0])} {sum(parts[0]):.3f}", f"total {numbers.sum():.3f}"],
                                      [f"1 {len(parts[1])} {sum(parts[1]):.3f}"]]
    assert lines.map(len).count() == 3  # and it is computed on like any other


def test_pipe_binary_framing_carries_numpy_arrays(sc):
    reader = textwrap.dedent("""
        import sys, numpy as np
        from mpi4py import MPI
        data, sums = sys.stdin.buffer, []
        while header := data.read(8):
            sums.append(float(np.frombuffer(data.read(int.from_bytes(header, "little")), np.float64).sum()))
        print(MPI.COMM_WORLD.rank, len(sums), MPI.COMM_WORLD.allreduce(sum(sums)))
    """)
    arrays = [np.arange(k, dtype=np.float64) for k in (3, 5, 7, 11)]
    lines = sparkmpi.pipe(sc.parallelize(arrays, 2), ["python", "-c", reader], binary=True, timeout=60)
    total = float(sum(a.sum() for a in arrays))
    assert lines.collect() == [f"0 2 {total}", f"1 2 {total}"]


def test_stdin_env_arguments_and_exit_codes(spark):
    script = ("import os, sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
              "print(c.rank, sys.argv[1:], os.environ['COLOUR'], sys.stdin.read().strip()); "
              "sys.exit(5 if c.rank == 1 else 0)")
    result = sparkmpi.run_program(spark, ["python", "-c", script, "a b", "c"], ranks=2, env={"COLOUR": "teal"},
                                  stdin=b"to rank zero\n", timeout=60)
    assert result.stdout == [b"0 ['a b', 'c'] teal to rank zero\n", b"1 ['a b', 'c'] teal \n"]
    # Rank 0 ends on its own or, when rank 1's failure reaches it first, is stopped by the abort (as under mpiexec).
    assert result.exit_codes[1] == 5 and result.exit_codes[0] in (0, -signal.SIGTERM) and result.returncode == 5
    assert result.message.startswith("rank 1 (on ") and "exited with code 5" in result.message
    with pytest.raises(JobFailed, match="exited with code 5"):
        result.check()


def test_timeout_stops_every_rank_within_seconds(spark):
    started = time.monotonic()
    result = sparkmpi.run_program(spark, ["python", "-c", "import time; from mpi4py import MPI; time.sleep(60)"],
                                  ranks=2, timeout=4)
    assert result.returncode == 124 and "timed out after 4 s" in result.message
    assert time.monotonic() - started < 15
    assert all(code is not None and code < 0 for code in result.exit_codes), result.exit_codes


def test_a_missing_program_fails_with_its_name(spark):
    result = sparkmpi.run_program(spark, ["/nonexistent/mpi-program"], ranks=1, timeout=60)
    assert result.returncode == 127 and "/nonexistent/mpi-program" in result.message
    assert "No such file or directory" in result.message


def test_network_interface_reaches_the_programs_environment_unless_the_user_chose():
    from sparkmpi.config import Settings
    from sparkmpi.launch.program_task import ProgramSpec, program_environment

    def spec(env):
        return ProgramSpec("h", 1, "kvs", "t", 2, "h", 2, ("prog",), settings=Settings(network_interface="eth0"),
                           env=env)

    env = program_environment(spec({}), 0, 5, ["a", "b"], environ={"PATH": "/bin"})
    assert env["UCX_NET_DEVICES"] == env["FI_TCP_IFACE"] == "eth0"
    assert program_environment(spec({"UCX_NET_DEVICES": "ib0"}), 0, 5, ["a", "b"], environ={})["UCX_NET_DEVICES"] == "ib0"


def test_a_network_interface_the_host_lacks_fails_the_program_naming_it(spark, programs):
    result = sparkmpi.run_program(spark, [programs["stats"]], ranks=1, timeout=60, network_interface="ib7")
    assert result.returncode != 0
    assert "network_interface 'ib7' does not exist on host" in result.message, result.message


def test_pipe_failure_raises_with_rank_and_stderr(sc):
    with pytest.raises(JobFailed, match=r"rank 0 \(on .*exited with code 1[\s\S]*bad input"):
        sparkmpi.pipe(sc.parallelize(range(2), 2),
                      ["python", "-c", "import sys; from mpi4py import MPI; c = MPI.COMM_WORLD\n"
                       "if c.rank == 0: sys.exit('bad input')\nc.Barrier()"], timeout=60)


@pytest.mark.parametrize("call, error, fragment", [
    (lambda s: sparkmpi.run_program(s, "ls", ranks=1), InvalidArgumentType, "argv"),
    (lambda s: sparkmpi.run_program(s, [], ranks=1), InvalidArgument, "argv"),
    (lambda s: sparkmpi.run_program(s, ["x"], ranks=0), InvalidArgument, "ranks"),
    (lambda s: sparkmpi.run_program(s, ["x"], ranks=3), InvalidArgument, "task slots"),
    (lambda s: sparkmpi.run_program(s, ["x"], ranks=1, env={"A": 1}), InvalidArgumentType, "env"),
    (lambda s: sparkmpi.run_program(s, ["x"], ranks=1, timeout=0), InvalidArgument, "timeout"),
    (lambda s: sparkmpi.run_program(s, ["x"], ranks=1, files=["/nonexistent"]), InvalidArgument, "files"),
    (lambda s: sparkmpi.pipe([1, 2], ["x"]), InvalidArgumentType, "rdd"),
])
def test_bad_arguments_are_refused_before_anything_runs(spark, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call(spark)


def test_exec_usage_errors(capsys):
    assert cli.main(["exec", "-n", "2"]) == 2
    assert "no program given" in capsys.readouterr().err
    assert cli.main(["exec", "-n", "2", "--env", "NOEQUALS", "--", "true"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_ctrl_c_stops_every_rank_within_seconds(spark, tmp_path):
    import _thread
    import threading

    marker = tmp_path / "started"
    script = (f"import time, pathlib; from mpi4py import MPI; pathlib.Path('{marker}-%d' % MPI.COMM_WORLD.rank)"
              ".touch(); time.sleep(60)")

    def interrupt_once_both_run():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all((tmp_path / f"started-{r}").exists() for r in (0, 1)):
            time.sleep(0.05)
        _thread.interrupt_main()  # what Ctrl-C does to `sparkmpi exec`

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sparkmpi.run_program(spark, ["python", "-c", script], ranks=2, timeout=60)
    assert time.monotonic() - started < 20
    # The leak check (tests/leaks.py) fails the test if a rank outlived the interrupt.


def _pyspark_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"pyspark" in fh.read()
    except OSError:
        return False


def test_a_frozen_relay_fails_the_program_job_within_host_timeout_naming_rank_and_host(spark, tmp_path):
    """SIGSTOP of rank 1's relay (the Spark task's Python worker, the program's parent), as a host
    that went silent: the heartbeat fails the job in about host_timeout, rank 0 is stopped."""
    import threading

    script = ("import os, time; from mpi4py import MPI; r = MPI.COMM_WORLD.rank; "
              f"p = os.path.join({str(tmp_path)!r}, 'relay-%d' % r); open(p + '.tmp', 'w').write(str(os.getppid())); "
              "os.rename(p + '.tmp', p); time.sleep(60)")
    frozen: dict = {}

    def freeze_rank_1s_relay():
        marker = tmp_path / "relay-1"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            pid = int(marker.read_text())
            if _pyspark_worker(pid):
                os.kill(pid, signal.SIGSTOP)
                frozen.update(pid=pid, at=time.monotonic())

    freezer = threading.Thread(target=freeze_rank_1s_relay, daemon=True)
    freezer.start()
    try:
        result = sparkmpi.run_program(spark, ["python", "-c", script], ranks=2, timeout=60, host_timeout=2)
        returned = time.monotonic()
    finally:
        freezer.join(65)
        if "pid" in frozen and _pyspark_worker(frozen["pid"]):
            os.kill(frozen["pid"], signal.SIGCONT)    # Spark normally killed it already
    assert "pid" in frozen, "rank 1's relay was never found"
    assert result.returncode == 1 and "\n" not in result.message and "Spark stage" not in result.message, \
        result.message
    assert re.search(r"no contact for \d+ s with the relay of rank 1 on host \S+ \(host_timeout is 2 s\)",
                     result.message), result.message
    # Detection takes host_timeout; then Spark takes a few s to kill the frozen task (no orphan is left:
    # the leak check); the other rank was stopped by the abort.
    assert returned - frozen["at"] < 12, returned - frozen["at"]
    assert result.exit_codes[0] is not None and result.exit_codes[0] < 0 and result.exit_codes[1] is None
