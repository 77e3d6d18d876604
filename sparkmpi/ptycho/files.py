"""Scan files facilities write (CXI, HDF5) and results in HDF5.

:func:`read_scan` reads a CXI file (HDF5, the Coherent X-ray Imaging format
of Maia 2012, as ptychography beamlines write it) or the project's NPZ
(:mod:`sparkmpi.ptycho.simulate`), and returns a
:class:`~sparkmpi.ptycho.PtychoData`.  From a CXI file it reads:

``entry_1/data_1/data``                         (N, H, W) intensities, zero
                                                frequency at the frame centre
``entry_1/sample_1/geometry_1/translation``     (N, 3) or (N, 2) sample
                                                positions (x, y[, z]), metres
``entry_1/instrument_1/detector_1/distance``    sample-detector distance, m
``entry_1/instrument_1/detector_1/x_pixel_size`` detector pixel, m (and
                                                ``y_pixel_size``; either alone
                                                serves for both)
``entry_1/instrument_1/source_1/energy``        photon energy, J (CXI's unit;
                                                a value >= 1 is taken as eV)

Geometry (far field): the wavelength is ``lambda = h c / E`` and the pixel
of the reconstruction, for frames of ``H x W`` detector pixels of size
``p`` at distance ``z``, is ``dy = lambda z / (H p_y)``, ``dx = lambda z /
(W p_x)``.  A translation ``(x, y)`` becomes the frame's top-left offset
``(row, col) = sign * (y / dy, x / dx)``, shifted so the smallest row and
column are 0 and rounded to whole pixels (the engines' grid;
``refine_positions`` recovers the rest); ``translation_sign=-1`` for
files whose translation is the beam's rather than the sample's.  The object
is the positions' extent plus one frame.  Every missing dataset or
inconsistent shape raises before anything is reconstructed, naming it.

:func:`write_result_hdf5` writes a reconstruction (``/object``, ``/probe``,
``/errors``, ``/positions`` when known, ``/probe_modes`` (M, H, W) of a
mixed-state reconstruction, the summary as JSON in the
``summary`` attribute); :func:`write_cxi` writes a scan as a CXI file
(the test files, and a way to hand simulated scans to other codes).

h5py (PyPI) is imported only here, on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DataFormatError, FrameMismatchError, PtychoInputError

__all__ = ["CXI_PATHS", "pixel_size", "read_cxi", "read_scan", "write_cxi", "write_result_hdf5"]

PLANCK_EV_S = 4.135667696e-15
SPEED_OF_LIGHT = 299792458.0
ELECTRON_VOLT_J = 1.602176634e-19

CXI_PATHS = {
    "data": "entry_1/data_1/data",
    "translation": "entry_1/sample_1/geometry_1/translation",
    "distance": "entry_1/instrument_1/detector_1/distance",
    "x_pixel_size": "entry_1/instrument_1/detector_1/x_pixel_size",
    "y_pixel_size": "entry_1/instrument_1/detector_1/y_pixel_size",
    "energy": "entry_1/instrument_1/source_1/energy",
}


def _h5py():
    try:
        import h5py
    except ImportError as exc:   # pragma: no cover - h5py is a dependency
        raise DataFormatError("reading CXI/HDF5 files needs h5py (pip install h5py)") from exc
    return h5py


def pixel_size(energy_j: float, distance_m: float, detector_pixel_m: float, frame_pixels: int) -> float:
    """Reconstruction pixel (m): ``lambda z / (N p)`` with ``lambda = h c / E``."""
    for name, value in (("energy_j", energy_j), ("distance_m", distance_m),
                        ("detector_pixel_m", detector_pixel_m)):
        if not (np.isfinite(value) and value > 0):
            raise DataFormatError(f"{name} must be a positive finite number, got {value!r}")
    wavelength = PLANCK_EV_S * SPEED_OF_LIGHT / (energy_j / ELECTRON_VOLT_J)
    return wavelength * distance_m / (frame_pixels * detector_pixel_m)


def _scalar(f, key: str, path: Path) -> float:
    name = CXI_PATHS[key]
    if name not in f:
        raise DataFormatError(f"{str(path)!r}: missing dataset {name!r} ({key})")
    value = np.asarray(f[name][()], dtype=np.float64).reshape(-1)
    if value.size < 1 or not np.isfinite(value[0]) or value[0] <= 0:
        raise DataFormatError(f"{str(path)!r}: dataset {name!r} must hold a positive number, "
                              f"got {value[:3].tolist()}")
    return float(value[0])


def read_cxi(path, *, translation_sign: float = 1.0):
    """Read a CXI ptychography scan; see the module docstring for datasets and geometry.

    Returns
    -------
    PtychoData
        ``metadata`` holds the geometry (``energy_j``, ``distance_m``,
        ``detector_pixel_m``, ``pixel_size_m`` (y, x)), the fractional
        positions before rounding (``positions_px``) and the source file.

    Raises
    ------
    DataFormatError
        Not an HDF5 file, a dataset missing (named), a non-positive geometry value.
    FrameMismatchError
        Data not 3-D, or translation rows not matching the frames.
    """
    from .simulate import PtychoData

    h5py = _h5py()
    path = Path(path)
    if translation_sign not in (1, -1, 1.0, -1.0):
        raise PtychoInputError(f"translation_sign must be 1 or -1, got {translation_sign!r}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataFormatError(f"cannot read CXI file {str(path)!r}: {exc}") from exc
    with f:
        for key in ("data", "translation"):
            if CXI_PATHS[key] not in f:
                raise DataFormatError(f"{str(path)!r}: missing dataset {CXI_PATHS[key]!r} ({key})")
        data = f[CXI_PATHS["data"]]
        if data.ndim != 3:
            raise FrameMismatchError(f"{str(path)!r}: {CXI_PATHS['data']!r} must be (frames, rows, "
                                     f"cols), got shape {data.shape}")
        translation = np.asarray(f[CXI_PATHS["translation"]][()], dtype=np.float64)
        if translation.ndim != 2 or translation.shape[1] not in (2, 3) \
                or translation.shape[0] != data.shape[0]:
            raise FrameMismatchError(
                f"{str(path)!r}: {CXI_PATHS['translation']!r} has shape {translation.shape}; "
                f"expected ({data.shape[0]}, 3) or ({data.shape[0]}, 2), one (x, y[, z]) per frame "
                f"of {CXI_PATHS['data']!r} {data.shape}")
        if not np.isfinite(translation).all():
            raise DataFormatError(f"{str(path)!r}: {CXI_PATHS['translation']!r} holds NaN or "
                                  f"infinite values")
        distance = _scalar(f, "distance", path)
        energy = _scalar(f, "energy", path)
        have_x, have_y = CXI_PATHS["x_pixel_size"] in f, CXI_PATHS["y_pixel_size"] in f
        if not (have_x or have_y):
            raise DataFormatError(f"{str(path)!r}: missing dataset {CXI_PATHS['x_pixel_size']!r} "
                                  f"(and {CXI_PATHS['y_pixel_size']!r}): the detector pixel size")
        px = _scalar(f, "x_pixel_size" if have_x else "y_pixel_size", path)
        py = _scalar(f, "y_pixel_size" if have_y else "x_pixel_size", path)
        intensities = np.asarray(data[()], dtype=np.float32)
    if energy >= 1.0:   # written in eV, not CXI's joules
        energy = energy * ELECTRON_VOLT_J
    n, h, w = intensities.shape
    dy = pixel_size(energy, distance, py, h)
    dx = pixel_size(energy, distance, px, w)
    rows = translation_sign * translation[:, 1] / dy
    cols = translation_sign * translation[:, 0] / dx
    fractional = np.stack([rows - rows.min(), cols - cols.min()], axis=1)
    positions = np.rint(fractional).astype(np.int64)
    object_shape = (int(positions[:, 0].max()) + h, int(positions[:, 1].max()) + w)
    meta = {"source": str(path), "format_read": "cxi", "energy_j": energy,
            "distance_m": distance, "detector_pixel_m": [py, px], "pixel_size_m": [dy, dx],
            "translation_sign": float(translation_sign),
            "positions_px": fractional.tolist()}
    return PtychoData(intensities, positions, object_shape, metadata=meta)


def read_scan(path, **kwargs):
    """A scan from a CXI/HDF5 file (``.cxi``, ``.h5``, ``.hdf5``) or the project's NPZ.

    ``kwargs`` go to :func:`read_cxi`.  Raises :class:`DataFormatError` for
    another suffix or a file that is neither.
    """
    from .simulate import load

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".cxi", ".h5", ".hdf5", ".nxs"):
        return read_cxi(path, **kwargs)
    if suffix == ".npz":
        if kwargs:
            raise PtychoInputError(f"options {sorted(kwargs)} apply to CXI files only")
        return load(path)
    raise DataFormatError(f"{str(path)!r}: expected a .cxi/.h5/.hdf5 (CXI) or .npz scan file")


def write_cxi(path, data, *, energy_j: float, distance_m: float, detector_pixel_m: float) -> Path:
    """Write ``data`` (a :class:`~sparkmpi.ptycho.PtychoData`) as a CXI file; returns its path.

    Translations are ``positions * pixel`` metres (x from columns, y from
    rows, z = 0), the geometry :func:`read_cxi` inverts.
    """
    h5py = _h5py()
    path = Path(path)
    n, h, w = data.intensities.shape
    dy = pixel_size(energy_j, distance_m, detector_pixel_m, h)
    dx = pixel_size(energy_j, distance_m, detector_pixel_m, w)
    pos = np.asarray(data.positions, dtype=np.float64)
    translation = np.stack([pos[:, 1] * dx, pos[:, 0] * dy, np.zeros(n)], axis=1)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.attrs["cxi_version"] = 160
        f.create_dataset(CXI_PATHS["data"], data=np.asarray(data.intensities, np.float32),
                         chunks=(1, h, w))
        f.create_dataset(CXI_PATHS["translation"], data=translation)
        f[CXI_PATHS["distance"]] = float(distance_m)
        f[CXI_PATHS["x_pixel_size"]] = float(detector_pixel_m)
        f[CXI_PATHS["y_pixel_size"]] = float(detector_pixel_m)
        f[CXI_PATHS["energy"]] = float(energy_j)
    tmp.replace(path)
    return path


def write_result_hdf5(path, obj, probe, errors, *, positions=None, summary: dict | None = None,
                      probe_modes=None) -> Path:
    """Write a reconstruction to HDF5: ``/object``, ``/probe``, ``/errors``, ``/positions``
    (refined, (N, 2) top-left pixels, when given), ``/probe_modes`` ((M, H, W), every
    incoherent mode, when given), ``summary`` attribute (JSON)."""
    h5py = _h5py()
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("object", data=np.asarray(obj, dtype=np.complex64))
        f.create_dataset("probe", data=np.asarray(probe, dtype=np.complex64))
        f.create_dataset("errors", data=np.asarray(errors, dtype=np.float64))
        if positions is not None:
            f.create_dataset("positions", data=np.asarray(positions, dtype=np.float64))
        if probe_modes is not None:
            f.create_dataset("probe_modes", data=np.asarray(probe_modes, dtype=np.complex64))
        f.attrs["summary"] = json.dumps(summary or {}, sort_keys=True, default=str)
    tmp.replace(path)
    return path
