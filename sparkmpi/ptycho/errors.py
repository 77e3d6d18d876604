"""Errors raised by :mod:`sparkmpi.ptycho` for bad input.

Every class derives from both :class:`sparkmpi.errors.SparkMPIError` (so the
CLI prints it as one line) and :class:`ValueError` (so NumPy-style callers can
catch the usual exception).  Messages name the argument, what was expected and
what came instead; they are raised before any iteration starts.
"""

from __future__ import annotations

from ..errors import SparkMPIError


class PtychoInputError(SparkMPIError, ValueError):
    """Base class: an input to a ptychography function is unusable."""


class FrameMismatchError(PtychoInputError):
    """Frame count, shape or dtype disagrees with the positions or the probe."""


class NonFiniteError(PtychoInputError):
    """An array holds NaN or infinite values."""


class NegativeIntensityError(PtychoInputError):
    """Measured intensities contain negative values."""


class PositionOutOfBoundsError(PtychoInputError):
    """A scan position puts a frame (partly) outside the object array."""


class ProbeShapeError(PtychoInputError):
    """The probe (or initial object) has the wrong shape or dtype."""


class DataFormatError(PtychoInputError):
    """A ptychography data file is missing keys or has the wrong layout."""
