"""Slice reconstruction: ART (batched over slices), SIRT, FBP, and a reference ART.

Conventions
-----------
``sinograms`` has shape ``(n_slices, n_angles, n_rays)`` (one sinogram per
slice; a single ``(n_angles, n_rays)`` sinogram is accepted too) and holds
line integrals in pixel units.  Reconstructions have shape
``(n_slices, n, n)`` (or ``(n, n)``), indexed as in
:mod:`sparkmpi.tomo.projector`.  Internally the data of a block of slices is
laid out as ``B`` of shape ``(n_angles * n_rays, n_slices)`` and the volume as
``X`` of shape ``(n * n, n_slices)``, so one matrix row touches contiguous
runs of ``n_slices`` values and every update serves all slices at once.

References
----------
.. [1] R. Gordon, R. Bender and G. T. Herman, "Algebraic reconstruction
       techniques (ART) for three-dimensional electron microscopy and X-ray
       photography", J. Theor. Biol. 29, 471-481, 1970.
.. [2] P. Gilbert, "Iterative methods for the three-dimensional
       reconstruction of an object from projections", J. Theor. Biol. 36,
       105-117, 1972.
.. [3] A. C. Kak and M. Slaney, "Principles of Computerized Tomographic
       Imaging", IEEE Press, 1988, chapters 3 and 7.
.. [4] A. H. Andersen and A. C. Kak, "Simultaneous algebraic reconstruction
       technique (SART)", Ultrasonic Imaging 6, 81-94, 1984 (the row/column
       sum weights used in SIRT here).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..backend import get_backend
from .projector import cached_system_matrix
from ..errors import InvalidArgument

__all__ = ["art", "art_reference", "sirt", "sirt_projections_rank", "fbp", "rmse", "FILTERS", "ALGORITHMS"]

FILTERS = ("ramp", "hann")
ALGORITHMS = ("art", "sirt", "fbp")

ProgressFn = Callable[[int, int], None]


# ------------------------------------------------------------------ helpers
def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_relaxation(value, upper: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"relaxation must be a number, got {value!r}") from None
    if not (0.0 < value < upper):
        raise InvalidArgument(f"relaxation must be in (0, {upper:g}), got {value:g}")
    return value


def _prepare(sinograms, angles_deg, n, matrix, name: str = "sinograms"):
    """Validate inputs; return (B (M, S) float32, single, n, matrix, n_angles, n_rays)."""
    sino = np.asarray(sinograms)
    if sino.ndim not in (2, 3):
        raise InvalidArgument(f"{name} must have shape (n_slices, n_angles, n_rays) or (n_angles, n_rays), "
                         f"got {sino.shape}")
    single = sino.ndim == 2
    if single:
        sino = sino[None]
    if not np.issubdtype(sino.dtype, np.number) or np.iscomplexobj(sino):
        raise InvalidArgument(f"{name} must hold real numbers, got dtype {sino.dtype}")
    angles = np.asarray(angles_deg, dtype=np.float64)
    if angles.ndim != 1:
        raise InvalidArgument(f"angles_deg must be 1-D, got shape {angles.shape}")
    n_slices, n_angles, n_rays = sino.shape
    if angles.size != n_angles:
        raise InvalidArgument(f"angles_deg has {angles.size} angles but {name} has {n_angles} "
                         f"(axis 1 of shape {sino.shape})")
    if n_slices == 0 or n_rays == 0:
        raise InvalidArgument(f"{name} is empty: shape {sino.shape}")
    n = n_rays if n is None else _check_positive_int("n", n)
    if matrix is None:
        matrix = cached_system_matrix(n, angles, n_rays)
    elif matrix.shape != (n_angles * n_rays, n * n):
        raise InvalidArgument(f"matrix has shape {matrix.shape}; expected {(n_angles * n_rays, n * n)} "
                         f"for n={n}, {n_angles} angles and {n_rays} rays")
    b = np.ascontiguousarray(sino.transpose(1, 2, 0).reshape(n_angles * n_rays, n_slices),
                             dtype=np.float32)
    if not np.all(np.isfinite(b)):
        raise InvalidArgument(f"{name} contains NaN or infinite values")
    return b, single, n, matrix, n_angles, n_rays


def _initial(x0, n: int, n_slices: int, single: bool, dtype, xp=np):
    """Starting volume as X of shape (n*n, n_slices)."""
    if x0 is None:
        return xp.zeros((n * n, n_slices), dtype=dtype)
    x0 = np.asarray(x0)
    expected = (n, n) if single else (n_slices, n, n)
    if x0.shape != expected:
        raise InvalidArgument(f"x0 must have shape {expected}, got {x0.shape}")
    x = x0.reshape(1 if single else n_slices, n * n).T
    return xp.asarray(np.ascontiguousarray(x, dtype=dtype))


def _finish(x, n: int, single: bool):
    """X of shape (n*n, n_slices) -> volume (n_slices, n, n) or (n, n), C order."""
    vol = np.ascontiguousarray(np.asarray(x).T).reshape(-1, n, n)
    return vol[0] if single else vol


def rmse(estimate, truth) -> float:
    """Root-mean-square error between two arrays of the same shape."""
    a = np.asarray(estimate, dtype=np.float64)
    b = np.asarray(truth, dtype=np.float64)
    if a.shape != b.shape:
        raise InvalidArgument(f"estimate has shape {a.shape} but truth has shape {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ---------------------------------------------------------------------- ART
def art(sinograms, angles_deg, n: int | None = None, iterations: int = 1, relaxation: float = 1.0,
        x0=None, positivity: bool = False, matrix=None, dtype=np.float32,
        progress: ProgressFn | None = None):
    """Algebraic Reconstruction Technique (Kaczmarz), batched over slices.

    Parameters
    ----------
    sinograms : array_like, shape (n_slices, n_angles, n_rays) or (n_angles, n_rays)
        Line integrals in pixel units.
    angles_deg : array_like, shape (n_angles,)
        Tilt angles in degrees.
    n : int, optional
        Reconstruction side in pixels (default ``n_rays``).
    iterations : int
        Full sweeps over all rays.
    relaxation : float
        Relaxation factor ``beta`` in (0, 2).
    x0 : array_like, shape (n_slices, n, n) or (n, n), optional
        Starting estimate (warm start); default zeros.
    positivity : bool
        Clip negative values to zero after each sweep.
    matrix : scipy.sparse.csr_matrix, shape (n_angles * n_rays, n * n), optional
        System matrix; default the cached one for ``(n, angles_deg, n_rays)``.
    dtype : numpy dtype
        Working precision (float32 default, float64 for exact comparisons).
    progress : callable(done, total), optional
        Called with rows processed so far, about 100 times per sweep.

    Returns
    -------
    numpy.ndarray, shape (n_slices, n, n) or (n, n)

    Notes
    -----
    For each row ``a_i`` of the system matrix in turn, every slice ``s`` is
    updated by ``x_s += beta (b_is - a_i . x_s) / |a_i|^2 a_i`` [1]_.  The
    slices are independent, so with the volume stored as ``X[pixel, slice]``
    one row update is a gather of ``nnz_i`` contiguous rows of ``X``, a
    matrix-vector product, a rank-one update and a scatter: the Python loop
    runs over rays once, not once per slice, and gives the same result as
    :func:`art_reference` slice by slice (up to rounding).
    """
    iterations = _check_positive_int("iterations", iterations)
    relaxation = _check_relaxation(relaxation, 2.0)
    b, single, n, matrix, _, _ = _prepare(sinograms, angles_deg, n, matrix)
    dtype = np.dtype(dtype)
    b = b.astype(dtype, copy=False)
    x = _initial(x0, n, b.shape[1], single, dtype)
    indptr = matrix.indptr
    indices = matrix.indices
    data = matrix.data.astype(dtype, copy=False)
    norms = np.bincount(np.repeat(np.arange(matrix.shape[0]), np.diff(indptr)),
                        weights=data.astype(np.float64) ** 2, minlength=matrix.shape[0])
    rows = np.flatnonzero(norms > 0)
    scale = np.zeros(matrix.shape[0], dtype=dtype)
    scale[rows] = relaxation / norms[rows]
    total = iterations * rows.size
    step = max(1, rows.size // 100)
    done = 0
    for _ in range(iterations):
        for count, i in enumerate(rows):
            lo, hi = indptr[i], indptr[i + 1]
            idx = indices[lo:hi]
            w = data[lo:hi]
            block = x[idx]                                   # (nnz_i, n_slices)
            r = (b[i] - w @ block) * scale[i]                # (n_slices,)
            block += w[:, None] * r
            x[idx] = block
            if progress is not None and count % step == 0:
                progress(done + count, total)
        done += rows.size
        if positivity:
            np.maximum(x, 0, out=x)
    if progress is not None:
        progress(total, total)
    return _finish(x, n, single)


def art_reference(sinogram, angles_deg, n: int | None = None, iterations: int = 1,
                  relaxation: float = 1.0, matrix=None):
    """Straightforward one-slice Kaczmarz ART, for checking :func:`art`.

    Parameters
    ----------
    sinogram : array_like, shape (n_angles, n_rays)
        One slice's line integrals.
    angles_deg : array_like, shape (n_angles,)
    n, iterations, relaxation, matrix
        As in :func:`art`.

    Returns
    -------
    numpy.ndarray, float64, shape (n, n)

    Notes
    -----
    The textbook loop of [1]_ (and the paper's Fig. 12), on one slice in
    float64: for each ray ``i``, ``f += beta (b_i - a_i . f) / |a_i|^2 a_i``
    with the row taken from the sparse matrix.
    """
    iterations = _check_positive_int("iterations", iterations)
    relaxation = _check_relaxation(relaxation, 2.0)
    sino = np.asarray(sinogram)
    if sino.ndim != 2:
        raise InvalidArgument(f"sinogram must have shape (n_angles, n_rays), got {sino.shape}")
    b, _, n, matrix, _, _ = _prepare(sino, angles_deg, n, matrix, name="sinogram")
    b = b[:, 0].astype(np.float64)
    f = np.zeros(n * n, dtype=np.float64)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data.astype(np.float64)
    for _ in range(iterations):
        for i in range(matrix.shape[0]):
            lo, hi = indptr[i], indptr[i + 1]
            if lo == hi:
                continue
            row = data[lo:hi]
            cols = indices[lo:hi]
            norm = row @ row
            if norm == 0:
                continue
            f[cols] += relaxation * (b[i] - row @ f[cols]) / norm * row
    return f.reshape(n, n)


# --------------------------------------------------------------------- SIRT
def _to_backend(matrix, backend):
    """(A as CSC, A^T as CSR) on the backend; A^T @ y and A @ x both run row-wise fast."""
    at = matrix.T.tocsr()
    if backend.name == "cupy":
        import cupyx.scipy.sparse as csp

        at = csp.csr_matrix(at)
    return at.T, at


def _allreduce(comm, array, xp):
    """Sum ``array`` over ``comm`` in place (host buffers; copies through the CPU for CuPy)."""
    if comm is None:
        return array
    from mpi4py import MPI  # a comm implies mpi4py or a stand-in that accepts MPI.SUM

    host = np.ascontiguousarray(array if xp is np else xp.asnumpy(array))
    out = np.empty_like(host)
    comm.Allreduce(host, out, op=MPI.SUM)
    return out if xp is np else xp.asarray(out)


def sirt(sinograms, angles_deg, n: int | None = None, iterations: int = 100, relaxation: float = 1.0,
         x0=None, positivity: bool = False, matrix=None, comm=None, backend: str = "numpy",
         progress: ProgressFn | None = None):
    """Simultaneous Iterative Reconstruction Technique on a block of slices.

    Parameters
    ----------
    sinograms : array_like, shape (n_slices, n_angles, n_rays) or (n_angles, n_rays)
        Line integrals in pixel units.  With ``comm``, only this rank's angles.
    angles_deg : array_like, shape (n_angles,)
        Tilt angles in degrees of the projections given.
    n : int, optional
        Reconstruction side in pixels (default ``n_rays``).
    iterations : int
        Number of simultaneous updates.
    relaxation : float
        Step ``lambda`` in (0, 2).
    x0 : array_like, shape (n_slices, n, n) or (n, n), optional
        Warm start (e.g. an earlier result, or FBP); default zeros.
    positivity : bool
        Clip negative values to zero after every iteration.
    matrix : scipy.sparse matrix, shape (n_angles * n_rays, n * n), optional
        System matrix of the angles given; default the cached one.
    comm : mpi4py communicator, optional
        When given, each rank holds a disjoint subset of the projections (all
        slices); the column sums and back-projections are summed with
        ``comm.Allreduce`` each iteration, so every rank ends with the volume
        one process would compute from all projections.
    backend : {"numpy", "cupy", "auto"}
        Array backend (see :func:`sparkmpi.backend.get_backend`).
    progress : callable(done, total), optional
        Called after every iteration.

    Returns
    -------
    numpy.ndarray, float32, shape (n_slices, n, n) or (n, n)

    Notes
    -----
    ``x <- x + lambda C A^T R (b - A x)`` with ``R = diag(1 / row sums)`` and
    ``C = diag(1 / column sums)`` [2]_, [4]_.  All slices are updated together
    as one sparse-times-dense product ``A X`` with ``X`` of shape
    ``(n*n, n_slices)``.
    """
    iterations = _check_positive_int("iterations", iterations)
    relaxation = _check_relaxation(relaxation, 2.0)
    be = get_backend(backend)
    xp = be.xp
    b, single, n, matrix, _, _ = _prepare(sinograms, angles_deg, n, matrix)
    a_csc, a_t = _to_backend(matrix.astype(np.float32), be)
    row_sums = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    col_sums = np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()
    col_sums = _allreduce(comm, col_sums, np)
    inv_row = np.zeros_like(row_sums)
    inv_row[row_sums > 0] = 1.0 / row_sums[row_sums > 0]
    inv_col = np.zeros_like(col_sums)
    inv_col[col_sums > 0] = relaxation / col_sums[col_sums > 0]
    inv_row = xp.asarray(inv_row.astype(np.float32))[:, None]
    inv_col = xp.asarray(inv_col.astype(np.float32))[:, None]
    b = xp.asarray(b)
    x = _initial(x0, n, b.shape[1], single, np.float32, xp)
    for it in range(iterations):
        residual = b - a_csc @ x                          # (M, S)
        residual *= inv_row
        update = a_t @ residual                           # (P, S)
        update = _allreduce(comm, update, xp)
        update *= inv_col
        x += update
        if positivity:
            xp.maximum(x, 0, out=x)
        if progress is not None:
            progress(it + 1, iterations)
    return _finish(be.asnumpy(x), n, single)


def sirt_projections_rank(comm, sinogram_subset, angles_subset, n: int | None = None,
                          iterations: int = 100, relaxation: float = 1.0, positivity: bool = False,
                          x0=None, backend: str = "numpy", progress: ProgressFn | None = None):
    """One MPI rank's share of a projection-distributed SIRT reconstruction.

    Every rank calls this with its own, disjoint subset of the projections of
    the same slices; together the subsets must cover every projection once.
    All ranks return the same volume, equal (to rounding) to :func:`sirt` on
    all projections in one process.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or compatible
        Needs ``Allreduce(sendbuf, recvbuf, op=MPI.SUM)``, ``rank`` and
        ``size``.  ``None`` runs alone.
    sinogram_subset : array_like, shape (n_angles_rank, n_slices, n_rays)
        This rank's projections, in the TIFF-stack layout (one projection per
        angle); ``n_slices`` and ``n_rays`` must agree on all ranks.
    angles_subset : array_like, shape (n_angles_rank,)
        Their tilt angles in degrees.
    n, iterations, relaxation, positivity, x0, backend, progress
        As in :func:`sirt`.

    Returns
    -------
    numpy.ndarray, float32, shape (n_slices, n, n)
    """
    proj = np.asarray(sinogram_subset)
    if proj.ndim != 3:
        raise InvalidArgument(f"sinogram_subset must have shape (n_angles_rank, n_slices, n_rays), got {proj.shape}")
    angles = np.asarray(angles_subset, dtype=np.float64).ravel()
    if angles.size != proj.shape[0]:
        raise InvalidArgument(f"angles_subset has {angles.size} angles but sinogram_subset has "
                         f"{proj.shape[0]} projections")
    if comm is not None and comm.size > 1:
        shape = np.array([proj.shape[1], proj.shape[2], -1 if n is None else n], dtype=np.int64)
        low = np.empty_like(shape)
        high = np.empty_like(shape)
        from mpi4py import MPI

        comm.Allreduce(shape, low, op=MPI.MIN)
        comm.Allreduce(shape, high, op=MPI.MAX)
        if not np.array_equal(low, high):
            raise InvalidArgument(f"rank {comm.rank}: (n_slices, n_rays, n) = {tuple(shape)} differs between "
                             f"ranks (range {tuple(low)}..{tuple(high)})")
    if proj.shape[0] == 0:
        # A rank with no projections still takes part in every Allreduce.
        n_eff = proj.shape[2] if n is None else n
        matrix = _empty_matrix(n_eff, proj.shape[2])
        sino = np.zeros((proj.shape[1], 0, proj.shape[2]), dtype=np.float32)
        return _sirt_empty(comm, sino, matrix, n_eff, iterations, relaxation, positivity, x0, backend, progress)
    sino = proj.transpose(1, 0, 2)
    return sirt(sino, angles, n=n, iterations=iterations, relaxation=relaxation, x0=x0,
                positivity=positivity, comm=comm, backend=backend, progress=progress)


def _empty_matrix(n: int, n_rays: int):
    import scipy.sparse as sp

    return sp.csr_matrix((0, n * n), dtype=np.float32)


def _sirt_empty(comm, sino, matrix, n, iterations, relaxation, positivity, x0, backend, progress):
    """SIRT for a rank without projections: contributes zeros, follows the others."""
    iterations = _check_positive_int("iterations", iterations)
    relaxation = _check_relaxation(relaxation, 2.0)
    n_slices = sino.shape[0]
    col_sums = _allreduce(comm, np.zeros(n * n), np)
    inv_col = np.zeros_like(col_sums)
    inv_col[col_sums > 0] = relaxation / col_sums[col_sums > 0]
    inv_col = inv_col.astype(np.float32)[:, None]
    x = _initial(x0, n, n_slices, False, np.float32)
    zero = np.zeros_like(x)
    for it in range(iterations):
        update = _allreduce(comm, zero, np) * inv_col
        x += update
        if positivity:
            np.maximum(x, 0, out=x)
        if progress is not None:
            progress(it + 1, iterations)
    return _finish(x, n, False)


# ---------------------------------------------------------------------- FBP
def _filter_response(n_rays: int, filter_name: str, xp):
    """Frequency response of the discrete ramp filter (Kak & Slaney eq. 3.61), optional Hann."""
    size = max(64, int(2 ** np.ceil(np.log2(2 * n_rays))))
    k = np.arange(-(size // 2), size // 2)
    h = np.zeros(size, dtype=np.float64)
    h[k == 0] = 0.25
    odd = (k % 2) == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    response = np.real(np.fft.fft(np.fft.ifftshift(h)))      # zero-phase, length `size`
    if filter_name == "hann":
        freq = np.fft.fftfreq(size)                          # cycles per sample, |f| <= 0.5
        response *= 0.5 * (1.0 + np.cos(2.0 * np.pi * freq))
    return size, xp.asarray(response[: size // 2 + 1].astype(np.float32))


def _angle_weights(angles_deg: np.ndarray) -> np.ndarray:
    """Angular step (radians) of each projection: half the gap to each neighbour."""
    theta = np.deg2rad(angles_deg)
    if theta.size == 1:
        return np.array([np.pi])
    order = np.argsort(theta)
    t = theta[order]
    gaps = np.diff(t)
    w = np.empty_like(t)
    w[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
    w[0] = gaps[0]
    w[-1] = gaps[-1]
    out = np.empty_like(w)
    out[order] = w
    return out


def fbp(sinograms, angles_deg, n: int | None = None, filter: str = "ramp", matrix=None,
        backend: str = "numpy"):
    """Filtered back-projection for parallel-beam data, all slices at once.

    Parameters
    ----------
    sinograms : array_like, shape (n_slices, n_angles, n_rays) or (n_angles, n_rays)
        Line integrals in pixel units (unit detector spacing).
    angles_deg : array_like, shape (n_angles,)
        Tilt angles in degrees, any order (weighted by their spacing).
    n : int, optional
        Reconstruction side (default ``n_rays``).
    filter : {"ramp", "hann"}
        Ramp filter, or ramp times a Hann window (less noise, less detail).
    matrix : scipy.sparse matrix, optional
        System matrix, used transposed as the back-projector.
    backend : {"numpy", "cupy", "auto"}

    Returns
    -------
    numpy.ndarray, float32, shape (n_slices, n, n) or (n, n)

    Notes
    -----
    Each projection is convolved with the band-limited ramp filter
    ``h(0) = 1/4, h(k) = -1/(pi k)^2`` for odd ``k``, 0 for even ``k``
    (Kak & Slaney [3]_, eq. 3.61), by FFT on a zero-padded length, then
    back-projected with the transposed system matrix and weighted by each
    projection's angular step in radians.  With a limited tilt range the
    missing wedge is not recovered.
    """
    if filter not in FILTERS:
        raise InvalidArgument(f"filter must be one of {FILTERS}, got {filter!r}")
    be = get_backend(backend)
    xp = be.xp
    sino = np.asarray(sinograms)
    b, single, n, matrix, n_angles, n_rays = _prepare(sino, angles_deg, n, matrix)
    size, response = _filter_response(n_rays, filter, xp)
    weights = _angle_weights(np.asarray(angles_deg, dtype=np.float64)).astype(np.float32)
    # b is (A*R, S): view as (A, R, S) and filter along R.
    p = xp.asarray(b).reshape(n_angles, n_rays, -1)
    spectrum = be.fft.rfft(p, n=size, axis=1, **({"workers": be.fft_workers} if be.name == "numpy" else {}))
    spectrum *= response[None, :, None]
    q = be.fft.irfft(spectrum, n=size, axis=1,
                     **({"workers": be.fft_workers} if be.name == "numpy" else {}))[:, :n_rays, :]
    q = q * xp.asarray(weights)[:, None, None]
    q = xp.ascontiguousarray(q.reshape(n_angles * n_rays, -1), dtype=xp.float32)
    _, a_t = _to_backend(matrix.astype(np.float32), be)
    x = a_t @ q
    return _finish(be.asnumpy(x), n, single)
