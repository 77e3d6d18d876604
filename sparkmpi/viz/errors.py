"""Errors of the viewer; each prints as one line through ``sparkmpi``'s handler."""

from __future__ import annotations

from ..errors import SparkMPIError

__all__ = ["ViewerError", "ResultNotFoundError", "UnreadableResultError", "WrongKindError",
           "PortInUseError", "SnapshotError"]


class ViewerError(SparkMPIError):
    """Base class of the viewer's errors."""


class ResultNotFoundError(ViewerError, FileNotFoundError):
    """The result file (or snapshot directory) does not exist."""


class UnreadableResultError(ViewerError):
    """The file exists but cannot be read: no permission, empty, truncated or corrupt."""


class WrongKindError(ViewerError, ValueError):
    """The file is readable but is neither a tomography volume nor a ptychography result."""


class PortInUseError(ViewerError):
    """The port asked for is taken by another process."""


class SnapshotError(ViewerError, ValueError):
    """A live snapshot (or an argument of :func:`publish_snapshot`) is malformed."""
