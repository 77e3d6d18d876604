"""Mixed-state (incoherent) probe modes: orthogonalisation, a deterministic start, powers.

A partially coherent beam is a mixture of mutually incoherent modes ``P_m``;
each frame then measures the sum of their intensities,
``I_j = sum_m |F(P_m O_j)|^2`` (Thibault & Menzel 2013).  Any unitary mixture
``Q_n = sum_m U_mn P_m`` of the modes gives the same intensities, so the
engines keep one representative: the modes orthogonal, sorted by power
(:func:`orthogonalize_modes`), the eigenmodes of the probe's coherence
function.  Everything here is computed from the probe alone, so every rank
gets the same modes.

References
----------
1. P. Thibault and A. Menzel, "Reconstructing state mixtures from
   diffraction measurements", Nature 494, 68-71 (2013).
"""

from __future__ import annotations

import numpy as np

from .errors import PtychoInputError
from .options import MAX_PROBE_MODES

__all__ = ["initial_modes", "mode_powers", "modes_of", "orthogonalize_modes"]

#: Power fractions of the second, third and fourth starting modes
#: (distinct, so the start has no degenerate pair; the main mode keeps the rest).
START_FRACTIONS = (0.05, 0.03, 0.02)


def orthogonalize_modes(probe, xp=np):
    """Orthogonal modes spanning the same mixed state, sorted by power.

    The Gram matrix ``G_mk = <P_m, P_k>`` (M x M) is diagonalised on the host
    (``G = V diag(w) V^H``); the new modes are ``Q_n = sum_k V_kn P_k``, with
    ``<Q_n, Q_l> = w_n delta_nl``, largest power first.  Each column of ``V``
    is given a fixed phase (its largest entry real and positive), so modes
    that are already orthogonal and sorted come back unchanged, and the
    result moves continuously with the probe.

    Parameters
    ----------
    probe : array, complex, shape (M, H, W)
    xp : module
        NumPy or CuPy (the probe's array module).

    Returns
    -------
    (modes, mixing) : (array complex64 (M, H, W), ndarray complex128 (M, M))
        ``modes[n] = sum_k mixing[k, n] probe[k]``; apply the same mixing to
        each frame's exit waves to keep them consistent with the modes.
    """
    m = int(probe.shape[0])
    flat = probe.reshape(m, -1)
    gram = xp.conj(flat).astype(xp.complex128) @ flat.T.astype(xp.complex128)
    gram = np.asarray(gram.get() if hasattr(gram, "get") else gram)
    gram = 0.5 * (gram + gram.conj().T)   # exactly Hermitian: eigh reads one triangle
    power, vectors = np.linalg.eigh(gram)
    order = np.argsort(-power, kind="stable")
    vectors = vectors[:, order]
    big = np.argmax(np.abs(vectors), axis=0)
    phase = vectors[big, np.arange(m)]
    vectors = vectors * (np.abs(phase) / np.where(phase == 0, 1, phase))[None, :]
    mix = xp.asarray(vectors.T.astype(np.complex64))   # (n, k)
    modes = (mix @ flat).reshape(probe.shape).astype(xp.complex64)
    return modes, vectors


def mix_waves(waves, mixing, xp=np):
    """``waves[j, n] <- sum_k mixing[k, n] waves[j, k]`` in place; ``waves`` (N, M, H, W)."""
    n, m = waves.shape[:2]
    mix = xp.asarray(np.ascontiguousarray(mixing.T).astype(np.complex64))
    flat = waves.reshape(n, m, -1)
    flat[...] = xp.matmul(mix, flat)
    return waves


def initial_modes(probe, modes: int) -> np.ndarray:
    """A deterministic start for ``modes`` modes from one probe guess.

    Mode 0 is ``probe``; mode ``k`` is ``probe`` times a low-order
    Hermite-like factor (``x``, ``y``, ``x y`` about the probe's intensity
    centroid, in units of its rms radius), with :data:`START_FRACTIONS` of
    the total power; the total power is that of ``probe``.  The set is
    orthogonalised (:func:`orthogonalize_modes`).

    Parameters
    ----------
    probe : ndarray, complex, shape (H, W)
    modes : int
        1 to :data:`~sparkmpi.ptycho.options.MAX_PROBE_MODES`.

    Returns
    -------
    ndarray, complex64, shape (modes, H, W)
    """
    probe = np.asarray(probe)
    if probe.ndim != 2:
        raise PtychoInputError(f"probe must be 2-D (H, W), got shape {probe.shape}")
    if isinstance(modes, bool) or int(modes) != modes or not 1 <= modes <= MAX_PROBE_MODES:
        raise PtychoInputError(f"modes must be an integer from 1 to {MAX_PROBE_MODES}, "
                               f"got {modes!r}")
    modes = int(modes)
    main = probe.astype(np.complex128)
    power = np.abs(main) ** 2
    total = float(power.sum())
    if total <= 0:
        raise PtychoInputError("probe is all zeros; expected a non-zero probe")
    if modes == 1:
        return main[None].astype(np.complex64)
    h, w = probe.shape
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    cy = float((power * y).sum()) / total
    cx = float((power * x).sum()) / total
    radius = np.sqrt(float((power * ((y - cy) ** 2 + (x - cx) ** 2)).sum()) / total)
    u = (x - cx) / max(radius, 1.0)
    v = (y - cy) / max(radius, 1.0)
    factors = (u + 0 * v, v + 0 * u, u * v)
    fractions = START_FRACTIONS[:modes - 1]
    out = [main * np.sqrt(1.0 - sum(fractions))]
    for factor, fraction in zip(factors, fractions):
        extra = main * factor
        extra *= np.sqrt(fraction * total / max(float((np.abs(extra) ** 2).sum()), 1e-300))
        out.append(extra)
    return orthogonalize_modes(np.stack(out).astype(np.complex64))[0]


def modes_of(probe, modes: int, name: str = "probe") -> np.ndarray:
    """``probe`` as ``modes`` modes (M, H, W): a 2-D guess gets :func:`initial_modes`.

    Raises
    ------
    PtychoInputError
        ``probe`` is 3-D with another number of modes than ``modes``.
    """
    arr = np.asarray(probe)
    if arr.ndim == 2:
        return initial_modes(arr, modes) if modes > 1 else arr
    if arr.ndim == 3 and arr.shape[0] == modes:
        return arr if modes > 1 else arr[0]
    raise PtychoInputError(f"{name} must have shape (H, W) or ({modes}, H, W) for "
                           f"probe_modes={modes}, got shape {arr.shape}")


def mode_powers(probe) -> tuple:
    """Each mode's share of the total power ``sum |P_m|^2 / sum_m sum |P_m|^2``.

    ``probe`` (H, W) counts as one mode.
    """
    arr = np.asarray(probe)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise PtychoInputError(f"probe must be (H, W) or (M, H, W), got shape {arr.shape}")
    power = (np.abs(arr.astype(np.complex128)) ** 2).sum(axis=(1, 2))
    total = float(power.sum())
    return tuple(float(p / total) if total > 0 else float("nan") for p in power)
