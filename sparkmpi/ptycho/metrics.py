"""Reconstruction quality: object NRMSE against ground truth, illuminated region.

The object and probe of ptychography are only determined up to a global
complex factor (``O c``, ``P / c``), so the estimate ``O_hat`` is first scaled
by the least-squares factor ``gamma = <O_hat, O> / <O_hat, O_hat>`` over the
illuminated region ``M``, then::

    NRMSE = || gamma O_hat - O ||_M / || O ||_M

The illuminated region is where the scan's summed probe intensity
``sum_j |P(r - r_j)|^2`` exceeds ``threshold`` (default 10 %) of its maximum.

The Fourier-modulus error per iteration is :attr:`Result.errors`
(``sqrt(sum (|F(P O_j)| - sqrt(I_j))^2 / sum I_j)``, all ranks).
"""

from __future__ import annotations

import numpy as np

from ._validate import check_complex_image, check_positions, shape2
from .errors import FrameMismatchError, PtychoInputError


def illumination(probe, positions, object_shape) -> np.ndarray:
    """Summed probe intensity ``sum_j |P(r - r_j)|^2`` over the object, float32."""
    from ..backend import get_backend
    from ._kernels import Geometry

    object_shape = shape2(object_shape, "object_shape")
    probe = np.asarray(probe)
    if probe.ndim != 2:
        raise PtychoInputError(f"probe must be 2-D, got shape {probe.shape}")
    pos = check_positions(positions, len(positions), probe.shape, object_shape)
    geom = Geometry(get_backend("numpy"), pos, probe.shape, object_shape)
    return geom.scatter_probe_power(probe.astype(np.complex64))


def illuminated_mask(data, probe=None, threshold: float = 0.1) -> np.ndarray:
    """Boolean mask of the illuminated region of a scan.

    Parameters
    ----------
    data : PtychoData
        Needs ``positions`` and ``object_shape``, and ``probe_true`` unless
        ``probe`` is given.
    probe : ndarray (H, W), optional
        Probe to use (default ``data.probe_true``).
    threshold : float
        Fraction of the maximum summed intensity, in (0, 1).

    Returns
    -------
    ndarray, bool, shape ``data.object_shape``
    """
    if not 0 < threshold < 1:
        raise PtychoInputError(f"threshold must be in (0, 1), got {threshold!r}")
    probe = data.probe_true if probe is None else probe
    if probe is None:
        raise PtychoInputError("illuminated_mask needs a probe: data has no probe_true and "
                               "no probe= was given")
    power = illumination(probe, data.positions, data.object_shape)
    return power > threshold * float(power.max())


def nrmse(estimate, truth, mask=None) -> float:
    """Normalised RMS error of ``estimate`` against ``truth`` after the global complex scale.

    Parameters
    ----------
    estimate, truth : ndarray, complex, same shape
    mask : ndarray of bool, same shape, optional
        Region to compare (default everything).

    Returns
    -------
    float
        ``||gamma estimate - truth||_M / ||truth||_M`` with
        ``gamma = <estimate, truth> / <estimate, estimate>`` over ``M``.
    """
    est = np.asarray(estimate)
    tru = np.asarray(truth)
    if est.shape != tru.shape:
        raise FrameMismatchError(f"estimate has shape {est.shape} but truth has shape "
                                 f"{tru.shape}; expected equal shapes")
    if mask is None:
        mask = np.ones(est.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != est.shape:
        raise FrameMismatchError(f"mask has shape {mask.shape}, expected {est.shape}")
    if not mask.any():
        raise PtychoInputError("mask selects no pixels")
    e = est[mask].astype(np.complex128)
    t = tru[mask].astype(np.complex128)
    ee = np.vdot(e, e).real
    gamma = np.vdot(e, t) / ee if ee > 0 else 0.0
    return float(np.linalg.norm(gamma * e - t) / max(np.linalg.norm(t), np.finfo(float).tiny))


def object_nrmse(obj, data, threshold: float = 0.1) -> float:
    """:func:`nrmse` of ``obj`` against ``data.object_true`` over the illuminated region."""
    if data.object_true is None:
        raise PtychoInputError("data has no object_true to compare with")
    obj = check_complex_image(obj, data.object_shape, "obj")
    return nrmse(obj, data.object_true, illuminated_mask(data, threshold=threshold))
