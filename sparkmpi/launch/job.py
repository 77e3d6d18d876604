"""What every world's driver side shares: the PMI server, where it listens,
how rank functions are pickled, and :func:`warm_up` of the workers.

Worlds and :func:`~sparkmpi.launch.world.run` are in :mod:`.world`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Iterable

import cloudpickle

from ..config import Settings, load_settings
from ..errors import InvalidArgument
from ..pmi.server import PMIServer

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


def local_cores(master: str) -> int | None:
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if not match:
        return None
    if match.group(1) in (None,):
        return 1
    if match.group(1) == "*":
        return os.cpu_count() or 1
    return int(match.group(1))


def ranks_of_rdd(rdd) -> int:
    """The number of ranks ``rdd`` makes (one a partition); InvalidArgument when
    there are none, or more than a local master has task slots for."""
    size = rdd.getNumPartitions()
    if size < 1:
        raise InvalidArgument("rdd has no partitions; an MPI job needs at least one rank")
    master = rdd.context.master
    cores = local_cores(master)
    if cores is not None and size > cores:
        raise InvalidArgument(f"rdd has {size} partitions but master {master!r} has {cores} task slots; "
                              f"a barrier stage needs one slot per rank (repartition to <= {cores})")
    return size


def resolve_host(settings: Settings, sc) -> str:
    if settings.pmi_host != "auto":
        return settings.pmi_host
    if local_cores(sc.master) is not None:
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
    """Names of the modules that define ``fn`` (through partials and the
    callables they bind; callable instances' classes)."""
    targets, pending = [], [fn]
    while pending:
        target = pending.pop()
        targets.append(target)
        if isinstance(target, functools.partial):
            pending += [target.func, *(a for a in (*target.args, *target.keywords.values()) if callable(a))]
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


def _prepare_worker(warm_pool: int, fork_server: bool, timeout: float, preload: tuple, iterator):
    from . import pool

    for _ in iterator:
        pass  # read the partition, or PySpark discards this worker afterwards
    return [(os.getpid(), pool.worker_pool().prepare(warm_pool, fork_server, preload, timeout))]


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


def short_error(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "RankError" in line or "JobFailed" in line:
            return line.strip()
    return lines[0][:500] if lines else type(error).__name__
