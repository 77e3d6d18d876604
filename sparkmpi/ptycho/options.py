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
from ._fft import FFT_CHOICES
from .errors import PtychoInputError

__all__ = ["ALGORITHMS", "DEFAULT_BETA", "KERNELS", "MAX_PROBE_MODES", "Options"]

ALGORITHMS = ("dm", "raar")
DEFAULT_BETA = {"dm": 1.0, "raar": 0.75}
#: "generic" runs the backend-generic array code (what CuPy runs) on NumPy.
KERNELS = ("auto", "numba", "numpy", "generic")
#: The most incoherent probe modes a reconstruction may use.
MAX_PROBE_MODES = 4


def _whole(value, least: int) -> bool:
    """True for an integer-valued number >= ``least`` (``5`` or ``5.0``, not ``True``)."""
    if isinstance(value, bool):
        return False
    try:
        return int(value) == value and value >= least
    except (TypeError, ValueError, OverflowError):
        return False


def _between(value, low: float, high: float) -> bool:
    """True for a real number in ``(low, high]`` (not a bool)."""
    if isinstance(value, bool):
        return False
    try:
        return low < float(value) <= high
    except (TypeError, ValueError):
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
    fft : {"auto", "fftw", "scipy"}
        CPU only: the frame-stack FFTs.  ``"fftw"``: pyFFTW with fixed-size
        ``FFTW_ESTIMATE`` plans (the same bits per frame for any split of the
        frames); ``"auto"``: FFTW for power-of-two frame sides when pyFFTW is
        installed, else scipy.fft (:mod:`sparkmpi.ptycho._fft`).
    refine_probe : bool
        False keeps the probe fixed whatever ``probe_update_start`` says.
    pin_probe_ramp : bool
        After each probe update, undo any shift of the probe's far-field
        centroid relative to the initial probe's, so the linear phase-ramp
        ambiguity (``P e^{-iqr}``, ``O e^{iqr}``) cannot drift into the object.
    probe_support : float or None
        Real-space probe support: after each probe update the probe is set to
        zero outside a centred circle whose diameter is this fraction of the
        frame's smaller side (0.8 by default, as the field's codes keep a
        support on by default; ``None``: no support).  A probe whose rings
        fill the frame (``make_probe(kind="focused")``) needs ``None`` or a
        larger fraction (up to 1.5, the whole frame).
    probe_center : bool
        After each probe update, when the probe's intensity centroid is a
        pixel or more from the frame centre, move the probe back by the
        whole pixels of that offset, and the object and the exit waves with
        it (``P(r + n)``, ``O(r + n)``, ``psi_j(r + n)``: the same data), so
        the probe cannot wander off its support.
    probe_power : bool
        After each probe update, scale the probe so that ``sum |P|^2`` equals
        the largest measured frame power ``max_j sum I_j``, and the object by
        the inverse factor (the same exit waves).
    refine_positions : bool
        Refine the scan positions (:mod:`sparkmpi.ptycho.positions`): each
        rank moves its own frames by a least-squares step along the object's
        gradient (Odstrcil et al. 2018), subpixel, on the schedule below.
        The engine works on whole pixels (a frame's pixel changes with
        hysteresis); :attr:`Result.positions` holds the refined fractional
        positions.
    position_refine_start : int
        First iteration with a refinement step (10).
    position_refine_interval : int
        Iterations between refinement steps (4: DM settles in between; every
        iteration measured worse and slower, BENCHMARKS.md).
    position_refine_stop : int or None
        No refinement from this iteration on (``None``: to the end).
    position_refine_settle : int or None
        Once this many refinement steps in a row (2) changed the whole pixel
        of at most 0.5 % of the frames (at least one frame), the interval
        doubles with each further such step, up to 4 times
        ``position_refine_interval``, and is back at its value after a step
        that moves more (:class:`sparkmpi.ptycho.positions.RefinementSchedule`);
        ``None``: a fixed interval (:meth:`refines_positions`).
    position_max_step : float
        Pixels per axis a frame may move in one step (1.0).
    position_max_shift : float
        Pixels per axis a frame may move from its given position (8.0).
    probe_modes : int
        Mixed-state (incoherent) probe modes, 1 to 4 (Thibault & Menzel
        2013): each frame's intensity is the sum of the intensities of the
        modes (:mod:`sparkmpi.ptycho.modes`).  More than one runs the
        backend-generic engine (``kernels="auto"`` picks it; the fused exact
        kernels, ``"numba"`` and ``"numpy"``, are single-mode) and cannot yet
        be combined with ``refine_positions``.

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
    fft: str = "auto"
    refine_probe: bool = True
    pin_probe_ramp: bool = True
    probe_support: float | None = 0.8
    probe_center: bool = True
    probe_power: bool = False
    refine_positions: bool = False
    position_refine_start: int = 10
    position_refine_interval: int = 4
    position_refine_stop: int | None = None
    position_refine_settle: int | None = 2
    position_max_step: float = 1.0
    position_max_shift: float = 8.0
    probe_modes: int = 1

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
        if self.fft not in FFT_CHOICES:
            raise PtychoInputError(f"fft must be one of {FFT_CHOICES}, got {self.fft!r}")
        if self.probe_support is not None and not _between(self.probe_support, 0, 1.5):
            raise PtychoInputError(f"probe_support must be a fraction of the frame in (0, 1.5] "
                                   f"or None, got {self.probe_support!r}")
        for name in ("refine_probe", "pin_probe_ramp", "probe_center", "probe_power",
                     "refine_positions"):
            if not (isinstance(getattr(self, name), bool) or type(getattr(self, name)).__name__ == "bool_"):
                raise PtychoInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _whole(self.position_refine_start, 0):
            raise PtychoInputError(f"position_refine_start must be an integer >= 0, "
                                   f"got {self.position_refine_start!r}")
        if self.position_refine_stop is not None and not _whole(self.position_refine_stop, 0):
            raise PtychoInputError(f"position_refine_stop must be an integer >= 0 or None, "
                                   f"got {self.position_refine_stop!r}")
        if self.position_refine_settle is not None and not _whole(self.position_refine_settle, 1):
            raise PtychoInputError(f"position_refine_settle must be an integer >= 1 or None, "
                                   f"got {self.position_refine_settle!r}")
        if not _whole(self.position_refine_interval, 1):
            raise PtychoInputError(f"position_refine_interval must be an integer >= 1, "
                                   f"got {self.position_refine_interval!r}")
        if not _between(self.position_max_step, 0, 64):
            raise PtychoInputError(f"position_max_step must be pixels in (0, 64], "
                                   f"got {self.position_max_step!r}")
        if not _between(self.position_max_shift, 0, 4096):
            raise PtychoInputError(f"position_max_shift must be pixels in (0, 4096], "
                                   f"got {self.position_max_shift!r}")
        if not _whole(self.probe_modes, 1) or self.probe_modes > MAX_PROBE_MODES:
            raise PtychoInputError(f"probe_modes must be an integer from 1 to {MAX_PROBE_MODES}, "
                                   f"got {self.probe_modes!r}")
        if self.probe_modes > 1 and self.kernels in ("numba", "numpy"):
            raise PtychoInputError(f"probe_modes={self.probe_modes} needs kernels='auto' or "
                                   f"'generic' (the fused exact kernels, kernels="
                                   f"{self.kernels!r}, are single-mode)")
        if self.probe_modes > 1 and self.refine_positions:
            raise PtychoInputError(f"refine_positions cannot yet be combined with probe_modes="
                                   f"{self.probe_modes}; use probe_modes=1 to refine positions")

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

    def refines_positions(self, iteration: int) -> bool:
        """Whether iteration number ``iteration`` ends with a position-refinement step."""
        if self.position_refine_stop is not None and iteration >= self.position_refine_stop:
            return False
        return bool(self.refine_positions and iteration >= self.position_refine_start
                    and (iteration - self.position_refine_start) % self.position_refine_interval == 0)

    def refinement_schedule(self, frames: int = 0):
        """A fresh :class:`~sparkmpi.ptycho.positions.RefinementSchedule` for these options
        and a scan of ``frames`` frames (all ranks)."""
        from .positions import RefinementSchedule

        return RefinementSchedule(self.position_refine_start, self.position_refine_interval,
                                  self.position_refine_stop, self.position_refine_settle, frames)

    def updates_probe(self, iteration: int) -> bool:
        """Whether iteration number ``iteration`` (counted over resumed calls) refines the probe."""
        return bool(self.refine_probe and self.probe_update_start is not None
                    and iteration >= self.probe_update_start)
