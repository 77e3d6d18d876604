"""Scan-position refinement: the least-squares step, its bookkeeping, and test helpers.

Method (the gradient step of modern codes: Odstrcil, Menzel and
Guizar-Sicairos 2018; PtychoShelves' position correction).  Frame ``j``'s
exit wave is ``psi_j(r) = P(r) O(r + r_j)``; if the frame was really taken
at ``r_j + d``, then to first order ``P O(r + r_j + d) ~ P O_j + d . (P grad O_j)``.
With ``chi_j = Pi_F(P O_j) - P O_j`` (what the measured modulus asks the
exit wave to change by, in real space), each frame's step is the 2x2 least
squares solution of ``chi_j ~ d_y g_y + d_x g_x`` with ``g = P grad O_j``
(central differences of the object)::

    [<g_y, g_y> <g_y, g_x>] [d_y]   [Re <g_y, chi_j>]
    [<g_x, g_y> <g_x, g_x>] [d_x] = [Re <g_x, chi_j>]

Each pixel's terms are weighted by ``w_j(r) = 1 - |P(r)|^2 / D(r + r_j)``, the
share of that object pixel's illumination that comes from the other frames
(``D = sum_k shift(|P|^2, r_k)``, the object update's denominator, made from
the global comb and so the same on every rank; :func:`overlap_weight`).
Where frame ``j`` alone lights the object, the object has adapted to frame
``j`` wherever it was taken: ``chi_j`` holds no evidence there and the
unweighted sums only dilute the step, most for the frames at the scan's
edge, which then stayed a pixel off.

The step is measured at the whole pixel the engine uses, and it
underestimates the error (the modulus projection moves the exit wave only
part of the way), so the frame's fractional position accumulates
``GAIN * d`` (at most ``max_step`` px per axis a step), and stays within
``max_shift`` of where it started and inside the object.  The mean move
over all frames (of all ranks) is taken off: a common translation of every
position only translates the object.  Moves are quantised to ``2**-20`` px,
so their sum over ranks is exact in any order and a split of the frames
gives the same positions as one process.

The engine works on whole pixels.  A frame's whole pixel changes once its
fractional position is ``HYSTERESIS`` past the half pixel (a frame at its
true pixel then does not flip on the step's noise); its iterate then
restarts from ``F(P O_j)`` at the new place (an iterate built for the old
place would pull the object back), and the engine rebuilds its geometry
(:meth:`sparkmpi.ptycho._engine.Engine.set_positions`, collective).

Tried and dropped (BENCHMARKS.md has the figures; the same test scan, 128
frames of 48x48, 2 px errors):
the step alone about the whole pixel (``round(r_j) + d``: never crosses half
a pixel, 0.27 NRMSE), decaying the fraction (stalls), and trying the
suggested whole-pixel move per frame, kept where the frame's Fourier misfit
falls (frames flip back and forth on a DM object that has not settled).
"""

from __future__ import annotations

import numpy as np

from .errors import FrameMismatchError, PtychoInputError

__all__ = ["GAIN", "HYSTERESIS", "QUANTUM", "RefinementSchedule", "clamp_positions", "overlap_weight",
           "perturb_positions", "position_error", "position_sums", "quantise", "solve_steps"]

#: Moves and positions are multiples of this (pixels): sums over ranks are exact.
QUANTUM = 2.0 ** -20
#: A frame's whole pixel changes once its refined position is this far past the half pixel.
HYSTERESIS = 0.2
#: The least-squares step underestimates the error (the modulus projection moves the exit
#: wave only part of the way): steps are taken this many times over (measured with the
#: overlap weight: 3 settles the frames sooner than 2; 5 leaves frames a pixel off;
#: BENCHMARKS.md).
GAIN = 3.0


def quantise(values) -> np.ndarray:
    """``values`` rounded to multiples of :data:`QUANTUM`, float64."""
    return np.rint(np.asarray(values, dtype=np.float64) / QUANTUM) * QUANTUM


def overlap_weight(probe, den_frames, xp=np):
    """Weight of each frame pixel in the step: the share of its illumination from the other frames.

    ``w_j(r) = 1 - |P(r)|^2 / D(r + r_j)`` with ``D = sum_k shift(|P|^2, r_k)`` (the object
    update's denominator, all frames of all ranks) gathered at each frame,
    ``den_frames`` (N, H, W) real.  Where frame ``j`` alone lights the object, the
    object has adapted to frame ``j`` and holds no evidence of where it was taken
    (``w = 0``); where others light it too, ``chi_j`` measures the disagreement.
    Float64, clipped to ``[0, 1]`` (0 where ``D`` is 0).
    """
    power = probe.real.astype(xp.float64) ** 2 + probe.imag.astype(xp.float64) ** 2
    den = den_frames.astype(xp.float64)
    lit = den > 0
    share = xp.where(lit, power / xp.where(lit, den, 1.0), 1.0)
    return xp.clip(1.0 - share, 0.0, 1.0)


def position_sums(probe, grad_y, grad_x, chi, xp=np, den=None) -> np.ndarray:
    """Per-frame weighted sums of the 2x2 system:
    ``(<a,a>, <b,b>, Re<a,b>, Re<a,chi>, Re<b,chi>)``, each ``<u,v> = sum_r w u* v``.

    ``a = probe * grad_y``, ``b = probe * grad_x`` (``grad_*``: the object's gradient
    gathered at each frame, (N, H, W)); ``chi`` (N, H, W); ``den``: the object
    denominator gathered at each frame, (N, H, W) real, for the weight ``w`` of
    :func:`overlap_weight` (``None``: ``w = 1``).  Whole-stack array code over ``xp``
    (what CuPy runs; the CPU's fused kernel computes the same sums in one pass).
    Returns a NumPy float64 array (N, 5).
    """
    a = grad_y * probe
    b = grad_x * probe
    weight = None if den is None else overlap_weight(probe, den, xp)

    def inner(u, v):   # Re <u, v> per frame, float64
        prod = u.real.astype(xp.float64) * v.real + u.imag.astype(xp.float64) * v.imag
        if weight is not None:
            prod *= weight
        return prod.reshape(prod.shape[0], -1).sum(axis=1)

    sums = xp.stack([inner(a, a), inner(b, b), inner(a, b), inner(a, chi), inner(b, chi)], axis=1)
    return np.asarray(sums.get() if xp is not np else sums, dtype=np.float64)


def solve_steps(sums) -> np.ndarray:
    """Least-squares steps ``(d_y, d_x)`` per frame from :func:`position_sums`, pixels (N, 2).

    A frame on a flat patch of object has no gradient to go by: a ridge of
    ``1e-6`` of the trace keeps it still.
    """
    s = np.asarray(sums, dtype=np.float64)
    ayy, axx, axy, by, bx = (s[:, i] for i in range(5))
    ridge = 1e-6 * (ayy + axx) + 1e-300
    det = (ayy + ridge) * (axx + ridge) - axy * axy
    dy = ((axx + ridge) * by - axy * bx) / det
    dx = ((ayy + ridge) * bx - axy * by) / det
    return np.stack([dy, dx], axis=1)


def clamp_positions(positions, start, frame_shape, object_shape, max_shift: float) -> np.ndarray:
    """``positions`` kept within ``max_shift`` px (per axis) of ``start`` and inside the object."""
    pos = np.asarray(positions, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    pos = np.clip(pos, start - max_shift, start + max_shift)
    high = np.array([object_shape[0] - frame_shape[0], object_shape[1] - frame_shape[1]],
                    dtype=np.float64)
    return np.clip(pos, 0.0, high)


def position_error(estimate, truth) -> float:
    """RMS distance (pixels) between two sets of positions after removing their mean offset.

    A common translation of every position only translates the object, so it
    is not an error.
    """
    est = np.asarray(estimate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if est.shape != tru.shape or est.ndim != 2 or est.shape[1] != 2:
        raise FrameMismatchError(f"estimate has shape {est.shape} but truth has shape "
                                 f"{tru.shape}; expected equal (N, 2) shapes")
    diff = est - tru
    diff -= diff.mean(axis=0)
    return float(np.sqrt((diff ** 2).sum(axis=1).mean()))


def perturb_positions(positions, frame_shape, object_shape, *, random_px: float = 0.0,
                      scale: float = 1.0, rotation_deg: float = 0.0, seed: int = 0) -> np.ndarray:
    """Positions with injected errors, as a beamline's encoders might report them.

    A systematic scale and rotation about the scan's centre, then random
    errors uniform in ``[-random_px, random_px]`` per axis; rounded to whole
    pixels and kept inside the object.  Returns int64 (N, 2).
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise FrameMismatchError(f"positions must have shape (N, 2), got {pos.shape}")
    if not random_px >= 0 or not scale > 0:
        raise PtychoInputError(f"random_px must be >= 0 and scale > 0, got {random_px!r}, {scale!r}")
    centre = pos.mean(axis=0)
    angle = np.deg2rad(float(rotation_deg))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (pos - centre) @ rot.T * float(scale) + centre
    rng = np.random.default_rng(seed)
    moved += rng.uniform(-random_px, random_px, size=moved.shape)
    high = np.array([object_shape[0] - frame_shape[0], object_shape[1] - frame_shape[1]])
    return np.clip(np.rint(moved), 0, high).astype(np.int64)


class RefinementSchedule:
    """Which iterations end with a position-refinement step; pure.

    Steps come every ``interval`` iterations from ``start`` (until ``stop``).
    Once ``settle`` steps in a row changed the whole pixel of at most
    :data:`STILL_FRACTION` of the ``frames`` (at least one frame may move;
    the engine's picture then hardly changes with them, only the unobserved
    fractions do), each further such step doubles the interval, up to
    ``4 * interval``; a step that moves more puts it back.  ``moved`` is the
    count over all ranks, so every rank keeps the same schedule.
    ``settle=None``: fixed.
    """

    MAX_FACTOR = 4
    STILL_FRACTION = 0.005

    def __init__(self, start: int, interval: int, stop: int | None = None,
                 settle: int | None = None, frames: int = 0):
        self.start, self.base, self.stop, self.settle = int(start), int(interval), stop, settle
        self.still_moves = max(1, int(self.STILL_FRACTION * int(frames)))
        self.interval = self.base
        self.still = 0          # steps in a row that moved no frame
        self.next = self.start

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` ends with a refinement step."""
        if self.stop is not None and iteration >= self.stop:
            return False
        if iteration < self.next:
            return False
        if iteration > self.next:   # a resumed call: the next step on the base grid
            self.next = self.start + -(-(iteration - self.start) // self.base) * self.base
            return iteration == self.next
        return True

    def record(self, iteration: int, moved: int) -> None:
        """The step at ``iteration`` changed the whole pixel of ``moved`` frames (all ranks)."""
        if moved > self.still_moves or self.settle is None:
            self.still, self.interval = 0, self.base
        else:
            self.still += 1
            if self.still >= self.settle:
                self.interval = min(2 * self.interval, self.MAX_FACTOR * self.base)
        self.next = iteration + self.interval

