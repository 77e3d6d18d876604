"""Writing reconstructions: float32 TIFF, VTK ImageData (.vti), orthogonal-slice PNG; progress.

Volumes have shape ``(n_slices, n, n)`` (see :mod:`sparkmpi.tomo.algorithms`).
In the ``.vti`` file the last array axis is VTK's X (fastest), the middle Y and
the first (the rotation axis) Z, with unit spacing unless told otherwise.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument

__all__ = ["write_volume_tiff", "write_vti", "read_vti", "write_orthoslices_png", "Progress",
           "write_outputs"]


def _check_volume(volume) -> np.ndarray:
    vol = np.asarray(volume)
    if vol.ndim != 3 or 0 in vol.shape:
        raise InvalidArgument(f"volume must have shape (n_slices, n, n) with no empty axis, got {vol.shape}")
    if not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise InvalidArgument(f"volume must hold real numbers, got dtype {vol.dtype}")
    return vol


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".part")


def write_volume_tiff(path, volume) -> Path:
    """Write a volume as a multi-page float32 TIFF, one page per slice (axis 0)."""
    import tifffile

    vol = _check_volume(volume).astype(np.float32, copy=False)
    path = Path(path)
    tmp = _atomic_target(path)
    tifffile.imwrite(str(tmp), vol, photometric="minisblack", metadata={"axes": "ZYX"})
    os.replace(tmp, path)
    return path


def write_vti(path, volume, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), name: str = "density") -> Path:
    """Write a volume as VTK XML ImageData with raw appended float32 data.

    Parameters
    ----------
    path : str or Path
        Output ``.vti`` file (ParaView opens it directly).
    volume : array_like, shape (nz, ny, nx)
        Stored as a point-data array; X varies fastest.
    spacing, origin : tuple of 3 floats
        Voxel size and position of voxel (0, 0, 0), in (x, y, z) order.
    name : str
        Name of the scalar array.

    Returns
    -------
    Path

    Notes
    -----
    The file is the XML header, then ``<AppendedData encoding="raw">`` with
    ``_``, a little-endian UInt64 byte count and the little-endian float32
    values (VTK file format, "XML File Formats", appended data section).
    """
    vol = np.ascontiguousarray(_check_volume(volume), dtype="<f4")
    if len(spacing) != 3 or len(origin) != 3:
        raise InvalidArgument(f"spacing and origin need 3 values (x, y, z), got {spacing!r} and {origin!r}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise InvalidArgument(f"name must be a simple identifier, got {name!r}")
    nz, ny, nx = vol.shape
    extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
    lo, hi = float(vol.min()), float(vol.max())
    header = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
        f'  <ImageData WholeExtent="{extent}" Origin="{" ".join(repr(float(v)) for v in origin)}" '
        f'Spacing="{" ".join(repr(float(v)) for v in spacing)}" Direction="1 0 0 0 1 0 0 0 1">\n'
        f'    <Piece Extent="{extent}">\n'
        f'      <PointData Scalars="{name}">\n'
        f'        <DataArray type="Float32" Name="{name}" NumberOfComponents="1" format="appended" '
        f'offset="0" RangeMin="{lo!r}" RangeMax="{hi!r}"/>\n'
        '      </PointData>\n'
        '      <CellData>\n'
        '      </CellData>\n'
        '    </Piece>\n'
        '  </ImageData>\n'
        '  <AppendedData encoding="raw">\n'
        '   _'
    )
    path = Path(path)
    tmp = _atomic_target(path)
    with open(tmp, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(struct.pack("<Q", vol.nbytes))
        fh.write(memoryview(vol).cast("B"))
        fh.write(b"\n  </AppendedData>\n</VTKFile>\n")
    os.replace(tmp, path)
    return path


def read_vti(path):
    """Read a ``.vti`` written by :func:`write_vti` (raw appended, one Float32 array).

    Returns
    -------
    (numpy.ndarray, dict)
        The volume, shape (nz, ny, nx), and ``{"spacing", "origin", "name"}``.
    """
    raw = Path(path).read_bytes()
    marker = raw.find(b'<AppendedData encoding="raw">')
    if marker < 0:
        raise InvalidArgument(f"'{path}' has no raw AppendedData section")
    start = raw.index(b"_", marker) + 1
    head = raw[:marker].decode("ascii")
    extent = [int(v) for v in re.search(r'WholeExtent="([^"]+)"', head).group(1).split()]
    spacing = tuple(float(v) for v in re.search(r'Spacing="([^"]+)"', head).group(1).split())
    origin = tuple(float(v) for v in re.search(r'Origin="([^"]+)"', head).group(1).split())
    name = re.search(r'DataArray type="Float32" Name="([^"]+)"', head).group(1)
    (nbytes,) = struct.unpack("<Q", raw[start:start + 8])
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if nbytes != 4 * int(np.prod(shape)):
        raise InvalidArgument(f"'{path}': appended block holds {nbytes} bytes, expected {4 * int(np.prod(shape))}")
    data = np.frombuffer(raw, dtype="<f4", count=nbytes // 4, offset=start + 8).reshape(shape)
    return data.copy(), {"spacing": spacing, "origin": origin, "name": name}


def _to_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    return (np.clip((image - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_orthoslices_png(path, volume, gap: int = 4) -> Path:
    """Write the three central orthogonal slices side by side as an 8-bit PNG.

    Parameters
    ----------
    path : str or Path
    volume : array_like, shape (nz, ny, nx)
    gap : int
        Black pixels between the panels.

    Notes
    -----
    Panels, left to right: ``volume[nz // 2]`` (a reconstructed slice),
    ``volume[:, ny // 2, :]`` and ``volume[:, :, nx // 2]``; one grey scale
    from the 0.5th to 99.5th percentile of the volume for all three.
    """
    from PIL import Image

    vol = _check_volume(volume).astype(np.float32, copy=False)
    nz, ny, nx = vol.shape
    panels = [vol[nz // 2], vol[:, ny // 2, :], vol[:, :, nx // 2]]
    sample = vol[:: max(1, nz // 64)].ravel()
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.zeros((height, width), dtype=np.uint8)
    x = 0
    for panel in panels:
        canvas[: panel.shape[0], x: x + panel.shape[1]] = _to_uint8(panel, lo, hi)
        x += panel.shape[1] + gap
    path = Path(path)
    tmp = _atomic_target(path)
    Image.fromarray(canvas, mode="L").save(str(tmp), format="PNG")
    os.replace(tmp, path)
    return path


def write_outputs(directory, volume, stem: str = "volume") -> dict:
    """Write ``<stem>.tif``, ``<stem>.vti`` and ``<stem>_slices.png`` into a directory.

    Returns
    -------
    dict
        ``{"tiff": path, "vti": path, "png": path}`` as strings.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "tiff": str(write_volume_tiff(directory / f"{stem}.tif", volume)),
        "vti": str(write_vti(directory / f"{stem}.vti", volume)),
        "png": str(write_orthoslices_png(directory / f"{stem}_slices.png", volume)),
    }


class Progress:
    """A one-line progress display on stderr, throttled, silent when disabled.

    Call the object as ``progress(done, total)``; :meth:`message` prints a
    whole line.  Updates are at most every ``interval`` seconds; on a
    terminal the line is rewritten in place, otherwise each update is a line.
    """

    def __init__(self, label: str, enabled: bool = True, stream=None, interval: float = 0.5):
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.start = time.perf_counter()
        self._last = -1e9
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        text = f"{self.label}: {done}/{total} ({pct:5.1f}%) {now - self.start:6.1f} s"
        if self._tty:
            end = "\n" if done >= total else ""
            self.stream.write("\r" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"{self.label}: {text}\n")
            self.stream.flush()
