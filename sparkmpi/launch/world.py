"""The driver side of a long-lived MPI world: :class:`World`, and :func:`run` on it.

A world is ``ranks`` MPI ranks started once as one Spark barrier stage
(a task per rank) and called many times; the stage runs in a thread of the
world, and the calls travel as :mod:`.calls` describes.

``run(rdd, fn)`` is a world that lives for one call over ``rdd``'s own
barrier stage: each task hands its partition to its rank, the call runs
``fn(comm, records)``, and the world closes.
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
import weakref
from typing import Any, Callable

from ..config import Settings, load_settings
from ..errors import InvalidArgument, InvalidArgumentType, JobFailed, WorldClosed
from . import channel
from .calls import WorldCore
from .job import local_cores, pickle_function, preload_modules, ranks_of_rdd, short_error
from .task import PARTITION_KEY, deliver_partition


RankFunction = Callable[..., Any]
_open_worlds: "weakref.WeakSet[World]" = weakref.WeakSet()


class World:
    """``ranks`` MPI ranks started once, kept alive, and called many times.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession or pyspark.SparkContext
        The ranks run as one Spark barrier stage with a task per rank, which
        holds that many task slots until the world closes.
    ranks : int
        Size of ``MPI.COMM_WORLD``; rank ``i`` is task (slot) ``i``.
    env : dict, optional
        Environment variables for the rank processes, set before MPI starts.
    idle_timeout : float, optional
        Close the world when no call came for this many seconds (default:
        the ``world_idle_timeout`` setting; None keeps it open).
    settings : Settings, optional
        Launcher settings (default: from ``SPARKMPI_*`` variables); single
        ones can be given as keywords (``start_timeout=``, ...).

    Each call runs ``fn(comm, state, *args, **kwargs)`` on every rank, with
    ``comm`` mpi4py's ``MPI.COMM_WORLD`` and ``state`` a dict that stays on
    that rank for the world's life; module globals, imports, open files and
    GPU memory stay too.  A failure of any rank closes the world (MPI cannot
    go on without a rank): the call raises :class:`~sparkmpi.JobFailed`
    naming rank, host and cause, later calls raise
    :class:`~sparkmpi.errors.WorldClosed`, and :meth:`restart` starts afresh.
    """

    def __init__(self, spark, ranks: int, *, env: dict[str, str] | None = None,
                 idle_timeout: float | None = None, settings: Settings | None = None, **overrides: Any):
        sc = getattr(spark, "sparkContext", spark)
        if not hasattr(sc, "parallelize") or not hasattr(sc, "cancelJobsWithTag"):
            raise InvalidArgumentType(f"spark must be a SparkSession or SparkContext, got {type(spark).__name__}")
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise InvalidArgument(f"ranks must be a positive integer, got {ranks!r}")
        _check_env(env)
        cores = local_cores(sc.master)
        if cores is not None and ranks > cores:
            raise InvalidArgument(f"ranks={ranks} but master {sc.master!r} has {cores} task slots; "
                             f"a world needs one slot per rank (use ranks <= {cores})")
        self._sc, self.size, self._env = sc, ranks, dict(env or {})
        self.settings = _settings(settings, overrides)
        self.idle_timeout = idle_timeout if idle_timeout is not None else self.settings.world_idle_timeout
        self._lock = threading.RLock()
        self._idle_timer: threading.Timer | None = None
        self._core: WorldCore | None = None
        self._closed_reason: str | None = None
        self._start()
        _open_worlds.add(self)

    # -- life ------------------------------------------------------------------
    def _start(self) -> None:
        core = WorldCore(self._sc, self.size, self.settings, self._env, tuple(self.settings.preload),
                     deliver_partition=False)
        stage = self._sc.parallelize(range(self.size), self.size)
        thread = threading.Thread(target=core.run_stage, args=(stage,), name=core.tag, daemon=True)
        self._core, self._closed_reason = core, None
        thread.start()
        try:
            core.wait_started(None)
        except BaseException as exc:
            if not core.teardown_done:
                core.teardown(f"the world did not start: {exc}")
            self._closed_reason = core.closed_reason
            raise
        self._arm_idle_timer()

    @property
    def kvsname(self) -> str:
        """The world's PMI key-space name (its id in messages)."""
        return self._core.kvsname if self._core else ""

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def closed_reason(self) -> str | None:
        """Why the world closed (None while it is open)."""
        return self._closed_reason

    @property
    def hosts(self) -> list[str]:
        """The host of every rank, in rank order."""
        return [self._core.endpoint.hosts.get(r, "?") for r in range(self.size)] if self._core else []

    def close(self, reason: str = "closed by the caller") -> None:
        """Finalise MPI on every rank, reap them and free the task slots (idempotent)."""
        with self._lock:
            self._cancel_idle_timer()
            core = self._core
            if core is None or self.closed:
                return
            self._closed_reason = reason
            try:
                core.close(reason)
            except BaseException:
                core.teardown(reason)
                raise

    def restart(self) -> None:
        """Close this world if it is open, then start a fresh one with the same settings."""
        with self._lock:
            if not self.closed:
                self.close("restarted")
            self._start()

    def __enter__(self) -> "World":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("the with block ended")
        else:
            with self._lock:
                self._cancel_idle_timer()
                if self._core is not None and not self.closed:
                    self._closed_reason = f"the with block raised {exc_type.__name__}"
                    self._core.teardown(self._closed_reason)

    def __repr__(self) -> str:
        state = f"closed: {self._closed_reason}" if self.closed else "open"
        return f"<sparkmpi.World {self.kvsname} ranks={self.size} {state}>"

    # -- calls -----------------------------------------------------------------
    def call(self, fn: RankFunction, *args: Any, scatter=None, timeout: float | None = None,
             **kwargs: Any) -> list:
        """Run ``fn(comm, state, *args, [scatter[rank],] **kwargs)`` on every rank.

        ``scatter`` (a sequence with one item per rank) adds rank ``i``'s item
        as the last positional argument.  NumPy arrays travel as out-of-band
        pickle buffers.  ``timeout`` bounds this call (default: the
        ``job_timeout`` setting); on expiry the ranks' stacks are in the error.

        Returns the ranks' return values in rank order.
        """
        if not callable(fn):
            raise InvalidArgumentType(f"fn must be a callable fn(comm, state, ...), got {type(fn).__name__}")
        per_rank = None
        if scatter is not None:
            per_rank = list(scatter)
            if len(per_rank) != self.size:
                raise InvalidArgument(f"scatter must have one item per rank ({self.size}), got {len(per_rank)}")
        return self._call(pickle_function(fn), per_rank, args, kwargs, timeout)

    def map_partitions(self, rdd, fn: RankFunction, *args: Any, timeout: float | None = None,
                       **kwargs: Any) -> list:
        """Run ``fn(comm, state, records, *args, **kwargs)`` with partition ``i`` of ``rdd`` on rank ``i``.

        A Spark job computes the partitions; each reaches its rank as an
        iterator over its records.  ``rdd`` must have one partition per rank.
        """
        if not hasattr(rdd, "getNumPartitions"):
            raise InvalidArgumentType(f"rdd must be a pyspark RDD, got {type(rdd).__name__}")
        if rdd.getNumPartitions() != self.size:
            raise InvalidArgument(f"rdd has {rdd.getNumPartitions()} partitions but the world has {self.size} ranks; "
                             f"repartition to {self.size}")
        if not callable(fn):
            raise InvalidArgumentType(f"fn must be a callable fn(comm, state, records, ...), got {type(fn).__name__}")
        with self._lock:
            core = self._open_core()
            key = f"map-{time.monotonic_ns()}"
            deliver = functools.partial(deliver_partition, inboxes=[core.endpoint.inboxes[r] for r in range(self.size)],
                                        token=core.job.token, key=key)
            self._deliver_partitions(rdd, deliver)
            return self._call(pickle_function(fn), None, (channel.PartitionRef(key), *args), kwargs, timeout)

    def _deliver_partitions(self, rdd, deliver) -> None:
        """Run the Spark job whose tasks compute the partitions and hand each to its rank's
        relay; it needs task slots besides the world's.  Meanwhile the relays are read as
        during a call (their output, the heartbeat), so a host that goes silent during a
        delivery fails the world within ``host_timeout``."""
        sc = self._sc
        cores = local_cores(sc.master)
        held = sum(w.size for w in list(_open_worlds) if w._sc is sc and not w.closed)
        if cores is not None and cores - held < 1:
            raise InvalidArgument(f"map_partitions runs a Spark job to compute the partitions, but master "
                             f"{sc.master!r} has {cores} task slots and open worlds hold {held}; "
                             f"start Spark with more slots (local[{held + 1}] or more)")
        core = self._core
        tag = f"{core.tag}-partitions" if core else "sparkmpi-partitions"
        no_slot = threading.Event()
        greeted = threading.Event()

        def give_up():
            # start_timeout bounds the wait for a task slot, not the delivery: once a task
            # greeted its relay (a slow partition, a large transfer), the heartbeat and the
            # call's timeout are what bound it
            if not greeted.is_set():
                no_slot.set()
                sc.cancelJobsWithTag(tag)

        timer = threading.Timer(self.settings.start_timeout, give_up)
        done = threading.Event()
        failed: list = []

        def run_job():
            sc.addJobTag(tag)       # job tags belong to the thread that submits the job
            try:
                rdd.mapPartitionsWithIndex(deliver).collect()
            except BaseException as exc:  # noqa: BLE001  (raised below, in the caller's thread)
                failed.append(exc)
            finally:
                sc.removeJobTag(tag)
                done.set()

        delivery = threading.Thread(target=run_job, name=f"{tag}-job", daemon=True)
        timer.start()
        delivery.start()
        try:
            core.watch_relays(done.is_set, "map_partitions delivery", lambda rank: greeted.set())
        except BaseException as exc:
            sc.cancelJobsWithTag(tag)
            delivery.join(self.settings.kill_grace + 10.0)
            if core.teardown_done:
                self._closed_reason = core.closed_reason or type(exc).__name__
            raise
        finally:
            timer.cancel()
        delivery.join()
        if failed:
            exc = failed[0]
            if no_slot.is_set():
                raise JobFailed(f"the Spark job computing the partitions for map_partitions got no task "
                                f"slot within {self.settings.start_timeout:g} s (start_timeout); the world "
                                f"holds {self.size}", job_id=self.kvsname, cause=str(exc)) from exc
            raise JobFailed(f"map_partitions: the Spark job delivering the partitions failed: {short_error(exc)}",
                            job_id=self.kvsname, cause=str(exc)) from exc

    def _open_core(self) -> WorldCore:
        if self.closed or self._core is None:
            raise WorldClosed(f"the world {self.kvsname} is closed ({self._closed_reason}); "
                              f"call restart() for a new one", reason=self._closed_reason or "")
        return self._core

    def _call(self, fn_bytes: bytes, per_rank, args, kwargs, timeout) -> list:
        with self._lock:
            core = self._open_core()
            self._cancel_idle_timer()
            timeout = self.settings.job_timeout if timeout is None else timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            call_id, frames = core.encode_call(fn_bytes, per_rank, args, kwargs)
            try:
                return core.call(call_id, frames, deadline, timeout)
            except BaseException as exc:
                if not core.teardown_done:
                    core.teardown(f"interrupted: {type(exc).__name__}")
                self._closed_reason = core.closed_reason or type(exc).__name__
                raise
            finally:
                if not self.closed:
                    self._arm_idle_timer()

    # -- idle timeout ----------------------------------------------------------
    def _arm_idle_timer(self) -> None:
        if self.idle_timeout is None:
            return
        self._idle_timer = threading.Timer(self.idle_timeout, self._idle_expired)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        try:
            self.close(f"idle for {self.idle_timeout:g} s (world_idle_timeout)")
        except Exception:  # noqa: BLE001  (nobody to raise to; the next call says closed)
            pass


@atexit.register
def _close_open_worlds() -> None:
    for world in list(_open_worlds):
        try:
            world.close("the interpreter exited")
        except Exception:  # noqa: BLE001
            pass


def _check_env(env) -> None:
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise InvalidArgumentType("env must map str to str")


def _settings(settings: Settings | None, overrides: dict) -> Settings:
    if settings is None:
        return load_settings(**overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return settings.replace(**overrides) if overrides else settings


def run(rdd, fn, *, timeout: float | None = None, env: dict[str, str] | None = None,
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
        iterable of results (or None).  Each rank runs in a fresh process.
    timeout : float, optional
        Seconds the whole job may take; overrides ``SPARKMPI_JOB_TIMEOUT``.
    env : dict, optional
        Extra environment variables for the rank processes, set before MPI
        is initialised.
    settings, **setting_overrides
        Launcher settings, as for :class:`World`.

    Returns
    -------
    list
        The results of all ranks, concatenated in rank order (like ``collect()``).

    Raises
    ------
    JobFailed
        A rank raised, exited, called ``MPI_Abort``, or never connected; the
        message names the rank, its partition and the cause (with the remote
        traceback).  :class:`JobTimeout` when the timeout passed.
    ValueError, TypeError
        For bad arguments, before anything runs.

    This is a :class:`World` that lives for one call, started over ``rdd``'s
    own barrier stage so each task hands its partition to its rank.
    """
    if not callable(fn):
        raise InvalidArgumentType(f"fn must be a callable fn(comm, records), got {type(fn).__name__}")
    if not hasattr(rdd, "barrier") or not hasattr(rdd, "getNumPartitions"):
        raise InvalidArgumentType(f"rdd must be a pyspark RDD, got {type(rdd).__name__}")
    _check_env(env)
    settings = _settings(settings, dict(job_timeout=timeout, **setting_overrides))
    sc = rdd.context
    size = ranks_of_rdd(rdd)
    core = WorldCore(sc, size, settings, env, preload_modules(fn, settings.preload), deliver_partition=True)
    fn_bytes = pickle_function(functools.partial(channel.partition_call, fn=fn))
    started = time.monotonic()
    deadline = None if settings.job_timeout is None else started + settings.job_timeout
    outcome: dict = {}

    def drive() -> None:
        # The stage runs in the caller's thread (PySpark gives each new thread
        # its own JVM connection, a fixed cost per job); this one talks to the ranks.
        try:
            core.wait_started(deadline)
            call_id, frames = core.encode_call(fn_bytes, None, (channel.PartitionRef(PARTITION_KEY),), {})
            outcome["results"] = core.call(call_id, frames, deadline, settings.job_timeout)
            core.close("run finished")
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = exc
            if not core.teardown_done:
                core.teardown(f"run failed: {exc}")

    driver = threading.Thread(target=drive, name=f"{core.tag}-calls", daemon=True)
    driver.start()
    try:
        core.run_stage(rdd)
    finally:
        driver.join()
    if "error" in outcome:
        raise outcome["error"]
    if core.stage_error is not None:
        error = core.stage_error
        raise JobFailed(f"MPI world {core.kvsname}: the Spark stage failed: {short_error(error)}",
                        job_id=core.kvsname, cause=str(error)) from error
    return [record for part in outcome["results"] for record in part]

