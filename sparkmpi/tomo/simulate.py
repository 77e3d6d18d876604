"""Phantoms and their parallel-beam tilt series, so everything runs without downloads.

Volumes have shape ``(n_slices, n, n)``: axis 0 runs along the rotation axis
(the TIFF rows), axes 1 and 2 are a slice's rows and columns as in
:mod:`sparkmpi.tomo.projector`.  A tilt series has shape
``(n_angles, n_slices, n_rays)``, one projection per angle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import TiltSeries, validate_angles, write_tilt_series
from .projector import cached_system_matrix
from ..errors import InvalidArgument

__all__ = ["PHANTOMS", "default_angles", "shepp_logan_3d", "nanoparticles", "make_phantom",
           "project_volume", "simulate_tilt_series"]

PHANTOMS = ("shepp-logan", "nanoparticles")

# 3-D Shepp-Logan head: (value, semi-axes a b c, centre x0 y0 z0, rotation about z in degrees),
# in units of the half-width of the volume.  Geometry after Kak & Slaney (1988) table 3.1
# extended to 3-D; values are the high-contrast ("modified") intensities so the
# phantom lies in [0, 1].
_SHEPP_LOGAN_3D = (
    (1.0, 0.6900, 0.920, 0.810, 0.00, 0.0000, 0.00, 0.0),
    (-0.8, 0.6624, 0.874, 0.780, 0.00, -0.0184, 0.00, 0.0),
    (-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0000, 0.00, -18.0),
    (-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0000, 0.00, 18.0),
    (0.1, 0.2100, 0.250, 0.410, 0.00, 0.3500, -0.15, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.00, 0.1000, 0.25, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.00, -0.1000, 0.25, 0.0),
    (0.1, 0.0460, 0.023, 0.050, -0.08, -0.6050, 0.00, 0.0),
    (0.1, 0.0230, 0.023, 0.020, 0.00, -0.6060, 0.00, 0.0),
    (0.1, 0.0230, 0.046, 0.020, 0.06, -0.6050, 0.00, 0.0),
)


def _check_size(name: str, value, minimum: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgument(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def default_angles(n_angles: int = 74, max_angle: float = 73.0) -> np.ndarray:
    """Evenly spaced tilt angles ``-max_angle..+max_angle`` (degrees).

    The default, 74 angles over -73..+73, is the 2-degree series of the paper.
    """
    n_angles = _check_size("n_angles", n_angles, 1)
    if not 0 < max_angle <= 90:
        raise InvalidArgument(f"max_angle must be in (0, 90] degrees, got {max_angle}")
    if n_angles == 1:
        return np.zeros(1)
    return np.linspace(-max_angle, max_angle, n_angles)


def _grid(n: int, n_slices: int):
    """Voxel-centre coordinates in [-1, 1]: z (slice axis), y (up), x (right)."""
    half = n / 2.0
    x = (np.arange(n) - (n - 1) / 2.0) / half
    y = ((n - 1) / 2.0 - np.arange(n)) / half
    z = ((n_slices - 1) / 2.0 - np.arange(n_slices)) / (n_slices / 2.0)
    return z, y, x


def _add_ellipsoids(volume: np.ndarray, table) -> np.ndarray:
    n_slices, n, _ = volume.shape
    z, y, x = _grid(n, n_slices)
    yy, xx = np.meshgrid(y, x, indexing="ij")                 # (n, n)
    for value, a, b, c, x0, y0, z0, phi in table:
        cos, sin = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
        xr = (xx - x0) * cos + (yy - y0) * sin
        yr = -(xx - x0) * sin + (yy - y0) * cos
        inplane = (xr / a) ** 2 + (yr / b) ** 2                # (n, n)
        zs = np.flatnonzero(np.abs(z - z0) < c)
        for s in zs:
            inside = inplane <= 1.0 - ((z[s] - z0) / c) ** 2
            volume[s][inside] += value
    return volume


def shepp_logan_3d(n: int = 256, n_slices: int | None = None) -> np.ndarray:
    """The 3-D Shepp-Logan head phantom.

    Parameters
    ----------
    n : int
        Slice side in pixels.
    n_slices : int, optional
        Number of slices along the rotation axis (default ``n``).

    Returns
    -------
    numpy.ndarray, float32, shape (n_slices, n, n)
        Values in [0, 1]; the middle slice is close to the 2-D Shepp-Logan
        image (Kak & Slaney, 1988).
    """
    n = _check_size("n", n)
    n_slices = n if n_slices is None else _check_size("n_slices", n_slices, 1)
    volume = np.zeros((n_slices, n, n), dtype=np.float64)
    _add_ellipsoids(volume, _SHEPP_LOGAN_3D)
    return np.clip(volume, 0.0, None).astype(np.float32)


def nanoparticles(n: int = 256, n_slices: int | None = None, n_particles: int = 40,
                  seed: int = 0) -> np.ndarray:
    """A nanoparticle-like object: dense spheres and ellipsoids on a faint support.

    Parameters
    ----------
    n : int
        Slice side in pixels.
    n_slices : int, optional
        Slices along the rotation axis (default ``n``).
    n_particles : int
        Number of particles.
    seed : int
        Seed of the random placement (the result is reproducible).

    Returns
    -------
    numpy.ndarray, float32, shape (n_slices, n, n), values in [0, 1]
    """
    n = _check_size("n", n)
    n_slices = n if n_slices is None else _check_size("n_slices", n_slices, 1)
    n_particles = _check_size("n_particles", n_particles, 0)
    rng = np.random.default_rng(seed)
    table = [(0.15, 0.75, 0.75, 0.6, 0.0, 0.0, 0.0, 0.0)]    # carbon-like support
    for _ in range(n_particles):
        radius = rng.uniform(0.03, 0.12)
        aspect = rng.uniform(0.7, 1.3, size=2)
        centre = rng.uniform(-0.55, 0.55, size=3)
        table.append((rng.uniform(0.4, 0.85), radius, radius * aspect[0], radius * aspect[1],
                      centre[0], centre[1], centre[2] * 0.8, rng.uniform(0, 180)))
    volume = np.zeros((n_slices, n, n), dtype=np.float64)
    _add_ellipsoids(volume, table)
    return np.clip(volume, 0.0, 1.0).astype(np.float32)


def make_phantom(name: str, n: int = 256, n_slices: int | None = None, seed: int = 0) -> np.ndarray:
    """Phantom by name: ``"shepp-logan"`` or ``"nanoparticles"``."""
    if name == "shepp-logan":
        return shepp_logan_3d(n, n_slices)
    if name == "nanoparticles":
        return nanoparticles(n, n_slices, seed=seed)
    raise InvalidArgument(f"phantom must be one of {PHANTOMS}, got {name!r}")


def project_volume(volume, angles_deg, matrix=None) -> np.ndarray:
    """Parallel-beam projections of a volume about its axis 0.

    Parameters
    ----------
    volume : array_like, shape (n_slices, n, n)
    angles_deg : array_like, shape (n_angles,)
    matrix : scipy.sparse matrix, optional
        System matrix (default the cached one, ``n_rays = n``).

    Returns
    -------
    numpy.ndarray, float32, shape (n_angles, n_slices, n)
        Line integrals in pixel units.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or volume.shape[1] != volume.shape[2]:
        raise InvalidArgument(f"volume must have shape (n_slices, n, n), got {volume.shape}")
    n_slices, n, _ = volume.shape
    angles = np.asarray(angles_deg, dtype=np.float64)
    if matrix is None:
        matrix = cached_system_matrix(n, angles)
    x = np.ascontiguousarray(volume.reshape(n_slices, n * n).T)
    b = matrix.T.tocsr().T @ x                                 # (n_angles * n_rays, n_slices)
    n_rays = matrix.shape[0] // angles.size
    return np.ascontiguousarray(b.reshape(angles.size, n_rays, n_slices).transpose(0, 2, 1))


def simulate_tilt_series(size: int = 256, n_angles: int = 74, phantom: str = "shepp-logan",
                         angles_deg=None, noise: float = 0.0, seed: int = 0, out=None,
                         dtype: str = "uint16"):
    """Make a phantom and its tilt series; optionally write the TIFF and angles sidecar.

    Parameters
    ----------
    size : int
        Pixels per side (the phantom is ``size`` cubed).
    n_angles : int
        Number of projections (ignored when ``angles_deg`` is given); the
        angles default to :func:`default_angles`.
    phantom : {"shepp-logan", "nanoparticles"}
    angles_deg : array_like, optional
        Explicit tilt angles in degrees.
    noise : float
        Standard deviation of additive Gaussian noise, relative to the
        largest projection value (0 = none).
    seed : int
        Seed for the phantom placement and the noise.
    out : str or Path, optional
        Where to write the TIFF; ``<out>.angles.txt`` is written beside it.
    dtype : {"uint16", "float32"}
        Pixel type of the written TIFF.

    Returns
    -------
    (TiltSeries, numpy.ndarray)
        The series (values as stored and read back, when written) and the
        phantom volume, shape (size, size, size).
    """
    size = _check_size("size", size)
    angles = default_angles(n_angles) if angles_deg is None else np.asarray(angles_deg, dtype=np.float64)
    angles = validate_angles(angles, source="angles_deg")
    if noise < 0:
        raise InvalidArgument(f"noise must be >= 0, got {noise}")
    volume = make_phantom(phantom, size, seed=seed)
    projections = project_volume(volume, angles)
    if noise > 0:
        rng = np.random.default_rng(seed + 1)
        projections = projections + rng.normal(0.0, noise * float(projections.max()),
                                               projections.shape).astype(np.float32)
        projections = np.clip(projections, 0.0, None)
    if out is not None:
        from .io import read_tilt_series

        path = write_tilt_series(Path(out), projections, angles, dtype=dtype)
        return read_tilt_series(path), volume
    return TiltSeries(projections=projections.astype(np.float32), angles_deg=angles), volume
