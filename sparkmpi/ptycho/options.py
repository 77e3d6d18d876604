"""The settings of a ptychographic reconstruction, with their defaults, in one place.

:class:`Options` is what :func:`~sparkmpi.ptycho.reconstruct`,
:func:`~sparkmpi.ptycho.reconstruct_rank`,
:class:`~sparkmpi.ptycho.StreamingReconstruction` and the Spark job take;
each checks its values when it is made.  This module imports no numerics,
so the Spark driver can check options before a job starts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..backend import BACKENDS
from .errors import PtychoInputError

__all__ = ["ALGORITHMS", "DEFAULT_BETA", "KERNELS", "Options"]

ALGORITHMS = ("dm", "raar")
DEFAULT_BETA = {"dm": 1.0, "raar": 0.75}
#: "generic" runs the backend-generic array code (what CuPy runs) on NumPy.
KERNELS = ("auto", "numba", "numpy", "generic")


def _whole(value, least: int) -> bool:
    """True for an integer-valued number >= ``least`` (``5`` or ``5.0``, not ``True``)."""
    if isinstance(value, bool):
        return False
    try:
        return int(value) == value and value >= least
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass(frozen=True)
class Options:
    """How to reconstruct: the algorithm and its settings (not the data or the start).

    Attributes
    ----------
    algorithm : {"dm", "raar"}
        Difference map (Thibault et al. 2009) or RAAR (Luke 2005).
    iterations : int
        Iterations to run in one call.
    probe_update_start : int or None
        First iteration (counted over resumed calls too) that refines the
        probe; ``None`` keeps the probe fixed.
    beta : float or None
        Relaxation in (0, 1]; ``None``: 1.0 for DM, 0.75 for RAAR
        (:attr:`relaxation` gives the value used).
    backend : {"numpy", "cupy", "auto"}
    regularization : float
        Relative damping ``d / max(den)`` of the object and probe updates, in (0, 1).
    threads : int or None
        Threads per process for the FFTs and the CPU kernels; ``None``: the
        backend's FFT workers for one process, cores / ranks on the node for
        a rank.
    kernels : {"auto", "numba", "numpy", "generic"}
        CPU only: the fused numba kernels (``"auto"`` when numba is
        installed) or the whole-stack NumPy reference, both with quantised,
        order-independent sums (:mod:`sparkmpi.ptycho._fused`); ``"generic"``
        runs the backend-generic code that CuPy runs, with plain float sums.
    refine_probe : bool
        False keeps the probe fixed whatever ``probe_update_start`` says.
    pin_probe_ramp : bool
        After each probe update, undo any shift of the probe's far-field
        centroid relative to the initial probe's, so the linear phase-ramp
        ambiguity (``P e^{-iqr}``, ``O e^{iqr}``) cannot drift into the object.

    Raises
    ------
    PtychoInputError
        A value out of range or of the wrong kind, named with what was expected.
    """

    algorithm: str = "dm"
    iterations: int = 100
    probe_update_start: int | None = 10
    beta: float | None = None
    backend: str = "numpy"
    regularization: float = 1e-4
    threads: int | None = None
    kernels: str = "auto"
    refine_probe: bool = True
    pin_probe_ramp: bool = True

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise PtychoInputError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not _whole(self.iterations, 0):
            raise PtychoInputError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        if self.beta is not None:
            try:
                ok = 0 < float(self.beta) <= 1
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise PtychoInputError(f"beta must be in (0, 1], got {self.beta!r}")
        if self.probe_update_start is not None and not _whole(self.probe_update_start, 0):
            raise PtychoInputError(f"probe_update_start must be an integer >= 0 or None, "
                                   f"got {self.probe_update_start!r}")
        if self.backend not in BACKENDS + ("auto",):
            raise PtychoInputError(f"backend must be one of {BACKENDS + ('auto',)}, "
                                   f"got {self.backend!r}")
        try:
            ok = 0 < self.regularization < 1
        except TypeError:
            ok = False
        if not ok:
            raise PtychoInputError(f"regularization must be in (0, 1), got {self.regularization!r}")
        if self.threads is not None and not _whole(self.threads, 1):
            raise PtychoInputError(f"threads must be an integer >= 1 or None, got {self.threads!r}")
        if self.kernels not in KERNELS:
            raise PtychoInputError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")

    @classmethod
    def of(cls, options: Options | None = None, **settings) -> Options:
        """``options`` (default: all defaults) with ``settings`` replacing fields.

        Raises
        ------
        PtychoInputError
            ``options`` is not an :class:`Options`, or a setting names no field.
        """
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise PtychoInputError(f"options must be a sparkmpi.ptycho.Options, "
                                   f"got {type(options).__name__}")
        unknown = sorted(set(settings) - set(cls.names()))
        if unknown:
            raise PtychoInputError(f"unknown option(s) {unknown}; expected some of "
                                   f"{sorted(cls.names())}")
        return replace(options, **settings) if settings else options

    @classmethod
    def names(cls) -> tuple:
        """The field names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @property
    def relaxation(self) -> float:
        """``beta``, or the algorithm's default when ``beta`` is None."""
        return DEFAULT_BETA[self.algorithm] if self.beta is None else float(self.beta)

    def updates_probe(self, iteration: int) -> bool:
        """Whether iteration number ``iteration`` (counted over resumed calls) refines the probe."""
        return bool(self.refine_probe and self.probe_update_start is not None
                    and iteration >= self.probe_update_start)
