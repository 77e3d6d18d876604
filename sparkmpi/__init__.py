"""sparkmpi: run unmodified mpi4py programs across Spark tasks.

Public API::

    import sparkmpi
    spark = sparkmpi.spark_session("local[2]")   # or any SparkSession
    with sparkmpi.World(spark, ranks=2) as world:  # ranks start once
        world.call(fn, *args)        # fn(comm, state, *args) on every rank -> [rank 0's value, ...]
    results = sparkmpi.run(rdd, fn)   # one-call world: fn(comm, partition_iterator) -> iterable
    sparkmpi.run_program(spark, ["./a.out"], ranks=2)   # any MPI program, like mpiexec -n 2
    lines = sparkmpi.pipe(rdd, ["./a.out"])              # RDD.pipe, with the ranks in one MPI world (an RDD)

See :class:`sparkmpi.World` and :func:`sparkmpi.run`.
"""

from .config import Settings, load_settings
from .errors import ConfigError, JobFailed, JobTimeout, PMIProtocolError, SparkMPIError, WorldClosed

__all__ = [
    "World",
    "run",
    "run_program",
    "pipe",
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


def run_program(spark, argv, **options):
    """Run an MPI program (a script or a compiled code) as Spark barrier tasks, like ``mpiexec``.

    See :func:`sparkmpi.launch.programs.run_program`.
    """
    from .launch.programs import run_program as _run_program

    return _run_program(spark, argv, **options)


def pipe(rdd, argv, **options):
    """Like ``RDD.pipe``, but the program's ranks form one MPI world; an RDD, one partition per rank.

    See :func:`sparkmpi.launch.programs.pipe`.
    """
    from .launch.programs import pipe as _pipe

    return _pipe(rdd, argv, **options)


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
