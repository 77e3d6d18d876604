"""The driver side of a long-lived MPI world: :class:`World`, and :func:`run` on it.

A world is one PMI key space on the driver's PMI server plus one Spark
barrier stage with a task per rank.  Each task's relay connects back to the
world's endpoint here (a TCP listener of this object); calls go out on those
connections as :mod:`.channel` frames and results, stdout and stderr come
back on them.  Failures are the PMI server's to notice (a rank's error, exit,
lost relay, ``MPI_Abort``): its job handle's ``failed`` event ends the call
that is waiting, with the cause it recorded.

``run(rdd, fn)`` is a world that lives for one call over ``rdd``'s own
barrier stage: each task hands its partition to its rank, the call runs
``fn(comm, records)``, and the world closes.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import selectors
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable

from ..config import Settings, load_settings
from ..errors import JobFailed, JobTimeout, WorldClosed
from . import channel
from .job import get_server, local_cores, pickle_function, preload_modules, resolve_host, short_error
from .task import PARTITION_KEY, TaskSpec, run_rank_task

#: Seconds a failure waits for the PMI server to record its cause.
FAILURE_GRACE_S = 5.0
_POLL_S = 0.05


class _Endpoint:
    """The world's side of its relays' connections: rank -> socket."""

    def __init__(self, host: str, size: int, kvsname: str, token: str):
        self.listener = socket.create_server((host, 0), backlog=max(16, size))
        self.port = self.listener.getsockname()[1]
        self.size, self.kvsname, self.token = size, kvsname, token
        self.conns: dict[int, socket.socket] = {}
        self.hosts: dict[int, str] = {}
        self.started: set[int] = set()
        self.closed: set[int] = set()

    def accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10.0)
        try:
            kind, hello, _ = channel.recv_message(sock)
        except (OSError, EOFError, ValueError):
            sock.close()
            return
        sock.settimeout(None)
        rank = hello.get("rank") if kind == channel.HELLO and isinstance(hello, dict) else None
        if (hello.get("job") != self.kvsname or hello.get("token") != self.token
                or not isinstance(rank, int) or not 0 <= rank < self.size or rank in self.conns):
            sock.close()
            return
        self.conns[rank] = sock
        self.hosts[rank] = hello.get("host", "?")

    def close(self) -> None:
        for sock in self.conns.values():
            sock.close()
        self.conns.clear()
        self.listener.close()


class _Output:
    """The ranks' stdout and stderr, written to the caller's with a ``[rank]`` prefix per line."""

    def __init__(self):
        self.partial: dict[tuple[int, int], bytes] = {}

    def write(self, rank: int, stream: int, data: bytes) -> None:
        text = self.partial.pop((rank, stream), b"") + data
        *lines, rest = text.split(b"\n")
        if rest:
            self.partial[(rank, stream)] = rest
        if lines:
            self._emit(rank, stream, lines)

    def flush(self, rank: int) -> None:
        for stream in (1, 2):
            rest = self.partial.pop((rank, stream), b"")
            if rest:
                self._emit(rank, stream, [rest])

    @staticmethod
    def _emit(rank: int, stream: int, lines) -> None:
        target = sys.stdout if stream == 1 else sys.stderr
        target.write("".join(f"[{rank}] {line.decode('utf-8', 'replace')}\n" for line in lines))
        target.flush()


class _Core:
    """One world's key space, endpoint and calls; the stage itself is run by the owner."""

    def __init__(self, sc, size: int, settings: Settings, env: dict | None, preload: tuple,
                 deliver_partition: bool):
        self.sc, self.size, self.settings = sc, size, settings
        host = resolve_host(settings, sc)
        server = get_server(host, settings.pmi_port)
        self.job = server.open_job(size)
        self.kvsname = self.job.kvsname
        self.endpoint = _Endpoint(host, size, self.kvsname, self.job.token)
        self.spec = TaskSpec(server_host=host, server_port=server.port, kvsname=self.kvsname,
                             token=self.job.token, size=size, world_host=host, world_port=self.endpoint.port,
                             settings=settings, env=dict(env or {}), preload=preload,
                             deliver_partition=deliver_partition)
        self.tag = f"sparkmpi-{self.kvsname}"
        self.stage_done = threading.Event()
        self.stage_error: BaseException | None = None
        self.output = _Output()
        self.calls = itertools.count(1)
        self.closed_reason: str | None = None
        self.teardown_done = False

    # -- the stage -------------------------------------------------------------
    def task(self):
        spec = self.spec

        def rank_task(iterator):
            return run_rank_task(spec, iterator)

        return rank_task

    def run_stage(self, rdd) -> None:
        """Run the barrier stage in this thread until every task returns."""
        sc = self.sc
        previous_interrupt = sc.getLocalProperty("spark.job.interruptOnCancel")
        sc.addJobTag(self.tag)
        sc.setInterruptOnCancel(True)
        try:
            rdd.barrier().mapPartitions(self.task()).collect()
        except BaseException as exc:  # noqa: BLE001  (reported by whoever waits on the world)
            self.stage_error = exc
        finally:
            sc.removeJobTag(self.tag)
            sc.setLocalProperty("spark.job.interruptOnCancel", previous_interrupt)
            self.stage_done.set()

    # -- waiting ---------------------------------------------------------------
    def _wait(self, want: Callable[[], bool], deadline: float | None, on_frame, what: str,
              timeout_reason: Callable[[], str]) -> None:
        """Read frames until ``want()``; raise on a failure, a lost relay or the deadline."""
        endpoint = self.endpoint
        with selectors.DefaultSelector() as sel:
            sel.register(endpoint.listener, selectors.EVENT_READ, None)
            registered = set()
            while not want():
                for rank, sock in endpoint.conns.items():
                    if rank not in registered:
                        sel.register(sock, selectors.EVENT_READ, rank)
                        registered.add(rank)
                if self.job.failed.is_set():
                    self._raise_failure(what)
                if self.stage_done.is_set() and self.stage_error is not None:
                    self._raise_failure(what, lost="the Spark stage ended")
                if deadline is not None and time.monotonic() > deadline:
                    self.job.abort(timeout_reason(), dump_stacks=True)
                    self._raise_failure(what, timed_out=True)
                for key, _ in sel.select(timeout=_POLL_S):
                    if key.data is None:
                        endpoint.accept()
                        continue
                    rank = key.data
                    try:
                        kind, segments, _ = channel.recv_frame(endpoint.conns[rank])
                    except (OSError, EOFError, ValueError):
                        sel.unregister(key.fileobj)
                        if rank in endpoint.closed:
                            continue  # its relay is done after CLOSED
                        self._raise_failure(what, lost=f"lost the relay of rank {rank} "
                                                       f"(on {endpoint.hosts.get(rank, '?')})")
                    if kind == channel.OUTPUT:
                        message = channel.decode(segments)
                        self.output.write(rank, message["stream"], message["data"])
                    else:
                        on_frame(rank, kind, segments)

    def wait_started(self, deadline: float | None) -> None:
        endpoint = self.endpoint

        def on_frame(rank, kind, segments):
            if kind != channel.STARTED:
                raise self._protocol_error(rank, kind, "starting")
            endpoint.started.add(rank)

        start_deadline = time.monotonic() + self.settings.start_timeout
        self._wait(lambda: len(endpoint.started) == self.size,
                   start_deadline if deadline is None else min(deadline, start_deadline), on_frame, "start",
                   lambda: (f"not every rank connected within {self.settings.start_timeout:g} s "
                            f"(is the cluster short of free task slots?); {self.job.status()}"))

    def _protocol_error(self, rank: int, kind: int, phase: str) -> JobFailed:
        cause = f"rank {rank} sent {channel.KIND_NAMES.get(kind, kind)} while {phase}"
        self.job.abort(cause)
        return JobFailed(f"MPI world {self.kvsname}: {cause}", job_id=self.kvsname, rank=rank, cause=cause)

    # -- calls -----------------------------------------------------------------
    def call(self, fn_bytes: bytes, per_rank_args: list | None, args: tuple, kwargs: dict,
             deadline: float | None, timeout: float | None) -> list:
        call_id = next(self.calls)
        endpoint = self.endpoint
        if per_rank_args is None:
            shared = channel.encode({"id": call_id, "fn": fn_bytes, "args": list(args), "kwargs": kwargs})
            frames = [shared] * self.size
        else:
            frames = [channel.encode({"id": call_id, "fn": fn_bytes, "args": [*args, extra], "kwargs": kwargs})
                      for extra in per_rank_args]
        what = f"call {call_id}"
        for rank in range(self.size):
            try:
                channel.send_frame(endpoint.conns[rank], channel.CALL, frames[rank])
            except OSError:
                self._raise_failure(what, lost=f"lost the relay of rank {rank} (on {endpoint.hosts.get(rank)})")
        results: dict[int, Any] = {}

        def on_frame(rank, kind, segments):
            if kind != channel.RESULT:
                raise self._protocol_error(rank, kind, what)
            self.output.flush(rank)
            results[rank] = channel.decode(segments)["value"]

        self._wait(lambda: len(results) == self.size, deadline, on_frame, what,
                   lambda: f"{what} timed out after {timeout:g} s; {self._waiting_for(results)}")
        return [results[r] for r in range(self.size)]

    def _waiting_for(self, results: dict) -> str:
        missing = [r for r in range(self.size) if r not in results]
        return "no result yet from " + ", ".join(self.job.where(r) for r in missing)

    def deliver(self, rank_records: list, key: str) -> None:
        """Park each rank's records under ``key`` (a later call's :class:`~.channel.PartitionRef`)."""
        for rank, records in enumerate(rank_records):
            channel.send_frame(self.endpoint.conns[rank], channel.DATA,
                               channel.encode({"key": key, "records": records}))

    # -- ending ----------------------------------------------------------------
    def _raise_failure(self, what: str, timed_out: bool = False, lost: str | None = None):
        job = self.job
        if not job.failed.wait(FAILURE_GRACE_S if lost else 0) and lost:
            job.abort(lost)
        self.teardown(job.failure.cause if job.failure else lost or "failed")
        failure = job.failure
        cls = JobTimeout if timed_out else JobFailed
        message = f"MPI world {self.kvsname} failed ({what}): {failure.cause}"
        if timed_out and job.reports:
            message += "\n\nStacks of the ranks when they were stopped:\n" + "\n".join(
                f"--- {job.where(r)} ---\n{text}" for r, text in sorted(job.reports.items()))
        raise cls(message, job_id=self.kvsname, rank=failure.rank,
                  partition=job.partitions.get(failure.rank) if failure.rank is not None else None,
                  cause=failure.cause)

    def close(self, reason: str) -> None:
        """Finalise MPI on every rank and end the stage; a failure on the way raises."""
        if self.teardown_done:
            return
        endpoint = self.endpoint
        closed = endpoint.closed
        for rank in range(self.size):
            try:
                channel.send_frame(endpoint.conns[rank], channel.CLOSE, channel.encode(None))
            except (OSError, KeyError):
                self._raise_failure("close", lost=f"lost the relay of rank {rank}")

        def on_frame(rank, kind, segments):
            if kind != channel.CLOSED:
                raise self._protocol_error(rank, kind, "closing")
            self.output.flush(rank)
            closed.add(rank)

        grace = self.settings.kill_grace + 30.0
        self._wait(lambda: len(closed) == self.size, time.monotonic() + grace, on_frame, "close",
                   lambda: f"the ranks did not finalise MPI within {grace:g} s")
        self.teardown(reason, graceful=True)

    def teardown(self, reason: str, graceful: bool = False) -> None:
        """Stop everything that is left (relays, the stage) and forget the key space."""
        if self.teardown_done:
            return
        self.teardown_done = True
        self.closed_reason = (reason.strip().splitlines() or ["closed"])[0]
        job, settings = self.job, self.settings
        if not graceful:
            if not job.failed.is_set():
                job.abort(reason)
            # The relays got the abort: let them stop their ranks and report
            # before Spark kills the tasks, then cancel (no stage retries).
            job.wait_relays_gone(settings.kill_grace + 3.0)
            if not self.stage_done.is_set():
                self.sc.cancelJobsWithTag(self.tag)
        self.endpoint.close()
        self.stage_done.wait(settings.kill_grace + 10.0)
        job.close()


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
            raise TypeError(f"spark must be a SparkSession or SparkContext, got {type(spark).__name__}")
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        _check_env(env)
        cores = local_cores(sc.master)
        if cores is not None and ranks > cores:
            raise ValueError(f"ranks={ranks} but master {sc.master!r} has {cores} task slots; "
                             f"a world needs one slot per rank (use ranks <= {cores})")
        self._sc, self.size, self._env = sc, ranks, dict(env or {})
        self.settings = _settings(settings, overrides)
        self.idle_timeout = idle_timeout if idle_timeout is not None else self.settings.world_idle_timeout
        self._lock = threading.RLock()
        self._idle_timer: threading.Timer | None = None
        self._core: _Core | None = None
        self._closed_reason: str | None = None
        self._start()
        _open_worlds.add(self)

    # -- life ------------------------------------------------------------------
    def _start(self) -> None:
        core = _Core(self._sc, self.size, self.settings, self._env, tuple(self.settings.preload),
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
            raise TypeError(f"fn must be a callable fn(comm, state, ...), got {type(fn).__name__}")
        per_rank = None
        if scatter is not None:
            per_rank = list(scatter)
            if len(per_rank) != self.size:
                raise ValueError(f"scatter must have one item per rank ({self.size}), got {len(per_rank)}")
        return self._call(pickle_function(fn), per_rank, args, kwargs, timeout)

    def map_partitions(self, rdd, fn: RankFunction, *args: Any, timeout: float | None = None,
                       **kwargs: Any) -> list:
        """Run ``fn(comm, state, records, *args, **kwargs)`` with partition ``i`` of ``rdd`` on rank ``i``.

        A Spark job computes the partitions; each reaches its rank as an
        iterator over its records.  ``rdd`` must have one partition per rank.
        """
        if not hasattr(rdd, "getNumPartitions"):
            raise TypeError(f"rdd must be a pyspark RDD, got {type(rdd).__name__}")
        if rdd.getNumPartitions() != self.size:
            raise ValueError(f"rdd has {rdd.getNumPartitions()} partitions but the world has {self.size} ranks; "
                             f"repartition to {self.size}")
        if not callable(fn):
            raise TypeError(f"fn must be a callable fn(comm, state, records, ...), got {type(fn).__name__}")
        parts = self._collect_partitions(rdd)
        with self._lock:
            core = self._open_core()
            key = f"map-{time.monotonic_ns()}"
            try:
                core.deliver(parts, key)
            except OSError as exc:
                core._raise_failure("delivering partitions", lost=f"lost a relay: {exc}")
            del parts
            return self._call(pickle_function(fn), None, (channel.PartitionRef(key), *args), kwargs, timeout)

    def _collect_partitions(self, rdd) -> list:
        """Each partition's records, by a Spark job that needs task slots besides the world's."""
        sc = self._sc
        cores = local_cores(sc.master)
        held = sum(w.size for w in list(_open_worlds) if w._sc is sc and not w.closed)
        if cores is not None and cores - held < 1:
            raise ValueError(f"map_partitions runs a Spark job to compute the partitions, but master "
                             f"{sc.master!r} has {cores} task slots and open worlds hold {held}; "
                             f"start Spark with more slots (local[{held + 1}] or more)")
        tag = f"{self._core.tag}-partitions" if self._core else "sparkmpi-partitions"
        timer = threading.Timer(self.settings.start_timeout, sc.cancelJobsWithTag, args=(tag,))
        sc.addJobTag(tag)
        timer.start()
        try:
            return rdd.glom().collect()
        except Exception as exc:
            if not timer.is_alive():
                raise JobFailed(f"the Spark job computing the partitions for map_partitions got no task "
                                f"slot within {self.settings.start_timeout:g} s (start_timeout); the world "
                                f"holds {self.size}", job_id=self.kvsname, cause=str(exc)) from exc
            raise
        finally:
            timer.cancel()
            sc.removeJobTag(tag)

    def _open_core(self) -> _Core:
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
            try:
                return core.call(fn_bytes, per_rank, args, kwargs, deadline, timeout)
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
        raise TypeError("env must map str to str")


def _settings(settings: Settings | None, overrides: dict) -> Settings:
    if settings is None:
        return load_settings(**overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return settings.replace(**overrides) if overrides else settings


def _partition_call(comm, state, records, fn):
    """A world call in ``run``'s shape: ``fn(comm, records)`` returning an iterable."""
    out = fn(comm, records)
    return [] if out is None else list(out)


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
        raise TypeError(f"fn must be a callable fn(comm, records), got {type(fn).__name__}")
    if not hasattr(rdd, "barrier") or not hasattr(rdd, "getNumPartitions"):
        raise TypeError(f"rdd must be a pyspark RDD, got {type(rdd).__name__}")
    _check_env(env)
    settings = _settings(settings, dict(job_timeout=timeout, **setting_overrides))
    sc = rdd.context
    size = rdd.getNumPartitions()
    if size < 1:
        raise ValueError("rdd has no partitions; an MPI job needs at least one rank")
    cores = local_cores(sc.master)
    if cores is not None and size > cores:
        raise ValueError(f"rdd has {size} partitions but master {sc.master!r} has {cores} task slots; "
                         f"a barrier stage needs one slot per rank (repartition to <= {cores})")
    core = _Core(sc, size, settings, env, preload_modules(fn, settings.preload), deliver_partition=True)
    fn_bytes = pickle_function(functools.partial(_partition_call, fn=fn))
    started = time.monotonic()
    deadline = None if settings.job_timeout is None else started + settings.job_timeout
    outcome: dict = {}

    def drive() -> None:
        # The stage runs in the caller's thread (PySpark gives each new thread
        # its own JVM connection, a fixed cost per job); this one talks to the ranks.
        try:
            core.wait_started(deadline)
            outcome["results"] = core.call(fn_bytes, None, (channel.PartitionRef(PARTITION_KEY),), {},
                                           deadline, settings.job_timeout)
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
        raise JobFailed(f"MPI job {core.kvsname}: the Spark stage failed: {short_error(error)}",
                        job_id=core.kvsname, cause=str(error)) from error
    return [record for part in outcome["results"] for record in part]

