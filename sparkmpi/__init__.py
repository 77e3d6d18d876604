"""sparkmpi: run unmodified mpi4py programs across Spark tasks.

Public API::

    import sparkmpi
    spark = sparkmpi.spark_session("local[2]")   # or any SparkSession
    with sparkmpi.World(spark, ranks=2) as world:  # ranks start once
        world.call(fn, *args)        # fn(comm, state, *args) on every rank -> [rank 0's value, ...]
    results = sparkmpi.run(rdd, fn)   # one-call world: fn(comm, partition_iterator) -> iterable

See :class:`sparkmpi.World` and :func:`sparkmpi.run`.
"""

from .config import Settings, load_settings
from .errors import ConfigError, JobFailed, JobTimeout, PMIProtocolError, SparkMPIError, WorldClosed

__all__ = [
    "World",
    "run",
    "warm_up",
    "spark_session",
    "Settings",
    "load_settings",
    "SparkMPIError",
    "ConfigError",
    "JobFailed",
    "JobTimeout",
    "PMIProtocolError",
    "WorldClosed",
]
__version__ = "0.1.0"


def run(rdd, fn, **options):
    """Run ``fn(comm, partition)`` as one MPI rank per partition of ``rdd``.

    A thin forwarder so ``import sparkmpi`` stays cheap (pyspark and mpi4py
    are imported only when a job runs).  See :func:`sparkmpi.launch.world.run`.
    """
    from .launch.world import run as _run

    return _run(rdd, fn, **options)


def warm_up(sc, **options):
    """Start the Spark Python workers and their warm rank spares before the first job.

    See :func:`sparkmpi.launch.job.warm_up`.
    """
    from .launch.job import warm_up as _warm_up

    return _warm_up(sc, **options)


def spark_session(master: str = "local[2]", app: str = "sparkmpi", **options):
    """A SparkSession with settings tuned for many short MPI jobs.

    See :func:`sparkmpi.launch.session.spark_session`.
    """
    from .launch.session import spark_session as _spark_session

    return _spark_session(master, app, **options)


def __getattr__(name: str):
    # World is imported on first use, so ``import sparkmpi`` stays cheap.
    if name == "World":
        from .launch.world import World

        return World
    raise AttributeError(f"module 'sparkmpi' has no attribute {name!r}")
