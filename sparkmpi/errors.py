"""Exceptions raised by sparkmpi.

Every error a user can see derives from :class:`SparkMPIError`, so the CLI can
print it as one line and exit 1, and library users can catch one class.
"""

from __future__ import annotations


class SparkMPIError(Exception):
    """Base class of every error sparkmpi raises on purpose."""


class ConfigError(SparkMPIError, ValueError):
    """A setting (argument or ``SPARKMPI_*`` variable) has a bad name or value."""


class PMIProtocolError(SparkMPIError):
    """A PMI peer sent bytes that are not a valid PMI-1 command."""


class JobFailed(SparkMPIError):
    """An MPI job run through Spark failed.

    Attributes
    ----------
    job_id : str
        The job's identifier (also its PMI key-value space name).
    rank : int or None
        The rank that failed first, when one is known.
    partition : int or None
        The Spark partition that rank ran on.
    cause : str
        What happened: the remote traceback, the exit status, or the timeout.
    """

    def __init__(self, message: str, *, job_id: str = "", rank: int | None = None,
                 partition: int | None = None, cause: str = ""):
        super().__init__(message)
        self.job_id = job_id
        self.rank = rank
        self.partition = partition
        self.cause = cause


class JobTimeout(JobFailed):
    """An MPI job ran past its configured timeout."""


class WorldClosed(SparkMPIError):
    """A call went to a :class:`~sparkmpi.World` that is closed; ``reason`` says why it closed."""

    def __init__(self, message: str, *, reason: str = ""):
        super().__init__(message)
        self.reason = reason
