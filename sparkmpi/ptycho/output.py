"""Writing a reconstruction: arrays in NPZ, pictures in PNG (Pillow only).

:func:`write_outputs` writes into a directory

``reconstruction.npz``  ``object`` complex64 (Hy, Wx), ``probe`` complex64
                        (H, W) (the main mode of a mixed state), ``errors``
                        float64 (iterations,), ``summary`` (JSON string), and
                        ``probe_modes`` complex64 (M, H, W) when M > 1.
``object_phase.png``    phase of the object, -pi..pi mapped to black..white
                        (or the illuminated region's range with ``mask``).
``object_amplitude.png`` amplitude, min..max mapped to black..white.
``probe_amplitude.png`` probe amplitude (main mode).
``probe_modes_amplitude.png`` every mode's amplitude side by side, each on
                        its own scale (M > 1 only).
``errors.png``          Fourier-modulus error against iteration, log scale.
``reconstruction.h5``   the same arrays in HDF5, with ``positions`` (the
                        refined scan positions, when given)
                        (:func:`sparkmpi.ptycho.files.write_result_hdf5`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import PtychoInputError


def to_grey(image, lo=None, hi=None, mask=None):
    """Map a real 2-D array linearly to 8-bit grey (``lo`` black, ``hi`` white)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise PtychoInputError(f"image must be 2-D, got shape {img.shape}")
    ref = img[mask] if mask is not None and np.any(mask) else img
    lo = float(np.min(ref)) if lo is None else float(lo)
    hi = float(np.max(ref)) if hi is None else float(hi)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((img - lo) * scale, 0, 255).astype(np.uint8)


def save_png(array8, path) -> Path:
    """Write a uint8 2-D (grey) or 3-D (RGB) array as PNG."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(np.asarray(array8)).save(path, format="PNG")
    return path


def error_curve_png(errors, path, *, size=(640, 400), title="Fourier-modulus error") -> Path:
    """Draw ``errors`` (one per iteration) on a log axis with Pillow's ImageDraw."""
    from PIL import Image, ImageDraw

    errs = np.asarray(errors, dtype=np.float64)
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, w - 20, 30, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) // 2 - 25, h - 20), "iteration", fill="black")
    good = errs[np.isfinite(errs) & (errs > 0)]
    if len(errs) == 0 or len(good) == 0:
        draw.text((left + 10, top + 10), "no errors recorded", fill="black")
        img.save(path, format="PNG")
        return Path(path)
    lmin = math.floor(math.log10(good.min()))
    lmax = math.ceil(math.log10(good.max()))
    if lmax == lmin:
        lmax += 1
    n = len(errs)

    def xy(i, e):
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * (math.log10(e) - lmin) / (lmax - lmin)
        return x, y

    for dec in range(lmin, lmax + 1):
        _, y = xy(0, 10.0 ** dec)
        draw.line([left, y, right, y], fill=(220, 220, 220))
        draw.text((8, y - 6), f"1e{dec}", fill="black")
    for k in range(5):
        i = round((n - 1) * k / 4)
        x, _ = xy(i, 10.0 ** lmin)
        draw.text((x - 8, bottom + 4), str(i + 1), fill="black")
    pts = [xy(i, e) for i, e in enumerate(errs) if np.isfinite(e) and e > 0]
    if len(pts) > 1:
        draw.line(pts, fill=(200, 30, 30), width=2)
    else:
        x, y = pts[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 30, 30))
    img.save(path, format="PNG")
    return Path(path)


def write_outputs(directory, obj, probe, errors, *, mask=None, summary: dict | None = None,
                  positions=None, hdf5: bool = True) -> dict:
    """Write the arrays and pictures of a reconstruction into ``directory``.

    Parameters
    ----------
    directory : path
        Created if missing.
    obj : ndarray, complex, (Hy, Wx)
    probe : ndarray, complex, (H, W) or (M, H, W)
        The probe, or its incoherent modes (main mode first).
    errors : sequence of float
        Fourier-modulus error per iteration.
    mask : ndarray of bool (Hy, Wx), optional
        Illuminated region: grey levels are stretched over it.
    summary : dict, optional
        JSON-serialisable figures stored in the NPZ.
    positions : ndarray (N, 2), optional
        Scan positions (refined), stored in the NPZ and the HDF5 file.
    hdf5 : bool
        Also write ``reconstruction.h5``.

    Returns
    -------
    dict
        File role -> path written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    obj = np.asarray(obj)
    probe = np.asarray(probe)
    modes = None
    if probe.ndim == 3:
        modes, probe = (probe if probe.shape[0] > 1 else None), probe[0]
    if obj.ndim != 2 or probe.ndim != 2:
        raise PtychoInputError(f"obj and probe must be 2-D, got shapes {obj.shape} and {probe.shape}")
    if mask is not None and np.shape(mask) != obj.shape:
        raise PtychoInputError(f"mask has shape {np.shape(mask)}, expected {obj.shape}")
    files = {}
    npz = out / "reconstruction.npz"
    tmp = out / "reconstruction.npz.part"
    extra = {} if positions is None else {"positions": np.asarray(positions, dtype=np.float64)}
    if modes is not None:
        extra["probe_modes"] = modes.astype(np.complex64)
    with open(tmp, "wb") as fh:
        np.savez(fh, object=obj.astype(np.complex64), probe=probe.astype(np.complex64),
                 errors=np.asarray(errors, dtype=np.float64),
                 summary=np.asarray(json.dumps(summary or {}, sort_keys=True)), **extra)
    tmp.replace(npz)
    files["arrays"] = str(npz)
    if hdf5:
        from .files import write_result_hdf5

        files["hdf5"] = str(write_result_hdf5(out / "reconstruction.h5", obj, probe, errors,
                                              positions=positions, summary=summary,
                                              probe_modes=modes))
    phase = np.angle(obj)
    if mask is not None and np.any(mask):
        # remove the global phase so the picture does not wrap needlessly
        phase = np.angle(obj * np.exp(-1j * np.angle(np.sum(obj[mask]))))
    files["object_phase"] = str(save_png(to_grey(phase, mask=mask), out / "object_phase.png"))
    files["object_amplitude"] = str(save_png(to_grey(np.abs(obj), mask=mask),
                                             out / "object_amplitude.png"))
    files["probe_amplitude"] = str(save_png(to_grey(np.abs(probe)), out / "probe_amplitude.png"))
    if modes is not None:
        tiles = np.concatenate([to_grey(np.abs(m)) for m in modes], axis=1)
        files["probe_modes_amplitude"] = str(save_png(tiles, out / "probe_modes_amplitude.png"))
    files["errors"] = str(error_curve_png(errors, out / "errors.png"))
    return files
