"""Parallel-beam system matrix for one slice, with exact intersection lengths.

Geometry
--------
A slice is an ``n x n`` grid of unit pixels centred on the rotation axis; the
image array is indexed ``image[row, col]`` with ``x = col - (n - 1) / 2`` and
``y = (n - 1) / 2 - row`` (rows go down, ``y`` goes up), so pixel ``(row, col)``
is column ``row * n + col`` of the matrix.  At tilt angle ``theta`` (degrees)
the detector has ``n_rays`` bins of unit width; ray ``k`` is the line

    x cos(theta) + y sin(theta) = t_k,   t_k = k - (n_rays - 1) / 2,

and matrix row ``a * n_rays + k`` (angle-major) holds the length of that line
inside every pixel it crosses, so ``A @ image.ravel()`` is the sinogram
``(n_angles, n_rays)`` of line integrals in pixel units.

The lengths are computed as in Siddon's method: the ray's parametric crossings
with every grid line, sorted, give segments that each lie inside one pixel.
The work is done for whole blocks of rays at once with NumPy (sorting the
crossings of each ray along an axis), never with a Python loop over rays.

References
----------
.. [1] R. L. Siddon, "Fast calculation of the exact radiological path for a
       three-dimensional CT array", Medical Physics 12(2), 252-255, 1985.
.. [2] A. C. Kak and M. Slaney, "Principles of Computerized Tomographic
       Imaging", IEEE Press, 1988, chapter 3.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp

from ..errors import InvalidArgument

__all__ = ["system_matrix", "cached_system_matrix", "clear_matrix_cache", "matrix_key"]

# Rays whose segment inside a pixel is shorter than this (in pixels) are
# treated as grazing a corner and dropped.
_MIN_LENGTH = 1e-6


def _check_angles(angles_deg) -> np.ndarray:
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.ndim != 1 or angles.size == 0:
        raise InvalidArgument(f"angles_deg must be a non-empty 1-D sequence of degrees, got shape {angles.shape}")
    if not np.all(np.isfinite(angles)):
        raise InvalidArgument("angles_deg must be finite numbers (degrees), got NaN or infinity")
    return angles


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def system_matrix(n: int, angles_deg, n_rays: int | None = None, dtype=np.float32,
                  block_angles: int = 8) -> sp.csr_matrix:
    """Build the parallel-beam system matrix of one ``n x n`` slice.

    Parameters
    ----------
    n : int
        Image side in pixels; the slice has ``n * n`` unknowns.
    angles_deg : sequence of float, shape (n_angles,)
        Tilt angles in degrees.
    n_rays : int, optional
        Detector bins per projection (unit spacing); default ``n``.
    dtype : numpy dtype, optional
        Dtype of the stored lengths (default float32; geometry is computed in
        float64).
    block_angles : int, optional
        Angles processed per vectorised block (bounds temporary memory to
        about ``block_angles * n_rays * 2 (n + 1) * 8`` bytes per array).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_angles * n_rays, n * n)
        Row ``a * n_rays + k`` is ray ``k`` of angle ``a``; entries are
        intersection lengths in pixel units, in the order the ray crosses the
        pixels (not sorted by column; nothing here needs that).

    Notes
    -----
    For a ray ``p(s) = t (cos, sin) + s (-sin, cos)`` the grid lines
    ``x = x_i`` and ``y = y_j`` are crossed at ``s = (x_i - p_x) / d_x`` and
    ``s = (y_j - p_y) / d_y``.  Those values, clipped to where the ray is
    inside the grid and sorted, split the ray into segments; a segment's
    length is the difference of consecutive values and its pixel is the one
    holding its midpoint [1]_.  An axis-parallel ray that runs exactly along a
    grid line is nudged into the pixel on the positive side.
    """
    n = _check_size("n", n)
    n_rays = n if n_rays is None else _check_size("n_rays", n_rays)
    block_angles = _check_size("block_angles", block_angles)
    angles = _check_angles(angles_deg)
    half = n / 2.0
    grid = np.arange(n + 1, dtype=np.float64) - half          # grid line positions
    t = np.arange(n_rays, dtype=np.float64) - (n_rays - 1) / 2.0

    rows_count = []
    cols_parts = []
    vals_parts = []
    for start in range(0, angles.size, block_angles):
        theta = np.deg2rad(angles[start:start + block_angles])
        c = np.cos(theta)
        s = np.sin(theta)
        # Snap tiny direction components to zero so axis-parallel rays are exact.
        c[np.abs(c) < 1e-12] = 0.0
        s[np.abs(s) < 1e-12] = 0.0
        # Ray start points (on the line through the origin) and directions.
        px = t[None, :] * c[:, None]                          # (b, r)
        py = t[None, :] * s[:, None]
        dx = np.broadcast_to(-s[:, None], px.shape)
        dy = np.broadcast_to(c[:, None], px.shape)
        # A ray exactly on a grid line would be ambiguous; nudge it inwards.
        on_x = (dx == 0) & np.isclose(np.abs(px - np.round(px + half) + half), 0.0, atol=1e-9)
        px = np.where(on_x, px + 1e-7, px)
        on_y = (dy == 0) & np.isclose(np.abs(py - np.round(py + half) + half), 0.0, atol=1e-9)
        py = np.where(on_y, py + 1e-7, py)

        with np.errstate(divide="ignore", invalid="ignore"):
            ax = (grid[None, None, :] - px[..., None]) / dx[..., None]   # (b, r, n+1)
            ay = (grid[None, None, :] - py[..., None]) / dy[..., None]
            # Parametric range where the ray is inside the square.
            ax_lo = np.minimum(ax[..., 0], ax[..., -1])
            ax_hi = np.maximum(ax[..., 0], ax[..., -1])
            ay_lo = np.minimum(ay[..., 0], ay[..., -1])
            ay_hi = np.maximum(ay[..., 0], ay[..., -1])
        # A zero direction component: inside for all s if the coordinate is
        # within the square, never otherwise.
        inside_x = (px > -half) & (px < half)
        inside_y = (py > -half) & (py < half)
        ax_lo = np.where(dx == 0, np.where(inside_x, -np.inf, np.inf), ax_lo)
        ax_hi = np.where(dx == 0, np.where(inside_x, np.inf, -np.inf), ax_hi)
        ay_lo = np.where(dy == 0, np.where(inside_y, -np.inf, np.inf), ay_lo)
        ay_hi = np.where(dy == 0, np.where(inside_y, np.inf, -np.inf), ay_hi)
        s_in = np.maximum(ax_lo, ay_lo)                      # (b, r)
        s_out = np.minimum(ax_hi, ay_hi)
        missing = ~(s_out > s_in)                            # rays that miss the square
        s_in = np.where(missing, 0.0, s_in)
        s_out = np.where(missing, 0.0, s_out)                # empty range: no segments
        # Crossings for axis-parallel rays are +-inf or NaN: clip them away.
        ax = np.where(np.isfinite(ax), ax, s_in[..., None])
        ay = np.where(np.isfinite(ay), ay, s_in[..., None])
        alphas = np.concatenate([ax, ay], axis=-1)
        np.clip(alphas, s_in[..., None], s_out[..., None], out=alphas)
        alphas.sort(axis=-1)
        lengths = np.diff(alphas, axis=-1)                   # (b, r, 2n+1)
        mid = 0.5 * (alphas[..., 1:] + alphas[..., :-1])
        mx = px[..., None] + mid * dx[..., None]
        my = py[..., None] + mid * dy[..., None]
        col = np.floor(mx + half).astype(np.int64)
        row = np.floor(half - my).astype(np.int64)
        keep = (lengths > _MIN_LENGTH) & (col >= 0) & (col < n) & (row >= 0) & (row < n)
        rows_count.append(keep.sum(axis=-1).ravel())
        cols_parts.append((row * n + col)[keep])
        vals_parts.append(lengths[keep].astype(dtype))

    counts = np.concatenate(rows_count)
    indptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    index_dtype = np.int32 if indptr[-1] < np.iinfo(np.int32).max and n * n < np.iinfo(np.int32).max else np.int64
    indices = np.concatenate(cols_parts).astype(index_dtype)
    data = np.concatenate(vals_parts)
    matrix = sp.csr_matrix((data, indices, indptr.astype(index_dtype)),
                           shape=(angles.size * n_rays, n * n))
    return matrix


def matrix_key(n: int, angles_deg, n_rays: int | None = None, dtype=np.float32) -> tuple:
    """Cache key of a system matrix: size, rays, dtype and angles (to 1e-9 degree)."""
    angles = _check_angles(angles_deg)
    return (int(n), int(n if n_rays is None else n_rays), np.dtype(dtype).str,
            tuple(np.round(angles, 9).tolist()))


_CACHE: "OrderedDict[tuple, sp.csr_matrix]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def cached_system_matrix(n: int, angles_deg, n_rays: int | None = None,
                         dtype=np.float32) -> sp.csr_matrix:
    """Return :func:`system_matrix` for these arguments, built once per process.

    The matrix is kept in a small per-process LRU cache (4 entries) keyed by
    :func:`matrix_key`, so a Spark Python worker that reconstructs several
    partitions of the same series builds it only once.  Treat the result as
    read-only.
    """
    key = matrix_key(n, angles_deg, n_rays, dtype)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    matrix = system_matrix(n, angles_deg, n_rays, dtype=dtype)
    with _CACHE_LOCK:
        _CACHE[key] = matrix
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return matrix


def clear_matrix_cache() -> None:
    """Empty this process's matrix cache (for cold-start timings and tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()
