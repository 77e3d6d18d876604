"""Errors of the streaming layer (all are :class:`sparkmpi.errors.SparkMPIError`)."""

from __future__ import annotations

from ..errors import SparkMPIError


class BrokerError(SparkMPIError):
    """The local Kafka broker could not be fetched, started or stopped."""


class BrokerUnavailable(SparkMPIError):
    """No Kafka broker answered at a bootstrap address within the time allowed."""


class StreamTimeout(SparkMPIError):
    """A read, write or receive did not complete within its timeout."""


class OffsetError(SparkMPIError, ValueError):
    """Offsets that cannot be planned or read (beyond the end, or already deleted)."""
