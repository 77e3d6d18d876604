"""Iterative ptychographic reconstruction: difference map and RAAR.

Both engines keep one exit wave ``psi_j`` per frame and alternate two
projections:

* the **overlap projection** ``Pi_O``: the object and probe that best explain
  all exit waves in the least-squares sense (the paper's eqs. 4 and 5,
  Thibault et al. 2009)::

      O(r) = sum_j psi_j(r - r_j) P*(r - r_j) / sum_j |P(r - r_j)|^2
      P(r) = sum_j psi_j(r) O*(r + r_j)     / sum_j |O(r + r_j)|^2

  followed by ``psi_j <- P * O_j``.  Every sum over frames goes through
  :func:`allreduce_sums`, so frames split across MPI ranks give the same
  object and probe as one process;
* the **Fourier-modulus projection** ``Pi_F``: keep the phase of
  ``F(psi_j)`` and replace its modulus by the measured ``sqrt(I_j)``.

Difference map (Thibault et al. 2009, the paper's eq. 6 with
``gamma_O = -1/beta``, ``gamma_F = 1/beta`` in the usual simplified form)::

    psi <- psi + beta * (Pi_F(2 Pi_O psi - psi) - Pi_O psi)

RAAR (Luke 2005, with ``M`` the Fourier-modulus set and ``S`` the overlap
set; ``beta = 1`` gives back a difference map)::

    psi <- beta * Pi_O(2 Pi_F psi - psi) + (1 - 2 beta) Pi_F psi + beta * psi

The object and probe updates are regularised as
``O <- (num + d O_old) / (den + d)`` with ``d = regularization * max(den)``,
which keeps unlit pixels at their previous value (1 at the start).

Arrays are complex64 / float32 throughout, on NumPy (scipy.fft with
threads) or CuPy, picked by :func:`sparkmpi.backend.get_backend`.  All work is
vectorised over frames: an iteration is a fixed number of whole-stack
operations, never a Python loop over frames.  The settings live in one
:class:`~sparkmpi.ptycho.options.Options`; the steps in
:mod:`sparkmpi.ptycho._engine`, as an exact CPU implementation and a generic
(CuPy-capable) one behind the same interface.

References
----------
1. P. Thibault, M. Dierolf, O. Bunk, A. Menzel, F. Pfeiffer, "Probe
   retrieval in ptychographic coherent diffractive imaging",
   Ultramicroscopy 109, 338-343 (2009).
2. D. R. Luke, "Relaxed averaged alternating reflections for diffraction
   imaging", Inverse Problems 21, 37-50 (2005).
3. S. Marchesini et al., "SHARP: a distributed GPU-based ptychographic
   solver", J. Appl. Cryst. 49, 1245-1252 (2016).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..backend import get_backend
from ._engine import make_engine
from ._kernels import allreduce_max, allreduce_sums
from ._validate import (check_complex_image, check_frames, check_intensities, check_probe,
                        shape2)
from .errors import FrameMismatchError, PtychoInputError
from .options import ALGORITHMS, Options

__all__ = [
    "ALGORITHMS",
    "Options",
    "ReconstructionState",
    "Result",
    "allreduce_sums",
    "initial_probe",
    "reconstruct",
    "reconstruct_frames",
    "reconstruct_rank",
]


@dataclass
class ReconstructionState:
    """Everything needed to continue a reconstruction where it stopped.

    Arrays live on the backend that produced them (CuPy arrays stay on the
    GPU).  ``exit_waves`` are in the same frame order as the input data.

    Attributes
    ----------
    algorithm : str
    iteration : int
        Iterations done so far (the next one has this number).
    object : array, complex64, shape (Hy, Wx)
    probe : array, complex64, shape (H, W), or (M, H, W) with ``probe_modes`` M > 1
    exit_waves : array, complex64, shape (N, H, W), or (N, M, H, W) with modes
    errors : list of float
        Fourier-modulus error after each iteration so far.
    backend : str
    probe_centroid : (float, float) or None
        Far-field centroid of the first iteration's probe, the reference
        that ``pin_probe_ramp`` keeps the probe at.
    positions : ndarray (N, 2) float64 or None
        Refined positions so far (``refine_positions``), this call's frames.
    positions_start : ndarray (N, 2) float64 or None
        The positions the refinement started from (``position_max_shift``).
    positions_whole : ndarray (N, 2) int64 or None
        The whole pixels the engine used (not always the rounded
        ``positions``: a pixel changes with hysteresis).
    """

    algorithm: str
    iteration: int
    object: Any
    probe: Any
    exit_waves: Any
    errors: list = field(default_factory=list)
    backend: str = "numpy"
    probe_centroid: tuple | None = None
    positions: Any = None
    positions_start: Any = None
    positions_whole: Any = None


@dataclass
class Result:
    """Outcome of :func:`reconstruct`.

    Attributes
    ----------
    object : ndarray, complex64, shape (Hy, Wx)
    probe : ndarray, complex64, shape (H, W)
        The probe; with ``probe_modes`` > 1 its main (most powerful) mode.
    errors : ndarray, float64, shape (iterations so far,)
        Relative Fourier-modulus error ``sqrt(sum (|F psi| - sqrt I)^2 / sum I)``
        per iteration (summed over all ranks).
    state : ReconstructionState
        Pass back as ``state=`` to continue.
    seconds : float
        Wall time of the iterations of this call (set-up excluded).
    iterations : int
        Iterations done by this call.
    positions : ndarray, float64, shape (N, 2)
        The scan positions at the end (top-left, pixels, the frames of this
        call in their order): refined and fractional with
        ``refine_positions``, else the given ones.
    positions_moved : list of int
        Per position-refinement step, the frames (all ranks) whose whole-pixel
        position changed.
    probe_modes : ndarray, complex64, shape (M, H, W)
        Every probe mode, orthogonal, by decreasing power (``M = 1``: the
        probe alone).
    """

    object: np.ndarray
    probe: np.ndarray
    errors: np.ndarray
    state: ReconstructionState
    seconds: float
    iterations: int
    positions: np.ndarray | None = None
    positions_moved: list = field(default_factory=list)
    probe_modes: np.ndarray | None = None

    def __post_init__(self):
        if self.probe_modes is None:
            self.probe_modes = np.asarray(self.probe)[None]

    @property
    def mode_powers(self) -> tuple:
        """Each probe mode's share of the total probe power."""
        from .modes import mode_powers

        return mode_powers(self.probe_modes)

    @property
    def seconds_per_iteration(self) -> float:
        return self.seconds / self.iterations if self.iterations else float("nan")

    @property
    def fourier_error(self) -> float:
        return float(self.errors[-1]) if len(self.errors) else float("nan")


# --------------------------------------------------------------------------- helpers
def initial_probe(intensities, comm=None) -> np.ndarray:
    """Probe guess from the mean diffraction pattern: ``F^-1 sqrt(mean_j I_j)``, centred.

    A zero-phase guess with the right power and size; exact for an in-focus
    aperture whose pupil has a flat phase.  With ``comm`` the mean is taken
    over the frames of all ranks.

    Parameters
    ----------
    intensities : ndarray, shape (N, H, W)
        Zero frequency at the frame centre.
    comm : mpi4py-like communicator, optional

    Returns
    -------
    ndarray, complex64, shape (H, W)
    """
    arr = check_intensities(intensities)
    # Quantised sum (see ExactSums): integer multiples of 1/scale below 2**52 add exactly,
    # so the mean is the same for any split of the frames over ranks.
    count = np.array([arr.shape[0]], dtype=np.float64)
    allreduce_sums(comm, [count])
    top = allreduce_max(comm, [float(arr.max())])[0]
    scale = math.ldexp(1.0, int(math.floor(51 - math.log2(count[0] * max(top, 1e-300)))))
    total = np.zeros(arr.shape[1:], dtype=np.float64)
    for start in range(0, arr.shape[0], 64):
        block = arr[start:start + 64].astype(np.float64)
        block *= scale
        np.rint(block, out=block)
        total += block.sum(axis=0)
    allreduce_sums(comm, [total])
    mean = total / scale / count[0]
    amp = np.fft.ifftshift(np.sqrt(mean))
    probe = np.fft.fftshift(np.fft.ifft2(amp, norm="ortho"))
    return probe.astype(np.complex64)


def _to_numpy_state_array(bk_from: str, arr):
    if bk_from == "cupy" and not isinstance(arr, np.ndarray):
        return arr.get()
    return np.asarray(arr)


# --------------------------------------------------------------------------- public API
def reconstruct_frames(intensities, positions, object_shape, options: Options, *, probe=None,
                       object_init=None, state: ReconstructionState | None = None, comm=None,
                       callback: Callable[[int, float], Any] | None = None) -> Result:
    """Reconstruct from frame arrays with an :class:`Options`: what every entry runs.

    :func:`reconstruct`, :func:`reconstruct_rank` and
    :class:`~sparkmpi.ptycho.StreamingReconstruction` all end here.

    Parameters
    ----------
    intensities : ndarray, float32, shape (N, H, W)
        Zero frequency at the frame centre; under MPI this rank's frames.
    positions : ndarray, int, shape (N, 2)
        Top-left offsets in pixels.
    object_shape : (int, int)
    options : Options
    probe, object_init, state, comm, callback
        As for :func:`reconstruct`.

    Returns
    -------
    Result
    """
    if not isinstance(options, Options):
        raise PtychoInputError(f"options must be a sparkmpi.ptycho.Options, "
                               f"got {type(options).__name__}")
    if callback is not None and not callable(callback):
        raise PtychoInputError(f"callback must be callable, got {type(callback).__name__}")
    algorithm = options.algorithm
    modes = int(options.probe_modes)
    arr, pos, object_shape = check_frames(intensities, positions, object_shape,
                                          probe if np.ndim(probe) != 3 else None)
    frame_shape = arr.shape[1:]
    exit_waves = None
    errors: list = []
    start_iteration = 0
    centroid = None
    positions_float = positions_start = None
    if state is not None:
        if not isinstance(state, ReconstructionState):
            raise PtychoInputError(f"state must be a ReconstructionState from an earlier "
                                   f"Result, got {type(state).__name__}")
        if state.algorithm != algorithm:
            raise PtychoInputError(f"state was made by algorithm {state.algorithm!r}, "
                                   f"cannot continue it with {algorithm!r}")
        probe = _to_numpy_state_array(state.backend, state.probe)
        object_init = _to_numpy_state_array(state.backend, state.object)
        exit_waves = state.exit_waves
        wave_shape = arr.shape if modes == 1 else (arr.shape[0], modes) + frame_shape
        if tuple(exit_waves.shape) != tuple(wave_shape):
            raise FrameMismatchError(f"state.exit_waves has shape {tuple(exit_waves.shape)} "
                                     f"but intensities {arr.shape} with probe_modes={modes} "
                                     f"need {wave_shape}; resume with the same frames and "
                                     f"modes")
        if state.backend != options.backend:
            exit_waves = _to_numpy_state_array(state.backend, exit_waves)
        errors = list(state.errors)
        start_iteration = int(state.iteration)
        centroid = state.probe_centroid
        if state.positions is not None:
            positions_float = np.asarray(state.positions, dtype=np.float64)
            positions_start = state.positions_start
            if positions_float.shape != pos.shape:
                raise FrameMismatchError(f"state.positions has shape {positions_float.shape} "
                                         f"but positions has shape {pos.shape}; resume with "
                                         f"the same frames")
            pos = np.asarray(state.positions_whole, dtype=np.int64)
    if probe is None:
        probe = initial_probe(arr, comm)
    probe = check_probe(probe, frame_shape, modes)
    if object_init is None:
        object_init = np.ones(object_shape, dtype=np.complex64)
    object_init = check_complex_image(object_init, object_shape, "object_init")
    bk = get_backend(options.backend)
    threads = options.threads
    if threads is None:
        threads = bk.fft_workers or 1
    eng = make_engine(bk, arr, pos, object_shape, probe, object_init, exit_waves, comm,
                      options.regularization, threads, pin_ramp=bool(options.pin_probe_ramp),
                      centroid=centroid, kernels=options.kernels,
                      probe_support=options.probe_support, probe_center=options.probe_center,
                      probe_power=options.probe_power, positions_start=positions_start,
                      fft=options.fft)
    if positions_float is not None:
        eng.positions = positions_float.copy()
    step = eng.step(algorithm)
    beta = options.relaxation
    iterations = int(options.iterations)
    sync_each = comm is not None or callback is not None
    pending = []
    moved = []
    schedule = options.refinement_schedule(eng.n_total)
    try:
        bk.synchronize()
        t0 = time.perf_counter()
        for k in range(iterations):
            it = start_iteration + k
            refine = options.refine_positions and schedule.due(it)
            eng.keep_phi = refine   # the refinement reuses the step's F(P O_j)
            err = step(beta, options.updates_probe(it))
            if refine:
                moved.append(eng.refine_positions(options.position_max_step,
                                                  options.position_max_shift,
                                                  have_phi=eng.phi_after_step))
                schedule.record(it, moved[-1])
            if sync_each:
                buf = np.array([float(err)], dtype=np.float64)
                allreduce_sums(comm, [buf])
                e = math.sqrt(buf[0] / eng.norm)
                errors.append(e)
                if callback is not None:
                    callback(it, e)
            else:
                pending.append(err)
        bk.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        eng.close()
    errors.extend(math.sqrt(float(e) / eng.norm) for e in pending)
    new_state = ReconstructionState(algorithm, start_iteration + iterations, eng.O, eng.P,
                                    eng.exit_waves(), errors, bk.name,
                                    tuple(eng._centroid0) if eng._centroid0 else None,
                                    eng.positions.copy(), eng.positions_start.copy(),
                                    eng.geom.positions.copy())
    probe_out = np.asarray(bk.asnumpy(eng.P))
    all_modes = probe_out if probe_out.ndim == 3 else probe_out[None]
    return Result(np.asarray(bk.asnumpy(eng.O)), all_modes[0],
                  np.asarray(errors, dtype=np.float64), new_state, seconds, iterations,
                  eng.positions.copy(), moved, all_modes)


def reconstruct(data, *, probe=None, object_init=None, state: ReconstructionState | None = None,
                comm=None, callback: Callable[[int, float], Any] | None = None,
                options: Options | None = None, **settings) -> Result:
    """Reconstruct object and probe from a ptychographic scan.

    Parameters
    ----------
    data : PtychoData or mapping
        Needs ``intensities`` (float32, (N, H, W), zero frequency at the frame
        centre), ``positions`` (int, (N, 2), top-left offsets in pixels) and
        ``object_shape``.  Under MPI, this rank's frames only.
    probe : array (H, W) or (M, H, W), optional
        Initial probe; default :func:`initial_probe` of the data.  With
        ``probe_modes`` M > 1 a 2-D probe gets the extra modes of
        :func:`~sparkmpi.ptycho.modes.initial_modes`; (M, H, W) gives them all.
    object_init : array (Hy, Wx), optional
        Initial object; default all ones.
    state : ReconstructionState, optional
        Continue from an earlier :class:`Result` (same frames, same order).
    comm : mpi4py-like communicator, optional
        When given, sums over frames are combined across ranks (see
        :func:`reconstruct_rank`).
    callback : callable(iteration, fourier_error), optional
        Called after each iteration.
    options : Options, optional
        The algorithm and its settings (default: :class:`Options`' defaults).
    **settings
        Fields of :class:`Options` that replace those of ``options``:
        ``algorithm`` ("dm" or "raar"), ``iterations`` (100),
        ``probe_update_start`` (10), ``beta``, ``backend`` ("numpy"),
        ``regularization``, ``threads``, ``kernels`` ("auto"),
        ``refine_probe``, ``pin_probe_ramp``; see :class:`Options`.
        ``kernels="generic"`` gives distributed results that match one
        process to rounding, not bit for bit.

    Returns
    -------
    Result

    Raises
    ------
    PtychoInputError
        (a ``ValueError``) for an unknown or bad option, inconsistent shapes,
        NaNs, negative intensities, positions outside the object or a wrong
        probe shape, before any iteration.
    """
    options = Options.of(options, **settings)
    intensities, positions, object_shape = _unpack(data)
    return reconstruct_frames(intensities, positions, object_shape, options, probe=probe,
                              object_init=object_init, state=state, comm=comm,
                              callback=callback)


def reconstruct_rank(comm, intensities, positions, object_shape, *, probe=None,
                     object_init=None, state: ReconstructionState | None = None,
                     callback: Callable[[int, float], Any] | None = None,
                     options: Options | None = None, **settings) -> Result:
    """One MPI rank's share of a distributed reconstruction.

    Each rank passes its own frames; every sum over frames is combined with
    ``comm.Allreduce`` each iteration, so all ranks end with the same object
    and probe, equal to a one-process run on all frames (bit for bit with the
    exact CPU kernels).  Call it from ``mpiexec`` ranks
    (:mod:`sparkmpi.ptycho.mpi_job`) or from a Spark-MPI task
    (:func:`sparkmpi.ptycho.spark.reconstruct_mpi`).

    Parameters
    ----------
    comm : mpi4py-like communicator
        ``rank``, ``size`` and ``Allreduce``; all ranks must call this
        function with the same options and ``object_shape``.
    intensities : ndarray, float32, shape (n, H, W)
        This rank's frames (at least one).
    positions : ndarray, int, shape (n, 2)
        Their top-left offsets in the global object.
    object_shape : (int, int)
        Shape of the global object.
    probe, object_init, state, callback, options, **settings
        As for :func:`reconstruct`.  ``probe`` and ``object_init``, when
        given, must be the same on every rank.  ``threads`` defaults to the
        node's cores divided by the ranks on it
        (:func:`sparkmpi.ptycho.mpi_job.threads_per_rank`).

    Returns
    -------
    Result
        ``object``, ``probe`` and ``errors`` are global (the same on every
        rank); ``state.exit_waves`` are this rank's; ``seconds`` is the
        slowest rank's.
    """
    if comm is None:
        raise PtychoInputError("comm must be an MPI communicator, got None "
                               "(use reconstruct() for one process)")
    for attr in ("Allreduce", "size", "rank"):
        if not hasattr(comm, attr):
            raise PtychoInputError(f"comm must look like an mpi4py communicator; "
                                   f"{type(comm).__name__} has no {attr!r}")
    if "comm" in settings:
        raise PtychoInputError("pass the communicator as the first argument, not comm=")
    options = Options.of(options, **settings)
    if options.threads is None:
        from .mpi_job import threads_per_rank

        options = Options.of(options, threads=threads_per_rank(comm))
    object_shape = shape2(object_shape, "object_shape")
    result = reconstruct_frames(intensities, positions, object_shape, options, probe=probe,
                                object_init=object_init, state=state, comm=comm,
                                callback=callback)
    result.seconds = float(allreduce_max(comm, [result.seconds])[0])
    return result


def _unpack(data):
    if hasattr(data, "intensities") and hasattr(data, "positions"):
        return data.intensities, data.positions, data.object_shape
    if isinstance(data, dict):
        missing = [k for k in ("intensities", "positions", "object_shape") if k not in data]
        if missing:
            raise PtychoInputError(f"data is missing key(s) {missing}")
        return data["intensities"], data["positions"], data["object_shape"]
    raise PtychoInputError(f"data must be a PtychoData or a dict with intensities, positions "
                           f"and object_shape, got {type(data).__name__}")
