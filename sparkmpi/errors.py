"""Exceptions raised by sparkmpi: one hierarchy.

Every error a user can see derives from :class:`SparkMPIError`, so the CLI can
print it as one line and exit 1 (:class:`UsageError`: exit 2), and library
users can catch one class.  Sub-packages subclass these in their own
``errors.py``.  Anything else reaching the CLI (a ``ValueError`` or
``TypeError`` from a bug) is shown with its traceback as a bug.

Argument checks in public functions raise :class:`InvalidArgument` (also a
``ValueError``; :class:`InvalidArgumentType` also a ``TypeError``), so
callers that catch ``ValueError`` keep working and the CLI can tell a
rejected argument from a bug.
"""

from __future__ import annotations


class SparkMPIError(Exception):
    """Base class of every error sparkmpi raises on purpose."""


class UsageError(SparkMPIError):
    """A command-line argument has a bad value (the CLI prints its usage and exits 2)."""


class InvalidArgument(SparkMPIError, ValueError):
    """A public function got an argument (or input data) it does not accept.

    Its message reads "NAME: expected WHAT, got VALUE", or names the input and
    what is wrong with it.
    """


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


class ConfigError(SparkMPIError, ValueError):
    """A setting (argument or ``SPARKMPI_*`` variable) has a bad name or value."""


class ProcessError(SparkMPIError):
    """A child process could not be stopped (still alive after SIGKILL)."""


class RetryTimeout(SparkMPIError, TimeoutError):
    """An operation retried with backoff did not succeed before its deadline (the last failure is chained)."""


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
