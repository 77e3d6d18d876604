"""Tilt-series input: TIFF stacks with angle sidecars, and the TIFF -> Parquet ETL.

File formats
------------
Tilt series (TIFF)
    A multi-page TIFF, one page per projection, every page the same
    ``(n_slices, n_rays)`` shape: rows run along the rotation axis (so row
    ``s`` of every page is the sinogram of slice ``s``) and columns are the
    detector bins.  Pixel types: ``uint8``, ``uint16``, ``int16``, ``uint32``,
    ``float32`` or ``float64``.  If the first page's ImageDescription is a JSON
    object with a numeric ``"sparkmpi_scale"`` field (as written by
    :func:`write_tilt_series`), pixel values are multiplied by it on reading,
    so 16-bit counts come back as line integrals in pixel units; otherwise the
    values are used as they are.

Angles sidecar (``<stack>.angles.txt``)
    Plain text next to the stack, named after it with the ``.tif``/``.tiff``
    suffix replaced by ``.angles.txt`` (``series.tif`` ->
    ``series.angles.txt``).  One tilt angle in degrees per line, in page
    order; blank lines and text after ``#`` are ignored.  Angles must be
    finite, within [-90, 90] and strictly monotonic (increasing or
    decreasing), and there must be exactly one per page.

Sinograms (Parquet)
    One row per slice with columns ``slice`` (int32), ``n_angles`` (int32),
    ``n_rays`` (int32), ``dtype`` (string, a NumPy dtype such as ``<u2``),
    ``scale`` (float64) and ``data`` (binary: the ``(n_angles, n_rays)``
    sinogram in C order and that dtype).  The schema's key-value metadata
    holds ``sparkmpi.tomo.angles_deg`` (a JSON list) and
    ``sparkmpi.tomo.n_slices``.

Every reader validates the whole input (angles, page count, shapes, dtypes,
file length) before decoding any pixel data, and raises
:class:`TiltSeriesError` with a message naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, SparkMPIError

__all__ = [
    "TiltSeriesError",
    "TiltSeries",
    "SUPPORTED_DTYPES",
    "angles_sidecar_path",
    "read_angles_file",
    "write_angles_file",
    "validate_angles",
    "read_tilt_series",
    "write_tilt_series",
    "tiff_to_parquet",
    "read_parquet_sinograms",
    "parquet_metadata",
    "decode_sinogram_row",
]

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "float32", "float64")
_ANGLES_KEY = b"sparkmpi.tomo.angles_deg"
_SLICES_KEY = b"sparkmpi.tomo.n_slices"


class TiltSeriesError(SparkMPIError, ValueError):
    """A tilt-series file or its angles are unusable; the message says why."""


@dataclass
class TiltSeries:
    """A validated tilt series in memory.

    Attributes
    ----------
    projections : numpy.ndarray, float32, shape (n_angles, n_slices, n_rays)
        One projection per tilt angle, already multiplied by ``scale``.
    angles_deg : numpy.ndarray, float64, shape (n_angles,)
        Tilt angles in degrees.
    source : str
        Where the data came from (a path, or ``"memory"``).
    scale : float
        Factor applied to the stored pixel values.
    stored_dtype : str
        The pixel type in the file.
    """

    projections: np.ndarray
    angles_deg: np.ndarray
    source: str = "memory"
    scale: float = 1.0
    stored_dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    @property
    def n_angles(self) -> int:
        return int(self.projections.shape[0])

    @property
    def n_slices(self) -> int:
        return int(self.projections.shape[1])

    @property
    def n_rays(self) -> int:
        return int(self.projections.shape[2])

    def sinograms(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Sinograms of slices ``start:stop``, float32, shape (n, n_angles, n_rays)."""
        stop = self.n_slices if stop is None else stop
        return np.ascontiguousarray(self.projections[:, start:stop, :].transpose(1, 0, 2))


# --------------------------------------------------------------------- angles
def angles_sidecar_path(stack_path) -> Path:
    """The sidecar path for a stack: ``x.tif`` -> ``x.angles.txt``."""
    path = Path(stack_path)
    if path.suffix.lower() in (".tif", ".tiff", ".parquet"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".angles.txt")


def read_angles_file(path) -> np.ndarray:
    """Read tilt angles in degrees, one per line (``#`` comments, blank lines ignored).

    Returns
    -------
    numpy.ndarray, float64, shape (n_angles,)

    Raises
    ------
    TiltSeriesError
        If the file cannot be read or a line is not a number (names the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TiltSeriesError(f"cannot read angles file '{path}': {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TiltSeriesError(f"angles file '{path}' is not UTF-8 text") from exc
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise TiltSeriesError(f"angles file '{path}' line {number}: expected one angle in degrees, "
                                  f"got {item!r}") from None
    if not values:
        raise TiltSeriesError(f"angles file '{path}' holds no angles")
    return np.asarray(values, dtype=np.float64)


def write_angles_file(path, angles_deg) -> Path:
    """Write angles (degrees) one per line, with a header comment; returns the path."""
    angles = validate_angles(angles_deg)
    path = Path(path)
    lines = ["# tilt angles in degrees, one per projection, in page order"]
    lines += [repr(float(a)) for a in angles]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def validate_angles(angles_deg, n_projections: int | None = None, source: str = "angles") -> np.ndarray:
    """Check tilt angles and return them as float64.

    Parameters
    ----------
    angles_deg : sequence of float, shape (n_angles,)
        Angles in degrees.
    n_projections : int, optional
        The number of projections they must match.
    source : str
        Named in error messages (a file name, ``"--angles"``...).

    Raises
    ------
    TiltSeriesError
        On a count mismatch, a non-finite value, ``|angle| > 90`` or angles
        that are not strictly monotonic; the message names the offending
        position and value.
    """
    try:
        angles = np.asarray(angles_deg, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TiltSeriesError(f"{source}: angles must be numbers in degrees ({exc})") from None
    if angles.ndim != 1 or angles.size == 0:
        raise TiltSeriesError(f"{source}: expected a non-empty list of angles, got shape {angles.shape}")
    if n_projections is not None and angles.size != n_projections:
        raise TiltSeriesError(f"{source}: {angles.size} angles for {n_projections} projections "
                              f"(expected one angle per projection)")
    bad = np.flatnonzero(~np.isfinite(angles))
    if bad.size:
        raise TiltSeriesError(f"{source}: angle {bad[0]} is {angles[bad[0]]} (expected a finite number)")
    bad = np.flatnonzero(np.abs(angles) > 90.0)
    if bad.size:
        raise TiltSeriesError(f"{source}: angle {bad[0]} is {angles[bad[0]]:g} degrees, out of range "
                              f"(expected -90 <= angle <= 90)")
    if angles.size > 1:
        step = np.diff(angles)
        direction = 1.0 if step[0] > 0 else -1.0
        bad = np.flatnonzero(step * direction <= 0)
        if bad.size:
            i = bad[0]
            raise TiltSeriesError(f"{source}: angles are not strictly monotonic: angle {i} is "
                                  f"{angles[i]:g} and angle {i + 1} is {angles[i + 1]:g}")
    return angles


def _resolve_angles(path: Path, angles, angles_file, n_projections: int) -> np.ndarray:
    if angles is not None and angles_file is not None:
        raise TiltSeriesError("give either angles or angles_file, not both")
    if angles is not None:
        return validate_angles(angles, n_projections, source="angles")
    if angles_file is None:
        angles_file = angles_sidecar_path(path)
        if not Path(angles_file).exists():
            raise TiltSeriesError(f"no tilt angles for '{path}': expected a sidecar file '{angles_file}' "
                                  f"(one angle in degrees per line) or an explicit angle list")
    values = read_angles_file(angles_file)
    return validate_angles(values, n_projections, source=f"angles file '{angles_file}'")


# ----------------------------------------------------------------------- TIFF
def _check_ifd_chain(tif, last_page, path: Path, file_size: int, n_pages: int) -> None:
    """Raise if the page chain goes on past the end of the file (tifffile only logs that)."""
    import struct

    fh = tif.filehandle
    header = tif.tiff
    try:
        fh.seek(last_page.offset)
        (count,) = struct.unpack(header.tagnoformat, fh.read(header.tagnosize))
        fh.seek(last_page.offset + header.tagnosize + count * header.tagsize)
        raw = fh.read(header.offsetsize)
    except (OSError, struct.error) as exc:
        raise TiltSeriesError(f"'{path}' is truncated: page {n_pages - 1}'s directory is cut off ({exc})") from exc
    if len(raw) < header.offsetsize:
        raise TiltSeriesError(f"'{path}' is truncated: page {n_pages - 1}'s directory is cut off")
    (next_offset,) = struct.unpack(header.offsetformat, raw)
    if next_offset != 0 and next_offset >= file_size:
        raise TiltSeriesError(f"'{path}' is truncated: after page {n_pages - 1} the next page should start "
                              f"at byte {next_offset} but the file has {file_size}")
    shaped = tif.shaped_metadata or ()
    if shaped and isinstance(shaped[0], dict) and isinstance(shaped[0].get("shape"), list) \
            and len(shaped[0]["shape"]) == 3 and shaped[0]["shape"][0] != n_pages \
            and tuple(shaped[0]["shape"][1:]) == tuple(last_page.shape):
        raise TiltSeriesError(f"'{path}' is truncated: its description promises {shaped[0]['shape'][0]} pages, "
                              f"the file holds {n_pages}")


def _scan_tiff(path: Path):
    """Open a TIFF and check every page's shape, type and byte ranges; no pixel decoding.

    Returns the page count, page shape, dtype and scale.
    """
    import tifffile

    if not path.exists():
        raise TiltSeriesError(f"tilt series '{path}' does not exist")
    file_size = path.stat().st_size
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as exc:  # tifffile raises many types for bad files
        raise TiltSeriesError(f"cannot read '{path}' as TIFF: {exc}") from exc
    with tif:
        try:
            pages = list(tif.pages)
        except Exception as exc:
            raise TiltSeriesError(f"'{path}' is truncated or corrupt: cannot read its page "
                                  f"directory ({exc})") from exc
        if not pages:
            raise TiltSeriesError(f"'{path}' holds no images")
        _check_ifd_chain(tif, pages[-1], path, file_size, len(pages))
        shape = None
        dtype = None
        for index, page in enumerate(pages):
            page_shape = tuple(int(v) for v in page.shape)
            if len(page_shape) != 2:
                raise TiltSeriesError(f"'{path}' page {index} has shape {page_shape}; expected a 2-D "
                                      f"grey-scale image (n_slices, n_rays)")
            if shape is None:
                shape, dtype = page_shape, np.dtype(page.dtype)
            elif page_shape != shape:
                raise TiltSeriesError(f"'{path}' has mixed page shapes: page 0 is {shape}, page {index} "
                                      f"is {page_shape}")
            elif np.dtype(page.dtype) != dtype:
                raise TiltSeriesError(f"'{path}' has mixed pixel types: page 0 is {dtype}, page {index} "
                                      f"is {np.dtype(page.dtype)}")
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size == 0 or np.any(offsets + counts > file_size):
                end = int((offsets + counts).max()) if offsets.size else 0
                raise TiltSeriesError(f"'{path}' is truncated: page {index} needs bytes up to {end} "
                                      f"but the file has {file_size}")
            if page.compression == 1 and counts.sum() < int(np.prod(page_shape)) * dtype.itemsize:
                raise TiltSeriesError(f"'{path}' page {index} stores {int(counts.sum())} bytes for a "
                                      f"{page_shape} {dtype} image")
        if dtype.name not in SUPPORTED_DTYPES:
            raise TiltSeriesError(f"'{path}' has pixel type {dtype}; expected one of {SUPPORTED_DTYPES}")
        scale = 1.0
        description = pages[0].description or ""
        if description.startswith("{"):
            try:
                meta = json.loads(description)
            except ValueError:
                meta = {}
            value = meta.get("sparkmpi_scale") if isinstance(meta, dict) else None
            if value is not None:
                if not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                    raise TiltSeriesError(f"'{path}' has a bad sparkmpi_scale {value!r} in its description "
                                          f"(expected a positive number)")
                scale = float(value)
    return len(pages), shape, dtype, scale


def read_tilt_series(path, angles=None, angles_file=None) -> TiltSeries:
    """Read and validate a tilt-series TIFF stack and its angles.

    Parameters
    ----------
    path : str or Path
        Multi-page TIFF, one ``(n_slices, n_rays)`` page per projection.
    angles : sequence of float, optional
        Tilt angles in degrees, one per page.  Default: read ``angles_file``.
    angles_file : str or Path, optional
        Angles file; default the sidecar :func:`angles_sidecar_path`.

    Returns
    -------
    TiltSeries
        ``projections`` float32 of shape (n_angles, n_slices, n_rays).

    Raises
    ------
    TiltSeriesError
        Before any pixel data is decoded: missing/unreadable/truncated file,
        mixed page shapes or types, unsupported pixel type, missing angles,
        angle count different from the page count, non-monotonic or
        out-of-range angles.
    """
    import tifffile

    path = Path(path)
    n_pages, shape, dtype, scale = _scan_tiff(path)
    angle_values = _resolve_angles(path, angles, angles_file, n_pages)
    try:
        data = tifffile.imread(str(path), key=range(n_pages))
    except Exception as exc:
        raise TiltSeriesError(f"cannot decode the pixels of '{path}': {exc}") from exc
    data = np.asarray(data).reshape(n_pages, *shape)
    projections = data.astype(np.float32)
    if scale != 1.0:
        projections *= np.float32(scale)
    return TiltSeries(projections=projections, angles_deg=angle_values, source=str(path),
                      scale=scale, stored_dtype=dtype.name)


def write_tilt_series(path, projections, angles_deg, dtype="uint16", write_sidecar: bool = True) -> Path:
    """Write a tilt series as a multi-page TIFF (plus its angles sidecar).

    Parameters
    ----------
    path : str or Path
        Output ``.tif``.
    projections : array_like, shape (n_angles, n_slices, n_rays)
        Line integrals (non-negative for integer output).
    angles_deg : sequence of float, shape (n_angles,)
    dtype : {"uint16", "float32"}
        ``uint16`` stores ``round(p / scale)`` with ``scale = max(p) / 65535``
        recorded as ``sparkmpi_scale`` in the description; ``float32`` stores
        the values.
    write_sidecar : bool
        Also write ``<stack>.angles.txt``.

    Returns
    -------
    Path
        The TIFF path.
    """
    import tifffile

    projections = np.asarray(projections)
    if projections.ndim != 3:
        raise InvalidArgument(f"projections must have shape (n_angles, n_slices, n_rays), got {projections.shape}")
    angles = validate_angles(angles_deg, projections.shape[0], source="angles_deg")
    if dtype not in ("uint16", "float32"):
        raise InvalidArgument(f"dtype must be 'uint16' or 'float32', got {dtype!r}")
    path = Path(path)
    if dtype == "uint16":
        if projections.min() < 0:
            raise InvalidArgument("projections must be non-negative for uint16 output "
                             f"(minimum is {projections.min():g})")
        peak = float(projections.max())
        scale = peak / 65535.0 if peak > 0 else 1.0
        stored = np.round(projections / scale).astype(np.uint16)
    else:
        scale = 1.0
        stored = projections.astype(np.float32)
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(str(tmp), stored, photometric="minisblack",
                     metadata={"sparkmpi_scale": scale, "axes": "QYX"})
    os.replace(tmp, path)
    if write_sidecar:
        write_angles_file(angles_sidecar_path(path), angles)
    return path


# -------------------------------------------------------------------- Parquet
def tiff_to_parquet(tiff_path, parquet_path, angles=None, angles_file=None,
                    row_group_slices: int = 64) -> Path:
    """ETL: a tilt-series TIFF to Parquet, one row per slice (sinogram).

    Parameters
    ----------
    tiff_path : str or Path
        Validated with :func:`read_tilt_series` rules.
    parquet_path : str or Path
        Output file.
    angles, angles_file
        As in :func:`read_tilt_series`.
    row_group_slices : int
        Slices per Parquet row group.

    Returns
    -------
    Path
        ``parquet_path``.  Values keep the stored pixel type; ``scale`` holds
        the factor to apply.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tifffile

    tiff_path = Path(tiff_path)
    n_pages, shape, dtype, scale = _scan_tiff(tiff_path)
    angle_values = _resolve_angles(tiff_path, angles, angles_file, n_pages)
    try:
        raw = np.asarray(tifffile.imread(str(tiff_path), key=range(n_pages))).reshape(n_pages, *shape)
    except Exception as exc:
        raise TiltSeriesError(f"cannot decode the pixels of '{tiff_path}': {exc}") from exc
    n_slices, n_rays = shape
    stored = raw.astype(dtype.newbyteorder("<"), copy=False)
    sinos = np.ascontiguousarray(stored.transpose(1, 0, 2))          # (n_slices, n_angles, n_rays)
    table = pa.table({
        "slice": pa.array(np.arange(n_slices, dtype=np.int32)),
        "n_angles": pa.array(np.full(n_slices, n_pages, dtype=np.int32)),
        "n_rays": pa.array(np.full(n_slices, n_rays, dtype=np.int32)),
        "dtype": pa.array([sinos.dtype.str] * n_slices),
        "scale": pa.array(np.full(n_slices, scale, dtype=np.float64)),
        "data": pa.array([s.tobytes() for s in sinos], type=pa.binary()),
    })
    table = table.replace_schema_metadata({
        _ANGLES_KEY: json.dumps([float(a) for a in angle_values]).encode(),
        _SLICES_KEY: str(n_slices).encode(),
        b"sparkmpi.tomo.source": str(tiff_path).encode(),
    })
    parquet_path = Path(parquet_path)
    tmp = parquet_path.with_name(parquet_path.name + ".part")
    pq.write_table(table, str(tmp), row_group_size=max(1, int(row_group_slices)))
    os.replace(tmp, parquet_path)
    return parquet_path


def parquet_metadata(path) -> dict:
    """Read and check a sinogram Parquet file's metadata (no row data).

    Returns
    -------
    dict
        ``angles_deg`` (float64 array), ``n_slices``, ``n_angles``, ``n_rays``.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise TiltSeriesError(f"sinogram Parquet '{path}' does not exist")
    try:
        schema = pq.read_schema(str(path))
    except Exception as exc:
        raise TiltSeriesError(f"cannot read '{path}' as Parquet: {exc}") from exc
    missing = [c for c in ("slice", "n_angles", "n_rays", "dtype", "scale", "data") if c not in schema.names]
    if missing:
        raise TiltSeriesError(f"'{path}' is not a sinogram table: missing columns {missing}")
    meta = schema.metadata or {}
    if _ANGLES_KEY not in meta or _SLICES_KEY not in meta:
        raise TiltSeriesError(f"'{path}' has no '{_ANGLES_KEY.decode()}'/'{_SLICES_KEY.decode()}' metadata "
                              f"(write it with tiff_to_parquet)")
    angles = validate_angles(json.loads(meta[_ANGLES_KEY]), source=f"'{path}' metadata")
    table = pq.read_table(str(path), columns=["slice", "n_angles", "n_rays"])
    slices = table.column("slice").to_numpy()
    n_slices = int(meta[_SLICES_KEY])
    if slices.size != n_slices or not np.array_equal(np.sort(slices), np.arange(n_slices)):
        raise TiltSeriesError(f"'{path}' should hold slices 0..{n_slices - 1} once each, "
                              f"got {slices.size} rows")
    n_angles = np.unique(table.column("n_angles").to_numpy())
    n_rays = np.unique(table.column("n_rays").to_numpy())
    if n_angles.size != 1 or n_rays.size != 1:
        raise TiltSeriesError(f"'{path}' has mixed sinogram shapes: n_angles {n_angles.tolist()}, "
                              f"n_rays {n_rays.tolist()}")
    validate_angles(angles, int(n_angles[0]), source=f"'{path}' metadata")
    return {"angles_deg": angles, "n_slices": n_slices, "n_angles": int(n_angles[0]),
            "n_rays": int(n_rays[0])}


def decode_sinogram_row(n_angles: int, n_rays: int, dtype: str, scale: float, data: bytes) -> np.ndarray:
    """Decode one Parquet row's sinogram to float32, shape (n_angles, n_rays)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TiltSeriesError(f"sinogram row has unknown dtype {dtype!r}") from None
    if dt.name not in SUPPORTED_DTYPES:
        raise TiltSeriesError(f"sinogram row has dtype {dt}; expected one of {SUPPORTED_DTYPES}")
    expected = n_angles * n_rays * dt.itemsize
    if len(data) != expected:
        raise TiltSeriesError(f"sinogram row holds {len(data)} bytes; expected {expected} for "
                              f"({n_angles}, {n_rays}) {dt}")
    sino = np.frombuffer(data, dtype=dt).reshape(n_angles, n_rays).astype(np.float32)
    if scale != 1.0:
        sino *= np.float32(scale)
    return sino


def read_parquet_sinograms(path) -> TiltSeries:
    """Read a sinogram Parquet file (from :func:`tiff_to_parquet`) without Spark."""
    import pyarrow.parquet as pq

    meta = parquet_metadata(path)
    table = pq.read_table(str(path))
    cols = {name: table.column(name).to_pylist() for name in ("slice", "dtype", "scale", "data")}
    projections = np.empty((meta["n_angles"], meta["n_slices"], meta["n_rays"]), dtype=np.float32)
    for s, dt, scale, data in zip(cols["slice"], cols["dtype"], cols["scale"], cols["data"]):
        projections[:, s, :] = decode_sinogram_row(meta["n_angles"], meta["n_rays"], dt, scale, data)
    return TiltSeries(projections=projections, angles_deg=meta["angles_deg"], source=str(path),
                      scale=float(cols["scale"][0]), stored_dtype=np.dtype(cols["dtype"][0]).name)
