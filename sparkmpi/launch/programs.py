"""Ranks that are external programs: ``sparkmpi exec``, :func:`run_program`, :func:`pipe`.

Each rank is one Spark barrier task running ``argv`` (``python script.py``,
or any executable linked against MPICH's ABI) with its PMI wiring, as for a
Python rank.  The parts:

- :mod:`.program_task`: the executor side (the relay of one program rank);
- :mod:`.program_relay`: what that relay decides, with no I/O;
- :mod:`.program_job`: the driver side (the stage, output, exit status);
- :mod:`.spawned`: the children of a rank's ``MPI_Comm_spawn``;
- this module: the public calls, which check their arguments first.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import Settings
from ..errors import InvalidArgument, InvalidArgumentType, JobFailed, JobTimeout
from .echo import LineEcho
from .job import local_cores, ranks_of_rdd
from .program_job import ProgramJob, ProgramResult, describe_exit
from .program_task import FILES_DIR_VARIABLE, FRAME_HEADER, encode_records

__all__ = ["run_program", "pipe", "ProgramResult", "describe_exit", "encode_records", "FRAME_HEADER",
           "FILES_DIR_VARIABLE"]


def _check_argv(argv) -> list:
    if isinstance(argv, (str, bytes)) or not hasattr(argv, "__iter__"):
        raise InvalidArgumentType(f"argv: expected a list of strings such as ['./prog', '-x'], got {argv!r}")
    argv = list(argv)
    if not argv or not all(isinstance(a, str) and a for a in argv[:1]) or \
            not all(isinstance(a, str) for a in argv):
        raise InvalidArgument(f"argv: expected a non-empty list of strings, got {argv!r}")
    return argv


def _check_env(env) -> dict:
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                                            for k, v in env.items()):
        raise InvalidArgumentType(f"env: expected a dict of str names to str values, got {env!r}")
    return dict(env)


def _settings(settings, overrides) -> Settings:
    from .world import _settings as world_settings

    return world_settings(settings, overrides)


def run_program(spark, argv, *, ranks: int, env: dict | None = None, cwd: str | None = None,
                timeout: float | None = None, stdin=None, echo: bool = False, prefix_rank: bool = False,
                files=(), check: bool = False, settings: Settings | None = None, **setting_overrides: Any) -> ProgramResult:
    """Run the MPI program ``argv`` as ``ranks`` Spark barrier tasks, like ``mpiexec -n ranks argv``.

    Parameters
    ----------
    spark : SparkSession or SparkContext
    argv : list of str
        The program and its arguments (``["python", "script.py"]``, ``["./a.out", "-n", "3"]``),
        resolved on the executors (the venv's ``bin`` is first on PATH).
    ranks : int
        Size of the program's ``MPI_COMM_WORLD``: one task slot each.
    env : dict, optional
        Extra environment variables for every rank.
    cwd : str, optional
        Working directory of the ranks (default: the Spark worker's).
    timeout : float, optional
        Seconds the whole job may take; then every rank is stopped and
        :attr:`ProgramResult.returncode` is 124.
    stdin : bytes or binary file, optional
        Rank 0's standard input (others read end-of-file at once).
    echo, prefix_rank : bool
        Write the ranks' output to this process's stdout/stderr as it comes
        (whole lines; with ``[rank] `` before each, like ``mpiexec -prepend-rank``).
    files : list of str
        Local files to ship to every executor (``SparkContext.addFile``);
        without ``cwd`` the ranks run in the executor's folder of them, which
        is also first on PATH and in ``$SPARKMPI_FILES_DIR``.
    check : bool
        Raise :class:`~sparkmpi.JobFailed` when a rank failed.

    Returns
    -------
    ProgramResult
        Exit status as ``mpiexec`` gives it, each rank's status and output.
    """
    sc = getattr(spark, "sparkContext", spark)
    if not hasattr(sc, "parallelize") or not hasattr(sc, "cancelJobsWithTag"):
        raise InvalidArgumentType(f"spark: expected a SparkSession or SparkContext, got {type(spark).__name__}")
    argv = _check_argv(argv)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise InvalidArgument(f"ranks: expected a positive integer, got {ranks!r}")
    env = _check_env(env)
    if cwd is not None and not isinstance(cwd, str):
        raise InvalidArgumentType(f"cwd: expected a directory path, got {cwd!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    if stdin is not None and not isinstance(stdin, (bytes, bytearray)) and not hasattr(stdin, "fileno"):
        raise InvalidArgumentType(f"stdin: expected bytes or a binary file, got {type(stdin).__name__}")
    cores = local_cores(sc.master)
    if cores is not None and ranks > cores:
        raise InvalidArgument(f"ranks={ranks} but master {sc.master!r} has {cores} task slots; "
                              f"each rank needs one (use ranks <= {cores})")
    if isinstance(files, str) or not all(isinstance(f, str) for f in files):
        raise InvalidArgumentType(f"files: expected a list of paths, got {files!r}")
    for path in files:
        if not os.path.isfile(path):
            raise InvalidArgument(f"files: {path!r} is not a file")
    settings = _settings(settings, setting_overrides)
    for path in files:
        sc.addFile(os.path.abspath(path))
    job = ProgramJob(sc, ranks, argv, settings=settings, env=env, cwd=cwd, stdin=stdin, echo=echo,
                     prefix_rank=prefix_rank, files=bool(files))
    result = job.run(sc.parallelize(range(ranks), ranks), timeout)
    return result.check() if check else result


def pipe(rdd, argv, *, binary: bool = False, env: dict | None = None, cwd: str | None = None,
         timeout: float | None = None, settings: Settings | None = None, **setting_overrides: Any):
    """Like ``RDD.pipe``, but the program's ranks form one MPI world.

    Rank ``i`` runs ``argv`` with partition ``i``'s records on its stdin: one
    line per record (``str`` of it), or with ``binary`` each record (bytes
    or a NumPy array, written C-ordered) after its length in bytes as an
    8-byte little-endian integer.  The lines the ranks print on stdout are
    the result; their stderr goes to this process's.

    Unlike ``RDD.pipe`` the program runs when ``pipe`` is called, not at the
    first action on the result: all ranks must run at once as one MPI job,
    whose failure is raised here.  The printed lines are held by the driver
    until then and served from it.

    Returns
    -------
    pyspark.RDD of str
        One partition per rank, in rank order: partition ``i`` holds the
        lines rank ``i`` printed (without newlines), so ``collect()`` gives
        rank 0's lines first and ``glom()`` them rank by rank.

    Raises
    ------
    JobFailed
        When a rank exited non-zero, was killed, called MPI_Abort, or the
        job timed out (JobTimeout); the message names rank, host and cause.
    """
    if not hasattr(rdd, "barrier") or not hasattr(rdd, "getNumPartitions"):
        raise InvalidArgumentType(f"rdd: expected a pyspark RDD, got {type(rdd).__name__}")
    argv = _check_argv(argv)
    env = _check_env(env)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    sc = rdd.context
    size = ranks_of_rdd(rdd)
    settings = _settings(settings, setting_overrides)
    job = ProgramJob(sc, size, argv, settings=settings, env=env, cwd=cwd, pipe=True, binary=binary)
    job.echo = LineEcho(prefix_rank=True)  # stderr only: stdout is the result
    result = job.run(rdd, timeout)
    if result.returncode != 0:
        cls = JobTimeout if result.returncode == 124 else JobFailed
        tails = "".join(f"\n--- stderr of rank {r} ---\n{err.decode('utf-8', 'replace')[-2000:]}"
                        for r, err in enumerate(result.stderr) if err)
        raise cls(f"sparkmpi.pipe: {result.message}{tails}", job_id=job.kvsname, cause=result.message or "")
    # parallelize slices a list of `size` items into `size` partitions of one item each: rank i's lines.
    return sc.parallelize(result.records, size).flatMap(_lines)


def _lines(lines):
    return lines
