"""sparkmpi: run unmodified mpi4py programs across Spark tasks.

Public API::

    import sparkmpi
    spark = sparkmpi.spark_session("local[2]")   # or any SparkSession
    results = sparkmpi.run(rdd, fn)   # fn(comm, partition_iterator) -> iterable

See :func:`sparkmpi.run` for details.
"""

from .config import Settings, load_settings
from .errors import ConfigError, JobFailed, JobTimeout, PMIProtocolError, SparkMPIError

__all__ = [
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
]
__version__ = "0.1.0"


def run(rdd, fn, **options):
    """Run ``fn(comm, partition)`` as one MPI rank per partition of ``rdd``.

    A thin forwarder so ``import sparkmpi`` stays cheap (pyspark and mpi4py
    are imported only when a job runs).  See :func:`sparkmpi.launch.job.run`.
    """
    from .launch.job import run as _run

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
