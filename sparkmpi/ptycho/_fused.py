"""Fused CPU kernels of the engines (numba), with their NumPy reference forms.

On the CPU an iteration is memory-bound apart from its two FFTs: each
whole-stack NumPy pass (a product, an ``abs``, a division, a copy) streams
64 MiB for 512 frames of 128x128.  The kernels below do one pass per step,
frame by frame, so a frame (128 KiB) stays in the core's cache while all of
its arithmetic is done:

* :func:`gather_mul` -- ``out_j = O[r_j:r_j+H, c_j:c_j+W] * P``;
* :func:`dm_update` -- misfit of ``Phi = F(P O_j)``, the difference-map
  combination and the Fourier-modulus projection in one pass, and the copy of
  the new iterate that the next inverse FFT works on;
* :func:`raar_pre` / :func:`raar_post` -- the same for RAAR;
* :func:`scatter_object` -- ``sum_j shift(psi_j conj(P))`` into the object
  numerator, **quantised** (below);
* :func:`probe_sums` -- ``sum_j psi_j conj(O_j)`` and ``sum_j |O_j|^2``, quantised.

Quantised sums (why distributed equals serial)
----------------------------------------------
Every per-frame contribution ``c`` to the object or probe numerator or
denominator is computed in float64 from the float32 inputs and rounded to an
integer multiple of ``1 / scale`` (``scale`` a power of two):
``q = rint(c * scale)``.  The accumulators hold integer-valued float64
numbers, and the scale is chosen (:class:`sparkmpi.ptycho._kernels.ExactSums`)
so that every possible partial sum stays below ``2**52`` in magnitude.  Sums of
such integers are exact in float64, so **the order of the additions does not
matter**: frames split over 1, 2 or 3 ranks (or 2 threads), summed per rank
and combined by ``MPI_Allreduce`` in whatever tree MPI picks, give bit-for-bit
the same object and probe as one process.  The rounding step is about
``2**-40`` of the largest sum, far below float32 resolution.

With the numba kernels the engine runs each DM/RAAR step as a chunked
pipeline (:meth:`FusedOps.inverse_scatter`, :meth:`FusedOps.forward_update`):
8 frames at a time (the FFT chunk) go through the inverse FFT and the object
scatter, later through the gather, the forward FFT and the update, while they
are in cache; the chunk kernels below repeat the whole-stack kernels'
arithmetic, so the results are the same bits (docs/ptycho.md).

The kernels are compiled with ``parallel=False`` (one thread each): ranks
already share the cores, and :class:`FusedOps` runs chunks of frames in a
thread pool (``nogil``) when a rank owns more than one core.  Without numba,
:class:`NumpyOps` runs the same steps as whole-stack NumPy operations; it is
the reference the tests compare the kernels with.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InvalidArgument
from ._fft import CHUNK
from .options import KERNELS

try:  # numba is optional: the NumPy forms below do the same work
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is absent (GPU machines)
    numba = None
    HAVE_NUMBA = False

_EPS = np.float32(1e-12)


def _jit(fn):
    if not HAVE_NUMBA:
        return fn
    return numba.njit(parallel=False, fastmath=False, cache=True, nogil=True,
                      error_model="numpy")(fn)


# --------------------------------------------------------------------------- numba kernels
@_jit
def _gather_mul(obj, probe, pos, out):  # pragma: no cover - compiled
    n, h, w = out.shape
    for j in range(n):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        for r in range(h):
            orow = obj[y0 + r, x0:x0 + w]
            prow = probe[r]
            drow = out[j, r]
            for c in range(w):
                drow[c] = orow[c] * prow[c]


@_jit
def _dm_update(Psi, Phi, a, beta, work, col, phase, rotate):  # pragma: no cover - compiled
    # per element: (rotate: Psi <- Psi phase_j); m = |Phi| - a (misfit); z = 2 Phi - Psi;
    # Psi <- Psi + beta (a z / |z| - Phi); work <- Psi
    n, h, w = Psi.shape
    c32 = np.empty(w, np.float32)   # one frame's misfit per column, then into col
    two = np.float32(2.0)
    for c in range(w):
        col[c] = 0.0
    for j in range(n):
        for c in range(w):
            c32[c] = 0.0
        if rotate:
            ph = phase[j]
            for r in range(h):
                srow = Psi[j, r]
                for c in range(w):
                    srow[c] = srow[c] * ph
        for r in range(h):
            srow = Psi[j, r]
            frow = Phi[j, r]
            arow = a[j, r]
            wrow = work[j, r]
            for c in range(w):
                f = frow[c]
                s = srow[c]
                fa = np.sqrt(f.real * f.real + f.imag * f.imag)
                m = fa - arow[c]
                c32[c] += m * m
                zr = two * f.real - s.real
                zi = two * f.imag - s.imag
                k = arow[c] / (np.sqrt(zr * zr + zi * zi) + _EPS)
                nr = s.real + beta * (k * zr - f.real)
                ni = s.imag + beta * (k * zi - f.imag)
                v = complex(nr, ni)
                srow[c] = v
                wrow[c] = v
        for c in range(w):
            col[c] += np.float64(c32[c])
    total = 0.0
    for c in range(w):
        total += col[c]
    return total


@_jit
def _raar_pre(Psi, a, beta, work):  # pragma: no cover - compiled
    # Y = Pi_F Psi; work <- 2 Y - Psi; Psi <- beta Psi + (1 - 2 beta) Y
    n, h, w = Psi.shape
    two = np.float32(2.0)
    g = np.float32(1.0) - two * beta
    for j in range(n):
        for r in range(h):
            srow = Psi[j, r]
            arow = a[j, r]
            wrow = work[j, r]
            for c in range(w):
                s = srow[c]
                k = arow[c] / (np.sqrt(s.real * s.real + s.imag * s.imag) + _EPS)
                yr = k * s.real
                yi = k * s.imag
                wrow[c] = complex(two * yr - s.real, two * yi - s.imag)
                srow[c] = complex(beta * s.real + g * yr, beta * s.imag + g * yi)


@_jit
def _raar_post(Psi, Phi, a, beta, col, phase, rotate):  # pragma: no cover - compiled
    # misfit of Phi; (rotate: Psi <- Psi phase_j); Psi <- Psi + beta Phi
    n, h, w = Psi.shape
    c32 = np.empty(w, np.float32)   # one frame's misfit per column, then into col
    for c in range(w):
        col[c] = 0.0
    for j in range(n):
        for c in range(w):
            c32[c] = 0.0
        if rotate:
            ph = phase[j]
            for r in range(h):
                srow = Psi[j, r]
                for c in range(w):
                    srow[c] = srow[c] * ph
        for r in range(h):
            srow = Psi[j, r]
            frow = Phi[j, r]
            arow = a[j, r]
            for c in range(w):
                f = frow[c]
                fa = np.sqrt(f.real * f.real + f.imag * f.imag)
                m = fa - arow[c]
                c32[c] += m * m
                s = srow[c]
                srow[c] = complex(s.real + beta * f.real, s.imag + beta * f.imag)
        for c in range(w):
            col[c] += np.float64(c32[c])
    total = 0.0
    for c in range(w):
        total += col[c]
    return total


@_jit
def _scatter_object(psi, cpr, cpi, qpw, pos, scale, s_den, are, aim, den, col):  # pragma: no cover
    # are/aim[y0 + r, x0 + c] += rint(psi * conj(P) * scale) (real and imaginary planes);
    # with s_den > 0 also den[...] += qpw = rint(|P|^2 * s_den) (the same for every frame:
    # quantised once by the caller).  Returns the max |q| of the numerator (the
    # denominator's is max qpw, known without the frames).
    n, h, w = psi.shape
    for c in range(2 * w):
        col[c] = 0.0
    for j in range(n):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        for r in range(h):
            prow = psi[j, r]
            rre = are[y0 + r, x0:x0 + w]
            rim = aim[y0 + r, x0:x0 + w]
            rr = cpr[r]
            ri = cpi[r]
            for c in range(w):
                v = prow[c]
                vr = np.float64(v.real)
                vi = np.float64(v.imag)
                qr = np.rint((vr * rr[c] - vi * ri[c]) * scale)
                qi = np.rint((vr * ri[c] + vi * rr[c]) * scale)
                rre[c] += qr
                rim[c] += qi
                col[c] = max(col[c], max(abs(qr), abs(qi)))
            if s_den > 0:
                drow = den[y0 + r, x0:x0 + w]
                qrow = qpw[r]
                for c in range(w):
                    drow[c] += qrow[c]
    top = 0.0
    for c in range(w):
        top = max(top, col[c])
    return top


@_jit
def _quantised_power(obj, scale, out):  # pragma: no cover - compiled
    # out = rint(|obj|^2 scale), float64 arithmetic
    hh, ww = obj.shape
    for y in range(hh):
        orow = obj[y]
        qrow = out[y]
        for x in range(ww):
            o = orow[x]
            o_r = np.float64(o.real)
            o_i = np.float64(o.imag)
            qrow[x] = np.rint((o_r * o_r + o_i * o_i) * scale)


@_jit
def _probe_sums(psi, obj, qobj, pos, s_num, pre, pim, pden, col, c0, c1):  # pragma: no cover
    # pre/pim += rint(psi_j conj(O_j) s_num) on each row's span [c0, c1) (the probe
    # support's: the numerator is zero outside it); pden += qobj_j on the whole frame,
    # qobj = rint(|O|^2 s_den) quantised once by the caller (a frame's terms are its
    # window of it); returns the numerator's max |q| (the denominator's is bounded by
    # rint(max |O|^2 s_den))
    n, h, w = psi.shape
    for c in range(2 * w):
        col[c] = 0.0
    for j in range(n):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        for r in range(h):
            a0 = c0[r]
            a1 = c1[r]
            # row views from the span's start: loops from 0 (numba then vectorises them)
            prow = psi[j, r, a0:a1]
            orow = obj[y0 + r, x0 + a0:x0 + a1]
            rre = pre[r, a0:a1]
            rim = pim[r, a0:a1]
            cmax = col[a0:a1]
            for c in range(a1 - a0):
                v = prow[c]
                o = orow[c]
                vr = np.float64(v.real)
                vi = np.float64(v.imag)
                o_r = np.float64(o.real)
                o_i = np.float64(o.imag)
                qr = np.rint((vr * o_r + vi * o_i) * s_num)
                qi = np.rint((vi * o_r - vr * o_i) * s_num)
                rre[c] += qr
                rim[c] += qi
                cmax[c] = max(cmax[c], max(abs(qr), abs(qi)))
            drow = pden[r]
            qrow = qobj[y0 + r, x0:x0 + w]
            for c in range(w):
                drow[c] += qrow[c]
    top = 0.0
    for c in range(w):
        top = max(top, col[c])
    return top


@_jit
def _position_terms(wt, a, b, v):  # pragma: no cover - compiled
    # one pixel's weighted terms of the five position sums, float64: (w|a|^2, w|b|^2,
    # w Re(a* b), w Re(a* v), w Re(b* v))
    ar = np.float64(a.real)
    ai = np.float64(a.imag)
    br = np.float64(b.real)
    bi = np.float64(b.imag)
    vr = np.float64(v.real)
    vi = np.float64(v.imag)
    return (wt * (ar * ar + ai * ai), wt * (br * br + bi * bi), wt * (ar * br + ai * bi),
            wt * (ar * vr + ai * vi), wt * (br * vr + bi * vi))


@_jit
def _position_sums(chi, probe, gy, gx, den, pos, out):  # pragma: no cover - compiled
    # per frame j, with a = P grad_y O_j, b = P grad_x O_j (the object's gradient planes
    # gathered here) and the overlap weight w = 1 - |P|^2 / D_j (D: the object
    # denominator plane; positions.overlap_weight): out[j] = (<a,a>, <b,b>, Re<a,b>,
    # Re<a,chi_j>, Re<b,chi_j>) with <u,v> = sum w u* v, float64
    n, h, w = chi.shape
    for j in range(n):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        sac = 0.0
        sbc = 0.0
        for r in range(h):
            crow = chi[j, r]
            prow = probe[r]
            yrow = gy[y0 + r, x0:x0 + w]
            xrow = gx[y0 + r, x0:x0 + w]
            drow = den[y0 + r, x0:x0 + w]
            for c in range(w):
                p = prow[c]
                d = np.float64(drow[c])
                if d <= 0.0:
                    continue
                pr = np.float64(p.real)
                pi = np.float64(p.imag)
                wt = 1.0 - (pr * pr + pi * pi) / d
                if wt <= 0.0:
                    continue
                if wt > 1.0:
                    wt = 1.0
                a = p * yrow[c]
                b = p * xrow[c]
                v = crow[c]
                taa, tbb, tab, tac, tbc = _position_terms(wt, a, b, v)
                saa += taa
                sbb += tbb
                sab += tab
                sac += tac
                sbc += tbc
        out[j, 0] = saa
        out[j, 1] = sbb
        out[j, 2] = sab
        out[j, 3] = sac
        out[j, 4] = sbc


@_jit
def _finish_update_kernel(num_re, num_im, inv, den, d, obj, out):  # pragma: no cover
    # out = (num * inv + d obj) / (den + d), float64 arithmetic, complex64 result
    hh, ww = out.shape
    for y in range(hh):
        for x in range(ww):
            o = obj[y, x]
            scale = den[y, x] + d
            re = (num_re[y, x] * inv + d * np.float64(o.real)) / scale
            im = (num_im[y, x] * inv + d * np.float64(o.imag)) / scale
            out[y, x] = complex(np.float32(re), np.float32(im))


def finish_update(num_re, num_im, inv: float, den, d: float, obj, use_numba: bool = True):
    """The regularised update ``(num + d obj) / (den + d)`` as complex64, from a
    quantised numerator's planes ``num_re``, ``num_im`` times ``inv`` (float64) and the
    denominator ``den`` (float64); ``obj`` complex64, the current estimate.  One pass
    with numba; NumPy otherwise, with the same float64 operations (the same bits)."""
    out = np.empty(obj.shape, dtype=np.complex64)
    inv = float(inv)
    d = float(d)
    if use_numba and HAVE_NUMBA:
        _finish_update_kernel(num_re, num_im, inv, den, d, obj, out)
        return out
    scale = den + d
    out.real = (num_re * inv + d * obj.real.astype(np.float64)) / scale
    out.imag = (num_im * inv + d * obj.imag.astype(np.float64)) / scale
    return out


# --------------------------------------------------------------------------- chunk kernels
# The chunked pipeline (FusedOps.inverse_scatter / forward_update) works on CHUNK
# frames at a time in a buffer that stays in the core's cache; these are its steps.
# Their arithmetic is that of the whole-stack kernels above, operation for operation,
# so the pipeline gives the same bits.  Two things are skipped that add nothing:
# where the probe is zero (outside each row's span [c0, c1) of nonzero probe pixels,
# e.g. outside the probe support), the exit waves P O_j are zero and psi_j conj(P)
# adds exact zeros to the quantised object sums.  ``cs``: the orthonormal factor of
# an unscaled FFT (FFTW), multiplied in as FFTWStack does (``scaled``: done already).

def _span_mask(spans, w: int) -> np.ndarray:
    """0/1 float64 (H, W) mask of per-row spans ``(c0, c1)``."""
    c0, c1 = spans
    cols = np.arange(w)[None, :]
    return ((cols >= np.asarray(c0)[:, None]) & (cols < np.asarray(c1)[:, None])).astype(np.float64)


def probe_spans(probe):
    """Per row of ``probe`` (H, W): ``[c0, c1)``, the first and one past the last
    nonzero column (``c0 = c1 = 0`` for a zero row); int64 arrays."""
    nz = np.asarray(probe) != 0
    w = nz.shape[1]
    any_ = nz.any(axis=1)
    c0 = np.where(any_, nz.argmax(axis=1), 0).astype(np.int64)
    c1 = np.where(any_, w - nz[:, ::-1].argmax(axis=1), 0).astype(np.int64)
    return c0, c1


@_jit
def _gather_mul_spans(obj, probe, c0, c1, pos, out):  # pragma: no cover - compiled
    # _gather_mul, with zeros outside the probe's row spans
    n, h, w = out.shape
    zero = np.complex64(0)
    for j in range(n):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        for r in range(h):
            a0 = c0[r]
            a1 = c1[r]
            drow = out[j, r]
            # row views from the span's start: loops from 0 (numba then vectorises them)
            orow = obj[y0 + r, x0 + a0:x0 + a1]
            prow = probe[r, a0:a1]
            dspan = drow[a0:a1]
            tail = drow[a1:]
            for c in range(a0):
                drow[c] = zero
            for c in range(a1 - a0):
                dspan[c] = orow[c] * prow[c]
            for c in range(w - a1):
                tail[c] = zero


@_jit
def _project_chunk(src, buf, m, a):  # pragma: no cover - compiled
    # buf[:m] <- a * src / (|src| + 1e-12): Fourier.project's modulus projection of src[:m]
    # into the chunk buffer
    h, w = buf.shape[1], buf.shape[2]
    tiny = np.float32(1e-12)
    for j in range(m):
        for r in range(h):
            srow = src[j, r]
            brow = buf[j, r]
            arow = a[j, r]
            for c in range(w):
                v = srow[c]
                scale = arow[c] / (np.float32(np.sqrt(v.real * v.real + v.imag * v.imag)) + tiny)
                brow[c] = v * scale


@_jit
def _central_differences(obj, gy, gx):  # pragma: no cover - compiled
    # gy = (O[y+1] - O[y-1]) / 2, gx = (O[:, x+1] - O[:, x-1]) / 2, circular (as np.roll)
    ho, wo = obj.shape
    half = np.float32(0.5)
    for y in range(ho):
        up = obj[y + 1 if y + 1 < ho else 0]
        down = obj[y - 1 if y >= 1 else ho - 1]
        orow = obj[y]
        yrow = gy[y]
        xrow = gx[y]
        for x in range(wo):
            yrow[x] = half * (up[x] - down[x])
        for x in range(1, wo - 1):
            xrow[x] = half * (orow[x + 1] - orow[x - 1])
        xrow[0] = half * (orow[1 % wo] - orow[wo - 1])
        xrow[wo - 1] = half * (orow[0] - orow[wo - 2 if wo > 1 else 0])


@_jit
def _refinement_chunk(buf, m, cs, scaled, obj, gy, gx, probe, pw, inv_den, c0, c1, pos, acc,
                      out):  # pragma: no cover - compiled
    # per frame j of the chunk, with psi = buf[j] (* cs unless scaled: F^-1 Pi_F F(P O_j)),
    # chi = psi - P O_j, the object's central differences gy, gx (_central_differences),
    # a = P gy, b = P gx and the overlap weight w = 1 - |P|^2 / den clipped to [0, 1]
    # (pw = |P|^2, inv_den = 1 / den, 0 where den is 0: there P is 0 for every frame, so
    # a and b are): out[j] = the five weighted sums of _position_sums, on the probe's row
    # spans [c0, c1) (P is 0 elsewhere).  The sums run per column in acc (5, W) and the
    # columns are added at the frame's end: each lane of the row loop is then
    # independent, so it vectorises without reassociating any sum.
    h, w = buf.shape[1], buf.shape[2]
    for j in range(m):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        for k in range(5):
            for c in range(w):
                acc[k, c] = 0.0
        for r in range(h):
            a0 = c0[r]
            a1 = c1[r]
            if a1 <= a0:
                continue
            y = y0 + r
            # row views from the span's start: loops from 0 (numba then vectorises them)
            brow = buf[j, r, a0:a1]
            if not scaled:
                for c in range(a1 - a0):
                    brow[c] = brow[c] * cs
            orow = obj[y, x0 + a0:x0 + a1]
            yrow = gy[y, x0 + a0:x0 + a1]
            xrow = gx[y, x0 + a0:x0 + a1]
            dens = inv_den[y, x0 + a0:x0 + a1]
            wrow = pw[r, a0:a1]
            prow = probe[r, a0:a1]
            s0 = acc[0, a0:a1]
            s1 = acc[1, a0:a1]
            s2 = acc[2, a0:a1]
            s3 = acc[3, a0:a1]
            s4 = acc[4, a0:a1]
            for c in range(a1 - a0):
                p = prow[c]
                wt = min(max(1.0 - wrow[c] * dens[c], 0.0), 1.0)
                v = brow[c] - p * orow[c]
                taa, tbb, tab, tac, tbc = _position_terms(wt, p * yrow[c], p * xrow[c], v)
                s0[c] += taa
                s1[c] += tbb
                s2[c] += tab
                s3[c] += tac
                s4[c] += tbc
        for k in range(5):
            total = 0.0
            for c in range(w):
                total += acc[k, c]
            out[j, k] = total


@_jit
def _scatter_chunk(buf, m, cs, scaled, cpr, cpi, qpw, c0, c1, pos, scale, s_den, are, aim,
                   den, col, store, kept, k0, k1):  # pragma: no cover - compiled
    # buf[:m] *= cs (unless scaled); store: kept[:m] <- buf[:m] on the row spans
    # [k0, k1) (where the probe sums read them); then _scatter_object on the probe's
    # row spans [c0, c1)
    h, w = buf.shape[1], buf.shape[2]
    for c in range(w):
        col[c] = 0.0
    for j in range(m):
        y0 = pos[j, 0]
        x0 = pos[j, 1]
        for r in range(h):
            prow = buf[j, r]
            if not scaled:
                for c in range(w):
                    prow[c] = prow[c] * cs
            if store:
                b0 = k0[r]
                krow = kept[j, r, b0:k1[r]]
                brow = prow[b0:k1[r]]
                for c in range(k1[r] - b0):
                    krow[c] = brow[c]
            a0 = c0[r]
            a1 = c1[r]
            # row views from the span's start: loops from 0 (numba then vectorises them)
            vrow = prow[a0:a1]
            rre = are[y0 + r, x0 + a0:x0 + a1]
            rim = aim[y0 + r, x0 + a0:x0 + a1]
            rr = cpr[r, a0:a1]
            ri = cpi[r, a0:a1]
            cmax = col[a0:a1]
            for c in range(a1 - a0):
                v = vrow[c]
                vr = np.float64(v.real)
                vi = np.float64(v.imag)
                qr = np.rint((vr * rr[c] - vi * ri[c]) * scale)
                qi = np.rint((vr * ri[c] + vi * rr[c]) * scale)
                rre[c] += qr
                rim[c] += qi
                cmax[c] = max(cmax[c], max(abs(qr), abs(qi)))
            if s_den > 0:
                drow = den[y0 + r, x0 + a0:x0 + a1]
                qrow = qpw[r, a0:a1]
                for c in range(a1 - a0):
                    drow[c] += qrow[c]
    top = 0.0
    for c in range(w):
        top = max(top, col[c])
    return top


@_jit
def _raar_z(Psi, a, buf):  # pragma: no cover - compiled
    # buf[:n] = 2 Pi_F Psi - Psi (raar_pre's work), Psi unchanged
    n, h, w = Psi.shape
    two = np.float32(2.0)
    for j in range(n):
        for r in range(h):
            srow = Psi[j, r]
            arow = a[j, r]
            brow = buf[j, r]
            for c in range(w):
                s = srow[c]
                k = arow[c] / (np.sqrt(s.real * s.real + s.imag * s.imag) + _EPS)
                yr = k * s.real
                yi = k * s.imag
                brow[c] = complex(two * yr - s.real, two * yi - s.imag)


@_jit
def _scale_and_keep_row(frow, cs, scaled, keep, kept, j, r):  # pragma: no cover - compiled
    # a row of F(P O_j) from the chunk FFT: times cs (unless the FFT scaled it), and
    # copied to kept[j, r] when the refinement keeps it
    if not scaled:
        for c in range(frow.shape[0]):
            frow[c] = frow[c] * cs
    if keep:
        krow = kept[j, r]
        for c in range(frow.shape[0]):
            krow[c] = frow[c]


@_jit
def _dm_chunk(Psi, Phi, cs, scaled, a, beta, col, phase, rotate, keep,
              kept):  # pragma: no cover - compiled
    # _dm_update on n frames of Phi * cs (unless scaled), without its work copy and
    # without zeroing col (the caller sums col over a thread's chunks in order);
    # keep: kept[:n] <- Phi * cs.  The update reads and writes float32 views (real,
    # imaginary, ...): numba vectorises that loop better than one over complex64, with
    # the same arithmetic (the phase product is numba's complex multiply, written out).
    n, h, w = Psi.shape
    two = np.float32(2.0)
    sv = Psi.view(np.float32)
    c32 = np.empty(w, np.float32)   # one frame's misfit per column, then into col
    fv = Phi.view(np.float32)
    for j in range(n):
        pr = phase[j].real
        pi = phase[j].imag
        for c in range(w):
            c32[c] = 0.0
        for r in range(h):
            _scale_and_keep_row(Phi[j, r], cs, scaled, keep, kept, j, r)
            srow = sv[j, r]
            frow = fv[j, r]
            arow = a[j, r]
            for c in range(w):
                fr = frow[2 * c]
                fi = frow[2 * c + 1]
                sr = srow[2 * c]
                si = srow[2 * c + 1]
                if rotate:
                    ur = sr * pr - si * pi
                    si = sr * pi + si * pr
                    sr = ur
                fa = np.sqrt(fr * fr + fi * fi)
                m = fa - arow[c]
                c32[c] += m * m
                zr = two * fr - sr
                zi = two * fi - si
                k = arow[c] / (np.sqrt(zr * zr + zi * zi) + _EPS)
                srow[2 * c] = sr + beta * (k * zr - fr)
                srow[2 * c + 1] = si + beta * (k * zi - fi)
        for c in range(w):
            col[c] += np.float64(c32[c])


@_jit
def _raar_chunk(Psi, Phi, cs, scaled, a, beta, col, phase, rotate, keep, kept,
                pre):  # pragma: no cover - compiled
    # (pre: raar_pre's Psi part, beta Psi + (1 - 2 beta) Pi_F Psi), then raar_post,
    # on n frames; Phi, cs, col, keep as in _dm_chunk
    n, h, w = Psi.shape
    two = np.float32(2.0)
    g = np.float32(1.0) - two * beta
    c32 = np.empty(w, np.float32)   # one frame's misfit per column, then into col
    for j in range(n):
        pr = phase[j].real
        pi = phase[j].imag
        for c in range(w):
            c32[c] = 0.0
        for r in range(h):
            srow = Psi[j, r]
            frow = Phi[j, r]
            arow = a[j, r]
            _scale_and_keep_row(frow, cs, scaled, keep, kept, j, r)
            for c in range(w):
                s = srow[c]
                tr = s.real
                ti = s.imag
                if pre:
                    k = arow[c] / (np.sqrt(s.real * s.real + s.imag * s.imag) + _EPS)
                    yr = k * s.real
                    yi = k * s.imag
                    tr = beta * s.real + g * yr
                    ti = beta * s.imag + g * yi
                if rotate:   # complex64 product, as numba's complex multiply
                    ur = tr * pr - ti * pi
                    ti = tr * pi + ti * pr
                    tr = ur
                f = frow[c]
                fa = np.sqrt(f.real * f.real + f.imag * f.imag)
                m = fa - arow[c]
                c32[c] += m * m
                srow[c] = complex(tr + beta * f.real, ti + beta * f.imag)
        for c in range(w):
            col[c] += np.float64(c32[c])


@_jit
def _col_total(col, w):  # pragma: no cover - compiled
    total = 0.0
    for c in range(w):
        total += col[c]
    return total


# --------------------------------------------------------------------------- drivers
def _chunks(n: int, parts: int):
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class NumpyOps:
    """The fused steps as whole-stack NumPy operations (reference and fallback).

    Parameters
    ----------
    positions : ndarray, int64, shape (N, 2)
    frame_shape, object_shape : (int, int)
    threads : int
        Threads for the sparse scatter-add (SciPy releases the GIL).
    """

    name = "numpy"

    def __init__(self, positions, frame_shape, object_shape, threads: int = 1):
        import scipy.sparse

        self.pos = np.ascontiguousarray(positions, dtype=np.int64)
        self.frame_shape = tuple(frame_shape)
        self.object_shape = tuple(object_shape)
        n = len(self.pos)
        h, w = self.frame_shape
        oh, ow = self.object_shape
        base = (np.arange(h)[:, None] * ow + np.arange(w)[None, :]).astype(np.int64)
        start = self.pos[:, 0] * ow + self.pos[:, 1]
        flat = (start[:, None, None] + base[None]).reshape(-1)
        k = flat.size
        itype = np.int64 if max(k, oh * ow) >= 2**31 else np.int32
        # CSC: column k (one frame pixel) has a single 1 in row flat[k]; it multiplies
        # a (k, 2) block of (real, imag) columns.
        self._csc = scipy.sparse.csc_matrix(
            (np.ones(k, dtype=np.float64), flat.astype(itype), np.arange(k + 1, dtype=itype)),
            shape=(oh * ow, k))
        self.threads = max(1, min(int(threads), n))
        self._pool = None
        if self.threads > 1:
            edges = np.linspace(0, n, self.threads + 1).astype(int) * (h * w)
            self._parts = [(a, b, self._csc[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ptycho-scatter")
        from numpy.lib.stride_tricks import sliding_window_view

        self._window = lambda obj: sliding_window_view(obj, self.frame_shape)[
            self.pos[:, 0], self.pos[:, 1]]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def gather_mul(self, obj, probe, out):
        np.multiply(self._window(obj), probe, out=out)
        return out

    def position_sums(self, chi, probe, grad_y, grad_x, den) -> np.ndarray:
        """Per frame, with ``a = P grad_y O_j``, ``b = P grad_x O_j`` and the overlap weight
        from the object denominator plane ``den``: ``(<a,a>, <b,b>, Re<a,b>, Re<a,chi_j>,
        Re<b,chi_j>)``, float64 (N, 5) (position refinement,
        :func:`sparkmpi.ptycho.positions.position_sums`)."""
        from .positions import position_sums

        return position_sums(probe, self._window(grad_y), self._window(grad_x), chi, np,
                             den=self._window(den))

    def dm_update(self, Psi, Phi, a, beta: float, work, phase=None) -> float:
        """Misfit ``sum (|Phi| - a)^2``; ``Psi <- Psi + beta (Pi_F(2 Phi - Psi) - Phi)``;
        ``work <- Psi``.  ``phase`` (N,): first ``Psi_j <- Psi_j phase_j`` (a gauge change)."""
        if phase is not None:
            Psi *= phase[:, None, None]
        m = np.abs(Phi)
        m -= a
        flat = m.reshape(-1)
        err = float(np.dot(flat, flat))
        z = np.float32(2.0) * Phi
        z -= Psi
        np.abs(z, out=m)
        m += _EPS
        np.divide(a, m, out=m)
        z *= m
        z -= Phi
        z *= np.float32(beta)
        Psi += z
        work[...] = Psi
        return err

    def raar_pre(self, Psi, a, beta: float, work) -> None:
        """``Y = Pi_F Psi``; ``work <- 2 Y - Psi``; ``Psi <- beta Psi + (1 - 2 beta) Y``."""
        m = np.abs(Psi)
        m += _EPS
        np.divide(a, m, out=m)
        y = Psi * m
        np.multiply(y, np.float32(2.0), out=work)
        work -= Psi
        Psi *= np.float32(beta)
        y *= np.float32(1.0 - 2.0 * beta)
        Psi += y

    def raar_post(self, Psi, Phi, a, beta: float, phase=None) -> float:
        """Misfit of ``Phi``; ``Psi <- Psi phase + beta Phi``."""
        if phase is not None:
            Psi *= phase[:, None, None]
        m = np.abs(Phi)
        m -= a
        flat = m.reshape(-1)
        err = float(np.dot(flat, flat))
        Psi += np.float32(beta) * Phi
        return err

    def _sparse_sum(self, cols):
        if self._pool is None:
            return self._csc @ cols
        futures = [self._pool.submit(m.__matmul__, cols[a:b]) for a, b, m in self._parts[1:]]
        a, b, m = self._parts[0]
        total = m @ cols[a:b]
        for fut in futures:
            total += fut.result()
        return total

    def scatter_object(self, psi, probe, scale: float, acc, s_den: float = 0.0, den=None):
        """Quantised ``acc += sum_j shift(psi_j conj(P))`` and, when ``s_den > 0``,
        ``den += sum_j shift(|P|^2)``; returns the largest ``|q|`` of each.

        ``acc`` is a float64 pair of planes (real, imaginary), shape (2, Hy, Wx).
        """
        p = probe.astype(np.complex128)
        c = psi.astype(np.complex128)
        c *= np.conj(p)
        c *= scale
        np.rint(c.view(np.float64), out=c.view(np.float64))
        top = float(np.abs(c.view(np.float64)).max()) if c.size else 0.0
        total = self._sparse_sum(c.view(np.float64).reshape(-1, 2))
        acc += total.T.reshape(acc.shape)
        top_d = 0.0
        if s_den > 0:
            q = np.rint((p.real ** 2 + p.imag ** 2) * s_den)
            top_d = float(q.max())
            tiles = np.broadcast_to(q, (len(self.pos),) + q.shape).reshape(-1, 1)
            den += self._sparse_sum(np.ascontiguousarray(tiles)).reshape(den.shape)
        return top, top_d

    def probe_sums(self, psi, obj, s_num: float, s_den: float, pnum, pden, spans=None):
        """Quantised ``pnum += sum_j psi_j conj(O_j)`` (planes (2, H, W)) and
        ``pden += sum_j |O_j|^2``; returns the largest ``|q|`` of each.

        ``spans``: ``(c0, c1)`` per row (:func:`probe_spans` of the probe support): the
        numerator only there, zero elsewhere (the support zeroes the probe there, and
        ``psi`` need not be set there)."""
        frames = self._window(obj).astype(np.complex128)
        c = psi.astype(np.complex128) * np.conj(frames)
        if spans is not None:
            c *= _span_mask(spans, psi.shape[2])
        c *= s_num
        np.rint(c.view(np.float64), out=c.view(np.float64))
        d = frames.real ** 2 + frames.imag ** 2
        d *= s_den
        np.rint(d, out=d)
        total = c.sum(axis=0)
        pnum[0] += total.real
        pnum[1] += total.imag
        pden += d.sum(axis=0)
        return float(np.abs(c.view(np.float64)).max()), float(d.max())


class FusedOps(NumpyOps):
    """The same steps as :class:`NumpyOps`, as numba kernels over chunks of frames."""

    name = "numba"

    def __init__(self, positions, frame_shape, object_shape, threads: int = 1):
        if not HAVE_NUMBA:
            from .errors import PtychoInputError

            raise PtychoInputError("kernels='numba' needs the numba package (pip install numba); "
                                   "use kernels='auto' or 'numpy'")
        self.pos = np.ascontiguousarray(positions, dtype=np.int64)
        self.frame_shape = tuple(frame_shape)
        self.object_shape = tuple(object_shape)
        self.threads = max(1, min(int(threads), len(self.pos)))
        self._slices = _chunks(len(self.pos), self.threads)
        self._pool = (ThreadPoolExecutor(self.threads, thread_name_prefix="ptycho-fused")
                      if self.threads > 1 else None)
        w = self.frame_shape[1]
        self._cols = [np.zeros(2 * w, np.float64) for _ in self._slices]
        self._extra: dict = {}

    def _map(self, fn):
        """``fn(i, slice)`` for each chunk of frames (in threads when there are several)."""
        if self._pool is None:
            return [fn(0, self._slices[0])]
        futures = [self._pool.submit(fn, i, s) for i, s in enumerate(self._slices[1:], 1)]
        first = fn(0, self._slices[0])
        return [first] + [f.result() for f in futures]

    def gather_mul(self, obj, probe, out):
        self._map(lambda i, s: _gather_mul(obj, probe, self.pos[s], out[s]))
        return out

    def position_sums(self, chi, probe, grad_y, grad_x, den) -> np.ndarray:
        out = np.empty((len(self.pos), 5), dtype=np.float64)
        self._map(lambda i, s: _position_sums(chi[s], probe, grad_y, grad_x, den, self.pos[s],
                                              out[s]))
        return out

    def _phase(self, phase):
        if phase is None:
            return np.ones(len(self.pos), np.complex64), False
        return np.ascontiguousarray(phase, dtype=np.complex64), True

    def dm_update(self, Psi, Phi, a, beta: float, work, phase=None) -> float:
        b = np.float32(beta)
        ph, rotate = self._phase(phase)
        return sum(self._map(lambda i, s: _dm_update(Psi[s], Phi[s], a[s], b, work[s],
                                                      self._cols[i], ph[s], rotate)))

    def raar_pre(self, Psi, a, beta: float, work) -> None:
        b = np.float32(beta)
        self._map(lambda i, s: _raar_pre(Psi[s], a[s], b, work[s]))

    def raar_post(self, Psi, Phi, a, beta: float, phase=None) -> float:
        b = np.float32(beta)
        ph, rotate = self._phase(phase)
        return sum(self._map(lambda i, s: _raar_post(Psi[s], Phi[s], a[s], b, self._cols[i],
                                                      ph[s], rotate)))

    def _extras(self, shapes):
        """Per-thread accumulators for chunks 1.. (chunk 0 adds into the caller's)."""
        key = tuple(tuple(s) for s in shapes)
        if key not in self._extra:
            self._extra[key] = [[np.zeros(s, np.float64) for s in key] for _ in self._slices[1:]]
        return self._extra[key]

    def scatter_object(self, psi, probe, scale: float, acc, s_den: float = 0.0, den=None):
        p = probe.astype(np.complex128)
        cpr = np.ascontiguousarray(p.real)
        cpi = np.ascontiguousarray(-p.imag)
        s_den = float(s_den)
        if den is None:
            den = np.zeros(acc.shape[1:], np.float64)
            s_den = 0.0
        qpw = np.rint((cpr * cpr + cpi * cpi) * s_den)   # each frame's denominator terms
        top_d = float(qpw.max())
        if self._pool is None:
            return _scatter_object(psi, cpr, cpi, qpw, self.pos, float(scale), s_den, acc[0],
                                   acc[1], den, self._cols[0]), top_d
        extra = self._extras([acc.shape, den.shape])

        def one(i, s):
            da, dd = (acc, den) if i == 0 else extra[i - 1]
            if i:
                da.fill(0.0)
                dd.fill(0.0)
            return _scatter_object(psi[s], cpr, cpi, qpw, self.pos[s], float(scale), s_den,
                                   da[0], da[1], dd, self._cols[i])

        tops = self._map(one)
        for da, dd in extra:
            acc += da   # integer-valued: exact in any order
            if s_den > 0:
                den += dd
        return max(tops), top_d

    def probe_sums(self, psi, obj, s_num: float, s_den: float, pnum, pden, spans=None):
        # a bound on |O_j|^2 over the whole object: the same on every rank
        top_d = float(np.rint(float((obj.real ** 2 + obj.imag ** 2).max()) * s_den))
        h, w = self.frame_shape
        c0, c1 = spans if spans is not None else (np.zeros(h, np.int64), np.full(h, w, np.int64))
        qobj = np.empty(obj.shape, np.float64)
        _quantised_power(obj, float(s_den), qobj)
        if self._pool is None:
            return _probe_sums(psi, obj, qobj, self.pos, float(s_num), pnum[0], pnum[1],
                               pden, self._cols[0], c0, c1), top_d
        extra = self._extras([pnum.shape, pden.shape])

        def one(i, s):
            dn, dd = (pnum, pden) if i == 0 else extra[i - 1]
            if i:
                dn.fill(0.0)
                dd.fill(0.0)
            return _probe_sums(psi[s], obj, qobj, self.pos[s], float(s_num), dn[0],
                               dn[1], dd, self._cols[i], c0, c1)

        tops = self._map(one)
        for dn, dd in extra:
            pnum += dn
            pden += dd
        return max(tops), top_d


    # ---- the chunked pipeline: CHUNK frames through several steps while in cache
    def _chunk_starts(self, s):
        return range(s.start, s.stop, CHUNK)

    def gather_mul_at(self, obj, probe, positions, out):
        """``out_j = P O_j`` at other whole-pixel ``positions`` (M, 2) (refined frames)."""
        _gather_mul(obj, probe, np.ascontiguousarray(positions, dtype=np.int64), out)
        return out

    def refinement_sums(self, phi, a, transforms, obj, probe, den) -> np.ndarray:
        """Position refinement's (N, 5) sums (:meth:`position_sums`) per chunk of frames from
        ``phi = F(P O_j)`` (read only): its modulus projection and inverse FFT in the chunk
        buffer, then ``chi_j`` and the object's gradient computed where they are summed (no
        stack-sized intermediate)."""
        out = np.empty((len(self.pos), 5), dtype=np.float64)
        c0, c1 = probe_spans(probe)
        den = np.asarray(den, dtype=np.float64)
        inv_den = np.zeros(den.shape, np.float64)
        np.divide(1.0, den, out=inv_den, where=den > 0)
        p = probe.astype(np.complex128)
        pw = np.ascontiguousarray(p.real * p.real + p.imag * p.imag)
        grad_y = np.empty_like(obj)
        grad_x = np.empty_like(obj)
        _central_differences(obj, grad_y, grad_x)

        def one(i, sl):
            fft = transforms[i]
            buf = fft.buffer
            cs, scaled = (np.complex64(1), True) if fft.scale is None else (fft.scale, False)
            acc = np.empty((5, buf.shape[2]), np.float64)
            for j0 in self._chunk_starts(sl):
                j1 = min(j0 + CHUNK, sl.stop)
                m = j1 - j0
                _project_chunk(phi[j0:j1], buf, m, a[j0:j1])
                fft.inverse()
                _refinement_chunk(buf, m, cs, scaled, obj, grad_y, grad_x, probe, pw, inv_den,
                                  c0, c1, self.pos[j0:j1], acc, out[j0:j1])

        self._map(one)
        return out

    def inverse_scatter(self, kind: str, Psi, a, beta: float, transforms, probe, scale: float,
                        acc, s_den: float = 0.0, den=None, store=None, store_spans=None):
        """Per chunk of frames: the real-space waves of this step (``kind="dm"``: ``psi =
        F^-1 Psi``; ``"raar"``: ``F^-1 (2 Pi_F Psi - Psi)``), scatter-added as
        :meth:`scatter_object` does; ``store``: also kept there (the probe update
        reads them), on the rows' ``store_spans`` ``(c0, c1)`` only (None: all).
        ``Psi`` is not changed, so a second call gives the same sums.
        ``transforms``: one chunk FFT per thread (:mod:`sparkmpi.ptycho._fft`)."""
        p = probe.astype(np.complex128)
        cpr = np.ascontiguousarray(p.real)
        cpi = np.ascontiguousarray(-p.imag)
        s_den = float(s_den)
        if den is None:
            den = np.zeros(acc.shape[1:], np.float64)
            s_den = 0.0
        qpw = np.rint((cpr * cpr + cpi * cpi) * s_den)   # each frame's denominator terms
        top_d = float(qpw.max())
        extra = self._extras([acc.shape, den.shape]) if self._pool is not None else []
        scale = float(scale)
        c0, c1 = probe_spans(probe)
        storing = store is not None
        kept = store if storing else Psi
        h, w = self.frame_shape
        k0, k1 = (store_spans if store_spans is not None
                  else (np.zeros(h, np.int64), np.full(h, w, np.int64)))

        def one(i, sl):
            da, dd = (acc, den) if i == 0 else extra[i - 1]
            if i:
                da.fill(0.0)
                dd.fill(0.0)
            fft = transforms[i]
            buf = fft.buffer
            cs, scaled = (np.complex64(1), True) if fft.scale is None else (fft.scale, False)
            top = 0.0
            for j0 in self._chunk_starts(sl):
                j1 = min(j0 + CHUNK, sl.stop)
                m = j1 - j0
                if kind == "dm":
                    buf[:m] = Psi[j0:j1]
                else:
                    _raar_z(Psi[j0:j1], a[j0:j1], buf)
                fft.inverse()
                top = max(top, _scatter_chunk(buf, m, cs, scaled, cpr, cpi, qpw, c0, c1,
                                              self.pos[j0:j1], scale, s_den, da[0], da[1], dd,
                                              self._cols[i], storing, kept[j0:j1], k0, k1))
            return top

        tops = self._map(one)
        for da, dd in extra:
            acc += da   # integer-valued: exact in any order
            if s_den > 0:
                den += dd
        return max(tops), top_d

    def forward_update(self, kind: str, obj, probe, Psi, a, beta: float, transforms,
                       phase=None, keep=None, pre: bool = True) -> float:
        """Per chunk of frames: ``Phi = F(P O_j)``, then the step's update of ``Psi``
        (``kind="dm"``: as :meth:`dm_update`, less its copy; ``"raar"``: :meth:`raar_pre`'s
        part on ``Psi`` unless ``pre`` is False (done already), then :meth:`raar_post`'s);
        ``keep``: ``Phi`` also stored there.  Returns the misfit, summed as the
        whole-stack kernels sum it."""
        b = np.float32(beta)
        ph, rotate = self._phase(phase)
        w = self.frame_shape[1]
        keeping = keep is not None
        kept = keep if keeping else Psi
        if kind == "dm":
            kernel = _dm_chunk
        else:
            def kernel(*args):
                return _raar_chunk(*args, bool(pre))

        c0, c1 = probe_spans(probe)

        def one(i, sl):
            fft = transforms[i]
            buf = fft.buffer
            cs, scaled = (np.complex64(1), True) if fft.scale is None else (fft.scale, False)
            col = self._cols[i]
            col[:w] = 0.0
            for j0 in self._chunk_starts(sl):
                j1 = min(j0 + CHUNK, sl.stop)
                m = j1 - j0
                phi = buf[:m]
                _gather_mul_spans(obj, probe, c0, c1, self.pos[j0:j1], phi)
                fft.forward()
                kernel(Psi[j0:j1], phi, cs, scaled, a[j0:j1], b, col, ph[j0:j1], rotate,
                       keeping, kept[j0:j1])
            return _col_total(col, w)

        return sum(self._map(one))


def make_ops(kernels: str, positions, frame_shape, object_shape, threads: int = 1):
    """:class:`FusedOps` (``"numba"``, or ``"auto"`` with numba installed) or :class:`NumpyOps`."""
    if kernels not in KERNELS or kernels == "generic":
        raise InvalidArgument(f"kernels must be one of {KERNELS[:3]}, got {kernels!r}")
    if kernels == "numba" or (kernels == "auto" and HAVE_NUMBA):
        return FusedOps(positions, frame_shape, object_shape, threads)
    return NumpyOps(positions, frame_shape, object_shape, threads)
