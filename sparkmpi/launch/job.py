"""The driver side of a job: :func:`run`.

``run(rdd, fn)`` opens a key space on the driver's PMI server, runs one Spark
barrier stage with one task per partition (rank = partition index), and
watches the job from the driver: the first failure of any rank, a job
timeout, or ranks that never connect make it abort every rank (through their
relays), cancel the Spark job, and raise :class:`~sparkmpi.errors.JobFailed`
naming the rank, its partition and the cause.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Iterable

import cloudpickle

from ..config import Settings, load_settings
from ..errors import JobFailed, JobTimeout
from ..pmi.server import PMIServer
from .task import TaskSpec, run_rank_task

log = logging.getLogger("sparkmpi.launch")

_server: PMIServer | None = None
_server_lock = threading.Lock()
_pickle_lock = threading.Lock()

RankFunction = Callable[[Any, Iterable[Any]], Iterable[Any] | None]


def get_server(host: str, port: int = 0) -> PMIServer:
    """The driver's PMI server on ``host`` (started on first use, shared by jobs)."""
    global _server
    with _server_lock:
        if _server is not None and (_server.host != host or not _server.alive
                                    or (port and _server.port != port)):
            _server.close()
            _server = None
        if _server is None:
            _server = PMIServer(host, port)
        return _server


def shutdown_server() -> None:
    """Stop the driver's PMI server (a later job starts a new one)."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


def _local_cores(master: str) -> int | None:
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if not match:
        return None
    if match.group(1) in (None,):
        return 1
    if match.group(1) == "*":
        return os.cpu_count() or 1
    return int(match.group(1))


def resolve_host(settings: Settings, sc) -> str:
    if settings.pmi_host != "auto":
        return settings.pmi_host
    if _local_cores(sc.master) is not None:
        return "127.0.0.1"
    return sc.getConf().get("spark.driver.host", "127.0.0.1")


def _is_importable_elsewhere(module_name: str) -> bool:
    """True for modules a worker can import too (stdlib, installed packages, sparkmpi)."""
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in ("sparkmpi", "pyspark", "builtins"):
        return True
    path = getattr(sys.modules.get(module_name), "__file__", None) or ""
    return "site-packages" in path or "dist-packages" in path


def _function_modules(fn) -> set:
    """Names of the modules that define ``fn`` (through partials; callable instances' classes)."""
    targets = [fn]
    while isinstance(targets[-1], functools.partial):
        targets.append(targets[-1].func)
    names = set()
    for target in targets:
        names.add(getattr(target, "__module__", None))
        names.add(getattr(type(target), "__module__", None))  # callable instances
    return {n for n in names if n and n in sys.modules}


def _local_modules(fn) -> list:
    """Modules whose code ``fn`` needs but a worker may not be able to import."""
    return [sys.modules[n] for n in _function_modules(fn)
            if n != "__main__" and not _is_importable_elsewhere(n)]


def preload_modules(fn, listed=()) -> tuple:
    """What the fork servers should import for ``fn``'s ranks: ``listed``, then
    the modules of ``fn`` that are sparkmpi's own (known to start no threads)."""
    own = sorted(n for n in _function_modules(fn) if n.startswith("sparkmpi."))
    return tuple(dict.fromkeys([*listed, *own]))


def pickle_function(fn: RankFunction) -> bytes:
    """Pickle ``fn`` for the ranks; code from local modules travels by value.

    Functions from a script or test module the workers cannot import are
    pickled with their code, so users need no ``addPyFile`` for them.
    """
    modules = _local_modules(fn)
    # cloudpickle's by-value registry is global: jobs submitted from several
    # threads at once must not unregister a module under another's feet.
    with _pickle_lock:
        for module in modules:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps(fn, protocol=5)
        finally:
            for module in modules:
                cloudpickle.unregister_pickle_by_value(module)


def run(rdd, fn: RankFunction, *, timeout: float | None = None, env: dict[str, str] | None = None,
        settings: Settings | None = None, **setting_overrides: Any) -> list:
    """Run ``fn(comm, partition)`` as one MPI rank per partition of ``rdd``.

    Parameters
    ----------
    rdd : pyspark.RDD
        Its partitions become the ranks: partition ``i`` runs as rank ``i``
        of an ``MPI.COMM_WORLD`` of size ``rdd.getNumPartitions()``.  All
        ranks are gang-scheduled as one Spark barrier stage, so the cluster
        needs at least that many free task slots.
    fn : callable
        ``fn(comm, records)`` with ``comm`` mpi4py's ``MPI.COMM_WORLD`` and
        ``records`` an iterator over the partition's records; it returns an
        iterable of results (or None).  Plain mpi4py code inside it
        (``from mpi4py import MPI; MPI.COMM_WORLD``) works unchanged.  Each
        rank runs in a fresh process, so module state does not carry over
        between jobs.
    timeout : float, optional
        Seconds the whole job may take; overrides ``SPARKMPI_JOB_TIMEOUT``.
    env : dict, optional
        Extra environment variables for the rank processes (for example
        MPICH's ``MPIR_CVAR_*``), set before MPI is initialised.
    settings : Settings, optional
        Launcher settings; by default from ``SPARKMPI_*`` variables.
    **setting_overrides
        Individual settings (``start_timeout=``, ``warm_pool=``, ...).

    Returns
    -------
    list
        The results of all ranks, concatenated in rank order (like ``collect()``).

    Raises
    ------
    JobFailed
        A rank raised, exited, called ``MPI_Abort``, or never connected; the
        message names the rank, its partition and the cause (with the
        remote traceback).  :class:`JobTimeout` when the timeout passed.
    ValueError, TypeError
        For bad arguments, before anything runs.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(comm, records), got {type(fn).__name__}")
    if not hasattr(rdd, "barrier") or not hasattr(rdd, "getNumPartitions"):
        raise TypeError(f"rdd must be a pyspark RDD, got {type(rdd).__name__}")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env must map str to str")
    if settings is None:
        settings = load_settings(job_timeout=timeout, **setting_overrides)
    else:
        overrides = {k: v for k, v in dict(job_timeout=timeout, **setting_overrides).items() if v is not None}
        settings = settings.replace(**overrides) if overrides else settings

    sc = rdd.context
    size = rdd.getNumPartitions()
    if size < 1:
        raise ValueError("rdd has no partitions; an MPI job needs at least one rank")
    cores = _local_cores(sc.master)
    if cores is not None and size > cores:
        raise ValueError(f"rdd has {size} partitions but master {sc.master!r} has {cores} task slots; "
                         f"a barrier stage needs one slot per rank (repartition to <= {cores})")

    host = resolve_host(settings, sc)
    server = get_server(host, settings.pmi_port)
    job = server.open_job(size)
    spec = TaskSpec(server_host=host, server_port=server.port, kvsname=job.kvsname, token=job.token,
                    size=size, fn=pickle_function(fn), env=dict(env or {}),
                    warm_pool=settings.warm_pool, kill_grace=settings.kill_grace,
                    fork_server=settings.fork_server, single_host_netmod=settings.single_host_netmod,
                    preload=preload_modules(fn, settings.preload))
    tag = f"sparkmpi-{job.kvsname}"
    watch_state = {"timed_out": False}
    stop_watching = threading.Event()
    started = time.monotonic()
    # The stage runs in this thread: PySpark gives each new Python thread its
    # own JVM connection, which would add a fixed cost to every job.  A
    # watcher thread enforces the timeouts and cancels on failure.
    watcher = threading.Thread(target=_watch, name=tag, daemon=True,
                               args=(job, sc, tag, stop_watching, started, settings, watch_state))
    previous_interrupt = sc.getLocalProperty("spark.job.interruptOnCancel")
    sc.addJobTag(tag)
    sc.setInterruptOnCancel(True)
    spark_error: BaseException | None = None
    results: list = []
    watcher.start()
    try:
        results = rdd.barrier().mapPartitions(_bind(spec)).collect()
    except Exception as exc:  # noqa: BLE001  (turned into JobFailed below)
        spark_error = exc
    finally:
        stop_watching.set()
        watcher.join()
        sc.removeJobTag(tag)
        sc.setLocalProperty("spark.job.interruptOnCancel", previous_interrupt)
        job.close()
    timed_out = watch_state["timed_out"]

    failure = job.failure
    if failure is not None:
        cls = JobTimeout if timed_out else JobFailed
        message = f"MPI job {job.kvsname} failed: {failure.cause}"
        if timed_out and job.reports:
            message += "\n\nStacks of the ranks when they were stopped:\n" + "\n".join(
                f"--- {job.where(r)} ---\n{text}" for r, text in sorted(job.reports.items()))
        raise cls(message, job_id=job.kvsname,
                  rank=failure.rank, partition=job.partitions.get(failure.rank) if failure.rank is not None else None,
                  cause=failure.cause)
    if spark_error is not None:
        raise JobFailed(f"MPI job {job.kvsname}: the Spark stage failed: {_short(spark_error)}",
                        job_id=job.kvsname, cause=str(spark_error)) from spark_error
    return results


def _prepare_worker(warm_pool: int, fork_server: bool, timeout: float, preload: tuple, iterator):
    from . import pool

    for _ in iterator:
        pass  # read the partition, or PySpark discards this worker afterwards
    with pool._lock:   # no spares from the replenish timer between the two calls
        if preload and fork_server:
            pool.drop_spares_without(preload)
        pool.replenish(warm_pool, fork_server, block=True, preload=preload)
    return [(os.getpid(), pool.wait_ready(timeout))]


def warm_up(sc, *, warm_pool: int | None = None, fork_server: bool | None = None,
            preload=None, timeout: float = 30.0) -> list[tuple[int, int]]:
    """Start every Spark Python worker and its warm rank spares ahead of the first job.

    Runs one plain (non-barrier) task per task slot, so each concurrently
    used Python worker imports sparkmpi, starts its fork server and
    ``warm_pool`` spares, and waits until the spares have finished their
    imports.  Useful before a
    latency-sensitive loop (micro-batches): without it, the first jobs that
    land on a fresh worker pay for starting Python, NumPy and mpi4py.
    ``preload`` (module names; default the ``preload`` setting) has the fork
    servers import those modules too, and replaces spares made without them.

    Returns ``(worker pid, ready spares)`` per task.
    """
    settings = load_settings(warm_pool=warm_pool, fork_server=fork_server, preload=preload)
    slots = max(1, int(sc.defaultParallelism))
    task = functools.partial(_prepare_worker, int(settings.warm_pool), settings.fork_server, float(timeout),
                             settings.preload)
    return sc.parallelize(range(slots), slots).mapPartitions(task).collect()


def _bind(spec: TaskSpec):
    def task(iterator):
        return run_rank_task(spec, iterator)

    return task


def _watch(job, sc, tag: str, stop: threading.Event, started: float, settings: Settings, state: dict) -> None:
    """Watcher thread: on a failure or timeout, abort the ranks, then cancel the stage."""
    while not stop.wait(0.02):
        elapsed = time.monotonic() - started
        if job.failed.is_set():
            break
        if settings.job_timeout is not None and elapsed > settings.job_timeout:
            state["timed_out"] = True
            job.abort(f"the job timed out after {settings.job_timeout:g} s; {job.status()}", dump_stacks=True)
            break
        if not job.space.all_registered and elapsed > settings.start_timeout:
            state["timed_out"] = True
            job.abort(f"not every rank connected within {settings.start_timeout:g} s "
                      f"(is the cluster short of free task slots?); {job.status()}")
            break
    else:
        return  # the stage ended by itself
    # The relays got the abort: let them stop their ranks and report before
    # Spark kills the tasks, then cancel (which also stops stage retries).
    job.wait_relays_gone(settings.kill_grace + 3.0)
    if not stop.is_set():
        sc.cancelJobsWithTag(tag)


def _short(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "RankError" in line or "JobFailed" in line:
            return line.strip()
    return lines[0][:500] if lines else type(error).__name__
