"""Finding out what a result file holds, and reading it; no web server here.

Two kinds of result are viewed:

``"volume"``  a tomography reconstruction, shape ``(nz, ny, nx)``: a
              multi-page float32 TIFF (``sparkmpi tomo reconstruct``), a VTK
              ``.vti`` ImageData file (the same command), or a 3-D ``.npy``.
``"ptycho"``  a ptychography reconstruction: the NPZ written by
              ``sparkmpi ptycho reconstruct`` (``object`` complex (Hy, Wx),
              ``probe`` complex (H, W), ``errors`` float (iterations,),
              ``summary`` JSON string), or a live snapshot NPZ with at least
              ``object``.

The kind comes from the file's first bytes (TIFF, NumPy, XML and ZIP magic
numbers) and, for NPZ, from the names of the arrays inside; the extension is
not trusted.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ResultNotFoundError, UnreadableResultError, WrongKindError
from ..errors import InvalidArgumentType

__all__ = ["KINDS", "detect_kind", "results_in", "load_volume", "load_ptycho", "ptycho_from_arrays", "PtychoResult"]

KINDS = ("volume", "ptycho")

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
# keys of 'sparkmpi ptycho simulate' output: a scan, not a reconstruction
_SCAN_KEYS = {"intensities", "positions"}
_HEAD = 4096


def _as_path(path, name: str = "path") -> Path:
    if not isinstance(path, (str, Path)) or str(path) == "":
        raise InvalidArgumentType(f"{name} must be a non-empty str or Path, got {path!r}")
    return Path(path)


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise ResultNotFoundError(f"result file '{path}' does not exist")
    if path.is_dir():
        if (path / "latest.json").exists():
            raise WrongKindError(f"'{path}' is a live snapshot directory; view it with "
                                 f"'sparkmpi view --live {path}'")
        raise WrongKindError(f"'{path}' is a directory; expected a result file (volume TIFF/.vti/.npy "
                             f"or ptychography NPZ)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError as exc:
        raise UnreadableResultError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if not head:
        raise UnreadableResultError(f"'{path}' is empty (0 bytes)")
    return head


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UnreadableResultError(f"'{path}' is truncated or corrupt: not a readable NPZ/ZIP "
                                    f"archive ({exc})") from exc
    return sorted(n[:-4] if n.endswith(".npy") else n for n in names)


def detect_kind(path) -> str:
    """Say what a result file holds, from its content.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        ``"volume"`` or ``"ptycho"`` (see the module docstring).

    Raises
    ------
    ResultNotFoundError
        No such file.
    UnreadableResultError
        No permission, empty, or a broken archive.
    WrongKindError
        A readable file of another kind (text, an unrelated NPZ, a scan, a
        directory).
    """
    path = _as_path(path)
    head = _read_head(path)
    if head.startswith(_TIFF_MAGICS) or head.startswith(_NPY_MAGIC):
        return "volume"
    text = head.lstrip()
    if text.startswith(b"<?xml") or text.startswith(b"<VTKFile"):
        if b"<VTKFile" in head and b'type="ImageData"' in head:
            return "volume"
        raise WrongKindError(f"'{path}' is an XML file but not VTK ImageData (.vti); expected a "
                             f"volume or a ptychography result")
    if head.startswith(_ZIP_MAGIC):
        keys = _npz_keys(path)
        if "object" in keys:
            return "ptycho"
        if _SCAN_KEYS <= set(keys):
            raise WrongKindError(f"'{path}' is a ptychography scan (arrays {keys}), not a reconstruction; "
                                 f"reconstruct it first with 'sparkmpi ptycho reconstruct'")
        raise WrongKindError(f"'{path}' is an NPZ with arrays {keys}; expected a ptychography result with "
                             f"'object' (and 'probe', 'errors')")
    preview = head[:16]
    raise WrongKindError(f"'{path}' is neither a tomography volume (TIFF, .vti, .npy) nor a ptychography "
                         f"result (NPZ); it starts with {preview!r}")


#: File names the commands write as results, most wanted first (a folder is searched for these).
RESULT_NAMES = ("reconstruction.npz", "volume.tif", "volume.vti", "volume.npy")


def results_in(directory) -> list[Path]:
    """The results in an output folder (``demo-output/``, a ``--out`` folder), best first.

    Looks in the folder and its direct sub-folders for the files the commands
    write (:data:`RESULT_NAMES`); a ptychography result comes before a volume,
    and ``.vti``/``.npy`` only where no TIFF of the same stem is there.

    Raises
    ------
    ResultNotFoundError
        The folder does not exist, or holds no result.
    """
    directory = _as_path(directory, "directory")
    if not directory.is_dir():
        raise ResultNotFoundError(f"'{directory}' is not a folder")
    found: list[Path] = []
    for folder in [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]:
        names = {p.name for p in folder.iterdir() if p.is_file()}
        if RESULT_NAMES[0] in names:
            found.append(folder / RESULT_NAMES[0])
        volumes = [name for name in RESULT_NAMES[1:] if name in names]
        if volumes:  # the same volume in several formats: one is enough
            found.append(folder / volumes[0])
    if not found:
        raise ResultNotFoundError(f"'{directory}' holds no result ({', '.join(RESULT_NAMES)}, in it or one "
                                  f"folder down); name a result file, or use --live for snapshots")
    return sorted(found, key=lambda p: RESULT_NAMES.index(p.name))


# --------------------------------------------------------------------- volumes
def _check_volume_array(vol, path: Path) -> np.ndarray:
    vol = np.asarray(vol)
    if vol.ndim != 3 or min(vol.shape) < 2:
        raise WrongKindError(f"'{path}' holds an array of shape {vol.shape}; expected a volume "
                             f"(nz, ny, nx) with every axis >= 2")
    if not (np.issubdtype(vol.dtype, np.integer) or np.issubdtype(vol.dtype, np.floating)):
        raise WrongKindError(f"'{path}' holds {vol.dtype} values; expected real numbers")
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if not np.isfinite(vol).all():
        vol = np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)
    return vol


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    from ..tomo.io import TiltSeriesError, _check_ifd_chain

    size = path.stat().st_size
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # it logs broken page chains; we raise about them instead
    try:
        with tifffile.TiffFile(str(path)) as tif:
            pages = list(tif.pages)
            if not pages:
                raise UnreadableResultError(f"'{path}' holds no images")
            for index, page in enumerate(pages):
                ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts,
                                                                                  dtype=np.int64)
                if ends.size == 0 or int(ends.max()) > size:
                    raise UnreadableResultError(f"'{path}' is truncated: page {index} needs bytes up to "
                                                f"{int(ends.max()) if ends.size else 0}, the file has {size}")
            try:  # tifffile only logs a page chain that runs past the end of the file
                _check_ifd_chain(tif, pages[-1], path, size, len(pages))
            except TiltSeriesError as exc:
                raise UnreadableResultError(str(exc)) from None
            return tif.asarray(key=range(len(pages)) if len(pages) > 1 else 0)
    except UnreadableResultError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise UnreadableResultError(f"'{path}' is truncated or corrupt: cannot read it as TIFF "
                                    f"({type(exc).__name__}: {exc})") from exc
    finally:
        log.setLevel(level)


def load_volume(path) -> np.ndarray:
    """Read a tomography volume as float32, shape ``(nz, ny, nx)``.

    A single-page TIFF or a 2-D array is refused (not a volume); NaN and
    infinite values are set to 0.

    Raises
    ------
    ResultNotFoundError, UnreadableResultError, WrongKindError
    """
    path = _as_path(path)
    head = _read_head(path)
    if head.startswith(_TIFF_MAGICS):
        vol = _read_tiff(path)
    elif head.startswith(_NPY_MAGIC):
        try:
            vol = np.load(path, allow_pickle=False)
        except ValueError as exc:  # truncated data or object arrays
            raise UnreadableResultError(f"'{path}' is truncated or not a plain NumPy array ({exc})") from exc
    elif b"<VTKFile" in head:
        from ..tomo.output import read_vti

        try:
            vol, _ = read_vti(path)
        except Exception as exc:  # regex misses, struct errors, short buffers
            raise UnreadableResultError(f"'{path}' is not a .vti this viewer reads (one raw appended "
                                        f"Float32 array) or is truncated ({type(exc).__name__}: {exc})") from exc
    else:
        kind = detect_kind(path)
        raise WrongKindError(f"'{path}' holds a {kind} result, not a volume")
    return _check_volume_array(vol, path)


# -------------------------------------------------------------------- ptycho
@dataclass
class PtychoResult:
    """A ptychographic reconstruction to display.

    Attributes
    ----------
    object : ndarray complex64, (Hy, Wx)
    probe : ndarray complex64, (H, W), or None
    errors : ndarray float64, (iterations,); may be empty
    summary : dict
        Figures stored with the result (``summary`` or ``meta``).
    """

    object: np.ndarray
    probe: np.ndarray | None = None
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0))
    summary: dict = field(default_factory=dict)


def _json_scalar(value) -> dict:
    try:
        out = json.loads(str(np.asarray(value).item()))
    except (ValueError, TypeError):
        return {}
    return out if isinstance(out, dict) else {}


def ptycho_from_arrays(arrays, source: str = "arrays") -> PtychoResult:
    """Check a mapping of arrays (``object``, optional ``probe``, ``errors``, ``summary``/``__meta__``).

    Raises
    ------
    WrongKindError
        ``object`` missing or not 2-D, ``probe`` not 2-D, ``errors`` not 1-D.
    """
    keys = set(arrays)
    if "object" not in keys:
        raise WrongKindError(f"{source} has arrays {sorted(keys)}; expected 'object'")
    obj = np.asarray(arrays["object"])
    if obj.ndim != 2 or 0 in obj.shape or not np.issubdtype(obj.dtype, np.number):
        raise WrongKindError(f"{source}: 'object' must be a 2-D numeric array, got shape {obj.shape} "
                             f"dtype {obj.dtype}")
    probe = None
    if "probe" in keys:
        probe = np.asarray(arrays["probe"])
        if probe.ndim != 2 or 0 in probe.shape or not np.issubdtype(probe.dtype, np.number):
            raise WrongKindError(f"{source}: 'probe' must be a 2-D numeric array, got shape {probe.shape} "
                                 f"dtype {probe.dtype}")
        probe = probe.astype(np.complex64)
    errors = np.zeros(0)
    if "errors" in keys:
        errors = np.asarray(arrays["errors"])
        if errors.ndim != 1 or not np.issubdtype(errors.dtype, np.number) or np.iscomplexobj(errors):
            raise WrongKindError(f"{source}: 'errors' must be a 1-D real array, got shape {errors.shape} "
                                 f"dtype {errors.dtype}")
        errors = errors.astype(np.float64)
    summary = {}
    for key in ("summary", "__meta__"):
        if key in keys:
            summary.update(_json_scalar(arrays[key]))
    return PtychoResult(obj.astype(np.complex64), probe, errors, summary)


def load_ptycho(path) -> PtychoResult:
    """Read a ptychography result NPZ (``sparkmpi ptycho reconstruct`` or a live snapshot).

    Raises
    ------
    ResultNotFoundError, UnreadableResultError, WrongKindError
    """
    path = _as_path(path)
    kind = detect_kind(path)
    if kind != "ptycho":
        raise WrongKindError(f"'{path}' holds a {kind}, not a ptychography result")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UnreadableResultError(f"'{path}' is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    return ptycho_from_arrays(arrays, source=f"'{path}'")
