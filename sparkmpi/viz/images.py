"""Pictures for the viewer as plain functions over arrays: colour maps, windows, PNG/SVG.

Nothing here touches the web server or VTK, so it is tested directly.  The
colour maps are given once, as control points, and used both for the 2-D
images (:func:`colorize`) and for VTK's colour transfer function (the app
reads :data:`COLORMAPS`).
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from ..errors import InvalidArgument

__all__ = ["COLORMAPS", "lut", "colorize", "window_range", "robust_range", "downsample",
           "png_data_url", "error_curve_svg", "svg_data_url", "phase_image"]

# name -> control points (x in 0..1, r, g, b in 0..1); viridis and inferno
# sampled at five points from the published matplotlib maps, cool-warm from
# K. Moreland, "Diverging Color Maps for Scientific Visualization" (2009).
COLORMAPS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "grey": ((0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)),
    "viridis": ((0.0, 0.267, 0.005, 0.329), (0.25, 0.229, 0.322, 0.546), (0.5, 0.128, 0.567, 0.551),
                (0.75, 0.369, 0.789, 0.383), (1.0, 0.993, 0.906, 0.144)),
    "inferno": ((0.0, 0.001, 0.000, 0.014), (0.25, 0.341, 0.062, 0.429), (0.5, 0.735, 0.216, 0.330),
                (0.75, 0.978, 0.557, 0.035), (1.0, 0.988, 0.998, 0.645)),
    "cool-warm": ((0.0, 0.230, 0.299, 0.754), (0.5, 0.865, 0.865, 0.865), (1.0, 0.706, 0.016, 0.150)),
}


def _check_cmap(cmap: str) -> str:
    if cmap not in COLORMAPS:
        raise InvalidArgument(f"cmap must be one of {sorted(COLORMAPS)}, got {cmap!r}")
    return cmap


def lut(cmap: str = "grey", n: int = 256) -> np.ndarray:
    """A colour look-up table, uint8 ``(n, 3)``, interpolated linearly between control points."""
    _check_cmap(cmap)
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise InvalidArgument(f"n must be an integer >= 2, got {n!r}")
    pts = np.asarray(COLORMAPS[cmap], dtype=np.float64)
    x = np.linspace(0.0, 1.0, int(n))
    rgb = np.stack([np.interp(x, pts[:, 0], pts[:, c]) for c in (1, 2, 3)], axis=1)
    return np.round(rgb * 255.0).astype(np.uint8)


def colorize(image, lo: float, hi: float, cmap: str = "grey") -> np.ndarray:
    """Map a real 2-D array to RGB: ``lo`` to the map's first colour, ``hi`` to its last.

    Parameters
    ----------
    image : array_like, real, (h, w)
    lo, hi : float
        Window in the image's units; values outside are clipped.  ``hi <= lo``
        gives the first colour everywhere.
    cmap : str
        A key of :data:`COLORMAPS`.

    Returns
    -------
    ndarray uint8 (h, w, 3)
    """
    img = np.asarray(image)
    if img.ndim != 2 or 0 in img.shape:
        raise InvalidArgument(f"image must be a non-empty 2-D array, got shape {img.shape}")
    if np.iscomplexobj(img) or not np.issubdtype(img.dtype, np.number):
        raise InvalidArgument(f"image must hold real numbers, got dtype {img.dtype}")
    table = lut(cmap)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.broadcast_to(table[0], img.shape + (3,)).copy()
    idx = (img.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    idx = np.nan_to_num(idx, nan=0.0)
    return table[np.clip(idx, 0, 255).astype(np.uint8)]


def window_range(data_lo: float, data_hi: float, level: float, width: float) -> tuple[float, float]:
    """Turn a window (``level`` centre, ``width``, both fractions of the data range) into values.

    Parameters
    ----------
    data_lo, data_hi : float
        The data's range (e.g. from :func:`robust_range`).
    level : float in [0, 1]
    width : float in (0, 2]

    Returns
    -------
    (lo, hi) : floats with ``lo < hi`` whenever ``data_hi > data_lo``.
    """
    if not 0.0 <= level <= 1.0:
        raise InvalidArgument(f"level must be in [0, 1], got {level!r}")
    if not 0.0 < width <= 2.0:
        raise InvalidArgument(f"width must be in (0, 2], got {width!r}")
    span = float(data_hi) - float(data_lo)
    centre = float(data_lo) + level * span
    return centre - 0.5 * width * span, centre + 0.5 * width * span


def robust_range(values, percentiles=(0.5, 99.5), max_samples: int = 1_000_000) -> tuple[float, float]:
    """The ``percentiles`` of the finite values, on an evenly strided sample of at most ``max_samples``.

    Falls back to min/max when the percentiles coincide; ``(0, 1)`` when
    nothing is finite.
    """
    arr = np.asarray(values).ravel()
    if arr.size == 0:
        raise InvalidArgument("values must not be empty")
    step = max(1, arr.size // max_samples)
    sample = arr[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def downsample(volume, max_side: int) -> tuple[np.ndarray, int]:
    """Block-average a volume by the smallest integer factor that brings every axis to ``<= max_side``.

    Returns
    -------
    (ndarray float32, int)
        The smaller volume (axes cropped to a multiple of the factor) and the factor.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise InvalidArgument(f"volume must be 3-D, got shape {vol.shape}")
    if not isinstance(max_side, (int, np.integer)) or max_side < 2:
        raise InvalidArgument(f"max_side must be an integer >= 2, got {max_side!r}")
    factor = max(1, math.ceil(max(vol.shape) / max_side))
    if factor == 1:
        return np.ascontiguousarray(vol, dtype=np.float32), 1
    nz, ny, nx = (max(1, s // factor) for s in vol.shape)
    out = np.zeros((nz, ny, nx), dtype=np.float32)
    for i in range(factor):  # a sum of strided views: much faster than reshape(...).mean(axes)
        for j in range(factor):
            for k in range(factor):
                out += vol[i: nz * factor: factor, j: ny * factor: factor, k: nx * factor: factor]
    out *= np.float32(1.0 / factor ** 3)
    return out, factor


def phase_image(obj, weight=None) -> np.ndarray:
    """Phase of a complex image with its global phase removed.

    The global phase is the angle of ``sum(obj * weight)``; ``weight``
    defaults to ``|obj|`` in the central half of the image, where a scan
    usually illuminates.
    """
    o = np.asarray(obj)
    if o.ndim != 2:
        raise InvalidArgument(f"obj must be 2-D, got shape {o.shape}")
    if weight is None:
        h, w = o.shape
        weight = np.zeros(o.shape, dtype=np.float32)
        weight[h // 4: h - h // 4 or h, w // 4: w - w // 4 or w] = 1.0
        weight = weight * np.abs(o)
    total = np.sum(o * weight)
    ref = np.angle(total) if abs(total) > 0 else 0.0
    return np.angle(o * np.exp(-1j * ref)).astype(np.float32)


def png_data_url(rgb) -> str:
    """Encode a uint8 grey ``(h, w)`` or RGB ``(h, w, 3)`` image as a ``data:image/png;base64`` URL."""
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise InvalidArgument(f"rgb must be uint8 (h, w) or (h, w, 3), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def svg_data_url(svg: str) -> str:
    """Wrap SVG markup as a ``data:image/svg+xml;base64`` URL (for an ``<img>``)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def error_curve_svg(errors, width: int = 480, height: int = 300,
                    title: str = "Fourier-modulus error per iteration") -> str:
    """Draw an error curve (one value per iteration) on a log axis, as SVG markup.

    Non-finite and non-positive values are skipped; with no usable value the
    plot says so.
    """
    errs = np.asarray(errors, dtype=np.float64).ravel()
    if width < 100 or height < 80:
        raise InvalidArgument(f"width and height must be at least 100 and 80 pixels, got {width}x{height}")
    left, right, top, bottom = 62, width - 14, 28, height - 36
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="13">{title}</text>',
             f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
             f'stroke="black"/>',
             f'<text x="{(left + right) // 2}" y="{height - 6}" text-anchor="middle">iteration</text>']
    good = np.flatnonzero(np.isfinite(errs) & (errs > 0))
    if good.size == 0:
        parts.append(f'<text x="{left + 10}" y="{top + 20}">no errors recorded yet</text></svg>')
        return "".join(parts)
    vals = errs[good]
    lmin = math.floor(math.log10(vals.min()))
    lmax = math.ceil(math.log10(vals.max()))
    if lmax == lmin:
        lmax += 1
    n = errs.size

    def x_of(i):
        return left + (right - left) * (i / max(n - 1, 1))

    def y_of(e):
        return bottom - (bottom - top) * (math.log10(e) - lmin) / (lmax - lmin)

    for dec in range(lmin, lmax + 1):
        y = y_of(10.0 ** dec)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">1e{dec}</text>')
    for k in range(5):
        i = round((n - 1) * k / 4)
        parts.append(f'<text x="{x_of(i):.1f}" y="{bottom + 16}" text-anchor="middle">{i + 1}</text>')
    points = " ".join(f"{x_of(i):.1f},{y_of(errs[i]):.1f}" for i in good)
    if good.size > 1:
        parts.append(f'<polyline points="{points}" fill="none" stroke="#c81e1e" stroke-width="2"/>')
    else:
        parts.append(f'<circle cx="{x_of(good[0]):.1f}" cy="{y_of(vals[0]):.1f}" r="3" fill="#c81e1e"/>')
    parts.append(f'<text x="{right}" y="18" text-anchor="end">last {vals[-1]:.3g} ({n} it.)</text>')
    parts.append("</svg>")
    return "".join(parts)
