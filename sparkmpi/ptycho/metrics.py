"""Reconstruction quality: object and probe NRMSE against ground truth, illuminated region.

The object and probe of ptychography are only determined up to a global
complex factor (``O c``, ``P / c``), a translation (``O(r - s)``,
``P(r + s)``: the probe may drift, taking the object with it) and a linear
phase ramp (``O e^{iqr}``, ``P e^{-iqr}``).  :func:`register` removes all
three before comparing, and is what every NRMSE the project shows uses
(:func:`registered_nrmse`, :func:`object_quality`, :func:`probe_quality`):

1. the ramp ``q``: a ramp is a translation of the spectrum, so ``q`` is the
   subpixel shift between ``|F(O_hat M)|`` and ``|F(O M)|`` (independent of a
   real-space translation), by scikit-image's ``phase_cross_correlation``
   (to 1/10 pixel);
2. the translation ``s``: ``phase_cross_correlation`` of the de-ramped
   estimate against the truth over ``M`` (the truth masked, the estimate
   whole, so the mask's edge does not correlate with itself), to 1/10 pixel;
3. both refined together with the complex factor ``gamma`` by Gauss-Newton
   on ``|| gamma u - O ||_M``, ``u(r) = (O_hat e^{-iqr})(r + s)`` (the ramp
   off first, so the Fourier shift is exact), to ``0.1 / upsample`` pixel;
   the result is never above the plain figure::

    NRMSE = || gamma O_hat' - O ||_M / || O ||_M

The illuminated region is where the scan's summed probe intensity
``sum_j |P(r - r_j)|^2`` exceeds ``threshold`` (default 10 %) of its maximum.
:func:`nrmse` is the plain form (complex factor only): a drifted
reconstruction scores badly on it whatever its quality.

The Fourier-modulus error per iteration is :attr:`Result.errors`
(``sqrt(sum (|F(P O_j)| - sqrt(I_j))^2 / sum I_j)``, all ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import check_complex_image, check_positions, shape2
from .errors import FrameMismatchError, PtychoInputError


def illumination(probe, positions, object_shape) -> np.ndarray:
    """Summed probe intensity ``sum_j |P(r - r_j)|^2`` over the object, float32.

    ``probe`` (M, H, W): incoherent modes, their intensities summed."""
    from ..backend import get_backend
    from ._kernels import Geometry

    object_shape = shape2(object_shape, "object_shape")
    probe = np.asarray(probe)
    if probe.ndim not in (2, 3):
        raise PtychoInputError(f"probe must be (H, W) or modes (M, H, W), got shape {probe.shape}")
    frame_shape = probe.shape[-2:]
    pos = check_positions(positions, len(positions), frame_shape, object_shape)
    geom = Geometry(get_backend("numpy"), pos, frame_shape, object_shape)
    return geom.scatter_probe_power(probe.astype(np.complex64))


def illuminated_mask(data, probe=None, threshold: float = 0.1) -> np.ndarray:
    """Boolean mask of the illuminated region of a scan.

    Parameters
    ----------
    data : PtychoData
        Needs ``positions`` and ``object_shape``, and ``probe_true`` unless
        ``probe`` is given.
    probe : ndarray (H, W) or (M, H, W), optional
        Probe to use (default ``data.probe_modes_true`` where the data has
        it, the incoherent sum of the true modes, else ``data.probe_true``).
    threshold : float
        Fraction of the maximum summed intensity, in (0, 1).

    Returns
    -------
    ndarray, bool, shape ``data.object_shape``
    """
    if not 0 < threshold < 1:
        raise PtychoInputError(f"threshold must be in (0, 1), got {threshold!r}")
    if probe is None:
        probe = getattr(data, "probe_modes_true", None)
        if probe is None:
            probe = data.probe_true
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
    """Registered NRMSE (:func:`register`) of ``obj`` against ``data.object_true`` over the
    illuminated region."""
    return object_quality(obj, data, threshold).nrmse


# --------------------------------------------------------------------------- registered
@dataclass(frozen=True)
class Registration:
    """How an estimate lines up with the truth, and its NRMSE once lined up.

    Attributes
    ----------
    nrmse : float
        ``|| gamma O_hat' - O ||_M / || O ||_M`` after the translation and ramp.
    shift_px : (float, float)
        Translation (rows, cols) of the estimate relative to the truth:
        ``O_hat(r) ~ O(r - shift_px)``.
    ramp : (float, float)
        Linear phase ramp of the estimate relative to the truth, radians per
        pixel (rows, cols): ``O_hat ~ O e^{i (ramp . r)}``.
    scale : complex
        ``gamma``, the factor applied to the registered estimate.
    nrmse_unregistered : float
        :func:`nrmse` (complex factor only), for comparison.
    mode_powers : tuple of float
        :func:`probe_quality` of a probe with incoherent modes: each mode's
        share of the power (the NRMSE is then the main mode's); else empty.
    """

    nrmse: float
    shift_px: tuple
    ramp: tuple
    scale: complex
    nrmse_unregistered: float
    mode_powers: tuple = ()

    def as_dict(self, prefix: str = "") -> dict:
        """JSON-ready fields (``nrmse``, ``shift_px``, ``ramp_rad_per_px``, ...), names prefixed."""
        out = {f"{prefix}nrmse": self.nrmse, f"{prefix}shift_px": list(self.shift_px),
               f"{prefix}ramp_rad_per_px": list(self.ramp),
               f"{prefix}nrmse_unregistered": self.nrmse_unregistered}
        if self.mode_powers:
            out[f"{prefix}mode_powers"] = list(self.mode_powers)
        return out


def _ramp(shape, qy: float, qx: float) -> np.ndarray:
    """``e^{i (qy y + qx x)}`` over an array of ``shape``, complex128."""
    ey = np.exp(1j * qy * np.arange(shape[0]))
    ex = np.exp(1j * qx * np.arange(shape[1]))
    return ey[:, None] * ex[None, :]


def _fourier_shift(image: np.ndarray, shift) -> np.ndarray:
    """``image(r - shift)`` by a Fourier phase ramp (circular, subpixel)."""
    import scipy.fft
    from scipy.ndimage import fourier_shift

    return scipy.fft.ifft2(fourier_shift(scipy.fft.fft2(image), shift))


def register(estimate, truth, mask=None, *, upsample: int = 100, translation: bool = True,
             ramp: bool = True) -> Registration:
    """Line ``estimate`` up with ``truth`` (translation, phase ramp, complex factor); its NRMSE.

    Parameters
    ----------
    estimate, truth : ndarray, complex, same 2-D shape
    mask : ndarray of bool, same shape, optional
        Region compared (default everything), in the truth's frame.
    upsample : int
        Subpixel precision of the translation: ``1 / upsample`` pixels.
    translation, ramp : bool
        Whether to remove a translation and a linear phase ramp.

    Returns
    -------
    Registration

    Raises
    ------
    FrameMismatchError
        ``estimate``, ``truth`` and ``mask`` differ in shape, or are not 2-D.
    PtychoInputError
        The mask selects no pixel, or ``upsample`` is not an integer >= 1.
    """
    from skimage.registration import phase_cross_correlation

    est = np.asarray(estimate).astype(np.complex128)
    tru = np.asarray(truth).astype(np.complex128)
    if est.shape != tru.shape or est.ndim != 2:
        raise FrameMismatchError(f"estimate has shape {est.shape} but truth has shape "
                                 f"{tru.shape}; expected equal 2-D shapes")
    if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 1:
        raise PtychoInputError(f"upsample must be an integer >= 1, got {upsample!r}")
    m = np.ones(est.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != est.shape:
        raise FrameMismatchError(f"mask has shape {m.shape}, expected {est.shape}")
    if not m.any():
        raise PtychoInputError("mask selects no pixels")
    plain = nrmse(est, tru, m)
    h, w = est.shape
    qy = qx = 0.0
    if ramp:   # a ramp shifts the spectrum; a translation does not change its modulus
        spec_t = np.fft.fftshift(np.abs(np.fft.fft2(tru * m)))
        spec_e = np.fft.fftshift(np.abs(np.fft.fft2(est * m)))
        if spec_e.any():
            found = phase_cross_correlation(spec_t, spec_e, upsample_factor=min(upsample, 10),
                                            normalization=None)[0]
            qy, qx = -2 * np.pi * found[0] / h, -2 * np.pi * found[1] / w
    shift = np.zeros(2)
    if translation:
        moved = est * _ramp(est.shape, -qy, -qx)
        if np.abs(moved).any():   # the truth masked, the estimate whole: no common mask edge
            found = phase_cross_correlation(tru * m, moved, upsample_factor=min(upsample, 10))[0]
            shift = -np.asarray(found, dtype=np.float64)
    params = np.array([shift[0], shift[1], qy, qx])
    use = np.array([translation, translation, ramp, ramp])
    params, value, gamma = _gauss_newton(est, tru, m, params, use,
                                         tolerance=0.1 / upsample)
    if not value <= plain:   # never worse than no registration at all
        e, t = est[m], tru[m]
        ee = float(np.vdot(e, e).real)
        params, value = np.zeros(4), plain
        gamma = complex(np.vdot(e, t) / ee) if ee > 0 else 0j
    return Registration(value, (float(params[0]), float(params[1])),
                        (float(params[2]), float(params[3])), gamma, plain)


def _gauss_newton(est, tru, m, params, use, *, tolerance: float, rounds: int = 12):
    """Least-squares translation and ramp ``params = (sy, sx, qy, qx)`` (``use``: which vary).

    The aligned estimate is ``u(p)(r) = (est e^{-iq.r})(r + s)`` over the mask (the ramp
    comes off first: the estimate without it is periodic, so the Fourier shift is exact),
    with the complex factor ``gamma = <u, t> / <u, u>`` set after each round.
    Gauss-Newton on ``|| gamma u(p) - t ||_M`` over ``p`` and ``gamma``: ``du/ds = grad u`` (spectral derivatives),
    ``du/dq = -i (r + s) u``; a step that does not lower the misfit is halved.
    """
    import scipy.fft

    h, w = est.shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    ys, xs = np.nonzero(m)
    t = tru[m]
    t_norm = max(float(np.linalg.norm(t)), np.finfo(float).tiny)

    def evaluate(p, derivatives: bool):
        v = est * _ramp(est.shape, -p[2], -p[3])
        spec = scipy.fft.fft2(v) * (np.exp(2j * np.pi * p[0] * ky) * np.exp(2j * np.pi * p[1] * kx))
        u = scipy.fft.ifft2(spec)[m]
        uu = float(np.vdot(u, u).real)
        gamma = complex(np.vdot(u, t) / uu) if uu > 0 else 0j
        misfit = float(np.linalg.norm(gamma * u - t) / t_norm)
        if not derivatives:
            return misfit, gamma, u, None
        jac = [scipy.fft.ifft2(spec * (2j * np.pi * ky))[m],
               scipy.fft.ifft2(spec * (2j * np.pi * kx))[m],
               -1j * ((ys + p[0]) % h) * u, -1j * ((xs + p[1]) % w) * u]
        return misfit, gamma, u, jac

    misfit, gamma, u, jac = evaluate(params, True)
    for _ in range(rounds):
        if not use.any() or gamma == 0:
            break
        # the factor varies too (columns u and i u): a ramp's mean phase is the factor's
        cols = [gamma * jac[i] for i in range(4) if use[i]] + [u, 1j * u]
        a = np.concatenate([np.stack([c.real for c in cols], 1), np.stack([c.imag for c in cols], 1)])
        r = t - gamma * u
        b = np.concatenate([r.real, r.imag])
        step = np.zeros(4)
        step[use] = np.linalg.lstsq(a, b, rcond=None)[0][:-2]
        for _halving in range(8):
            trial = params + step
            got = evaluate(trial, False)
            if got[0] <= misfit:
                break
            step = step / 2
        else:
            break
        params = trial
        moved_px = max(abs(step[0]), abs(step[1]), abs(step[2]) * h, abs(step[3]) * w)
        misfit, gamma, u, jac = evaluate(params, True)
        if moved_px < tolerance:
            break
    return params, misfit, gamma


def registered_nrmse(estimate, truth, mask=None, **kwargs) -> float:
    """:func:`register`'s NRMSE (translation, ramp and complex factor removed)."""
    return register(estimate, truth, mask, **kwargs).nrmse


def object_quality(obj, data, threshold: float = 0.1, mask=None) -> Registration:
    """:func:`register` of ``obj`` against ``data.object_true`` over the illuminated region.

    ``mask`` replaces the region (default :func:`illuminated_mask` of ``data``).
    """
    if data.object_true is None:
        raise PtychoInputError("data has no object_true to compare with")
    obj = check_complex_image(obj, data.object_shape, "obj")
    if mask is None:
        mask = illuminated_mask(data, threshold=threshold)
    return register(obj, data.object_true, mask)


def probe_quality(probe, probe_true, threshold: float = 0.01) -> Registration:
    """:func:`register` of ``probe`` against ``probe_true`` where ``|P_true|^2`` exceeds
    ``threshold`` of its maximum (its shift is the object's, negated).

    Incoherent modes, ``probe`` (M, H, W) by decreasing power: the main
    modes are compared (``probe_true`` (H, W) or its own modes (K, H, W)),
    and :attr:`Registration.mode_powers` holds each mode's share of the power.
    """
    from dataclasses import replace

    from .modes import mode_powers

    if not 0 < threshold < 1:
        raise PtychoInputError(f"threshold must be in (0, 1), got {threshold!r}")
    tru = np.asarray(probe_true)
    if tru.ndim == 3:
        tru = tru[0]
    power = np.abs(tru) ** 2
    if tru.ndim != 2 or not power.any():
        raise PtychoInputError(f"probe_true must be a non-zero 2-D array (or modes (M, H, W)), "
                               f"got shape {np.shape(probe_true)}")
    est = np.asarray(probe)
    modes = est.ndim == 3
    if modes:
        check_complex_image(est, (est.shape[0],) + tru.shape, "probe")
        powers, est = mode_powers(est), est[0]
    est = check_complex_image(est, tru.shape, "probe")
    out = register(est, tru, power > threshold * float(power.max()))
    return replace(out, mode_powers=powers) if modes else out
