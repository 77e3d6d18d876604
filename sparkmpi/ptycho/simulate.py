"""Simulated far-field ptychography scans with ground truth.

The simulator builds

* a complex **object** whose amplitude comes from scikit-image's bundled
  ``camera`` image and whose phase comes from the grey version of its
  ``astronaut`` image (both 512x512, shipped inside the scikit-image wheel, so
  no download is needed), resized to the object shape;
* a **probe**: a focused circular aperture (an Airy spot: the inverse Fourier
  transform of a circular pupil) or a Gaussian, optionally Fresnel-propagated
  by a distance (paraxial transfer function);
* a **scan**: a Fermat spiral (Huang et al. 2014) or a jittered raster, whose
  step is ``probe_diameter * (1 - overlap)``;
* far-field **intensities** ``I_j = |F(P * O_j)|^2`` with an orthonormal 2-D
  FFT, zero frequency at the frame centre (``fftshift`` convention), and
  optional Poisson noise at a given number of photons per frame;
* optionally a **partially coherent** beam: ``M`` mutually incoherent probe
  modes with given power fractions (:func:`make_probe_modes`), whose
  intensities add, ``I_j = sum_m |F(P_m * O_j)|^2`` (Thibault & Menzel 2013).

File format (NPZ, written by :meth:`PtychoData.save`)
-----------------------------------------------------
``intensities``  float32 ``(N, H, W)``: measured intensities (photons when
                 noisy), zero frequency at ``(H // 2, W // 2)``.
``positions``    int64 ``(N, 2)``: top-left ``(row, col)`` pixel offset of each
                 frame in the object array.
``object_shape`` int64 ``(2,)``: shape of the object array.
``object_true``  complex64 ``(Hy, Wx)``: ground-truth object (optional).
``probe_true``   complex64 ``(H, W)``: ground-truth probe (optional); of a
                 partially coherent simulation, its main mode.
``probe_modes_true`` complex64 ``(M, H, W)``: every true probe mode, orthogonal,
                 by decreasing power (partially coherent simulations only).
``metadata``     0-d unicode array holding a JSON object: ``format``
                 (``"sparkmpi-ptycho"``), ``version`` (1) and the simulation
                 parameters.

All randomness comes from one ``numpy.random.Generator`` seeded by ``seed``.

References
----------
1. P. Thibault et al., "Probe retrieval in ptychographic coherent diffractive
   imaging", Ultramicroscopy 109, 338-343 (2009).
2. X. Huang et al., "Optimization of overlap uniformness for ptychography",
   Optics Express 22, 12634 (2014) (Fermat spiral scans).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._validate import check_complex_image, check_frames, shape2
from .errors import DataFormatError, PtychoInputError

FORMAT_NAME = "sparkmpi-ptycho"
FORMAT_VERSION = 1
PROBES = ("aperture", "focused", "gaussian")
SCANS = ("spiral", "raster")
# Probe power (sum of |P|^2) used for noise-free data, so intensities are O(1e2).
DEFAULT_PROBE_POWER = 1.0e6


@dataclass
class PtychoData:
    """One ptychographic scan: measured intensities, positions, optional truth.

    Attributes
    ----------
    intensities : ndarray, float32, shape (N, H, W)
        Far-field intensities, zero frequency at the frame centre.
    positions : ndarray, int64, shape (N, 2)
        Top-left (row, col) offset of each frame in the object, in pixels.
    object_shape : tuple of int
        Shape ``(Hy, Wx)`` of the object array.
    object_true, probe_true : ndarray, complex64, or None
        Ground truth (simulations only); ``probe_true`` is the main mode of a
        partially coherent one.
    metadata : dict
        JSON-serialisable parameters.
    probe_modes_true : ndarray, complex64, shape (M, H, W), or None
        Every true probe mode of a partially coherent simulation.
        JSON-serialisable parameters.
    """

    intensities: np.ndarray
    positions: np.ndarray
    object_shape: tuple[int, int]
    object_true: np.ndarray | None = None
    probe_true: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    probe_modes_true: np.ndarray | None = None

    def __post_init__(self):
        self.intensities, self.positions, self.object_shape = check_frames(
            self.intensities, self.positions, self.object_shape, self.probe_true,
            names=("intensities", "positions", "object_shape", "probe_true"))
        if self.object_true is not None:
            self.object_true = check_complex_image(self.object_true, self.object_shape,
                                                   "object_true")
        if self.probe_modes_true is not None:
            modes = np.asarray(self.probe_modes_true)
            if modes.ndim != 3:
                raise DataFormatError(f"probe_modes_true must be (M, H, W), got shape "
                                      f"{modes.shape}")
            self.probe_modes_true = check_complex_image(
                modes, (modes.shape[0],) + self.frame_shape, "probe_modes_true")

    @property
    def n_frames(self) -> int:
        return int(self.intensities.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.intensities.shape[1:])  # type: ignore[return-value]

    def subset(self, index) -> "PtychoData":
        """The frames selected by ``index`` (slice, int array or bool mask)."""
        return PtychoData(self.intensities[index], self.positions[index], self.object_shape,
                          self.object_true, self.probe_true, dict(self.metadata),
                          self.probe_modes_true)

    def save(self, path) -> Path:
        """Write the NPZ file described in the module docstring; returns its path.

        The file is written under a temporary name and moved into place, so a
        reader never sees half a file.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = dict(self.metadata, format=FORMAT_NAME, version=FORMAT_VERSION)
        arrays = {
            "intensities": self.intensities.astype(np.float32, copy=False),
            "positions": self.positions.astype(np.int64, copy=False),
            "object_shape": np.asarray(self.object_shape, dtype=np.int64),
            "metadata": np.asarray(json.dumps(meta, sort_keys=True)),
        }
        if self.object_true is not None:
            arrays["object_true"] = self.object_true.astype(np.complex64, copy=False)
        if self.probe_true is not None:
            arrays["probe_true"] = self.probe_true.astype(np.complex64, copy=False)
        if self.probe_modes_true is not None:
            arrays["probe_modes_true"] = self.probe_modes_true.astype(np.complex64, copy=False)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "PtychoData":
        """Read a file written by :meth:`save`, checking its keys and layout."""
        path = Path(path)
        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"cannot read ptychography file {str(path)!r}: {exc}") from exc
        with npz:
            missing = [k for k in ("intensities", "positions", "object_shape", "metadata")
                       if k not in npz.files]
            if missing:
                raise DataFormatError(f"{str(path)!r} is not a {FORMAT_NAME} file: missing "
                                      f"key(s) {missing}; found {sorted(npz.files)}")
            try:
                meta = json.loads(str(npz["metadata"]))
            except ValueError as exc:
                raise DataFormatError(f"{str(path)!r}: metadata is not JSON ({exc})") from exc
            if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
                raise DataFormatError(f"{str(path)!r}: expected format {FORMAT_NAME!r} version "
                                      f"{FORMAT_VERSION}, got {meta.get('format')!r} version "
                                      f"{meta.get('version')!r}")
            return cls(
                intensities=npz["intensities"],
                positions=npz["positions"],
                object_shape=tuple(int(v) for v in npz["object_shape"]),
                object_true=npz["object_true"] if "object_true" in npz.files else None,
                probe_true=npz["probe_true"] if "probe_true" in npz.files else None,
                metadata=meta,
                probe_modes_true=(npz["probe_modes_true"] if "probe_modes_true" in npz.files
                                  else None),
            )


def load(path) -> PtychoData:
    """Read a ptychography NPZ file (see :meth:`PtychoData.load`)."""
    return PtychoData.load(path)


# --------------------------------------------------------------------------- object
def make_object(shape, *, amplitude_range=(0.5, 1.0), phase_range=(-math.pi / 3, math.pi / 3),
                amplitude_image: str = "camera", phase_image: str = "astronaut") -> np.ndarray:
    """Complex test object from two images bundled with scikit-image.

    Parameters
    ----------
    shape : (int, int)
        Object shape ``(Hy, Wx)`` in pixels.
    amplitude_range : (float, float)
        Transmission amplitude mapped from the darkest to the brightest pixel
        of ``amplitude_image`` (dimensionless, 0 < min <= max).
    phase_range : (float, float)
        Phase in radians mapped from the darkest to the brightest pixel of
        ``phase_image``.
    amplitude_image, phase_image : str
        Names of functions of :mod:`skimage.data` (colour images are turned
        grey with :func:`skimage.color.rgb2gray`).

    Returns
    -------
    ndarray, complex64, shape ``shape``
    """
    shape = shape2(shape, "shape")
    lo, hi = (float(v) for v in amplitude_range)
    if not (0 < lo <= hi):
        raise PtychoInputError(f"amplitude_range must satisfy 0 < min <= max, got {amplitude_range!r}")
    amp = _image01(amplitude_image, shape)
    pha = _image01(phase_image, shape)
    p0, p1 = (float(v) for v in phase_range)
    obj = (lo + (hi - lo) * amp) * np.exp(1j * (p0 + (p1 - p0) * pha))
    return obj.astype(np.complex64)


def _image01(name: str, shape) -> np.ndarray:
    import skimage.color
    import skimage.data
    import skimage.transform

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise PtychoInputError(f"image {name!r} is not a function of skimage.data "
                               f"(try 'camera', 'astronaut', 'moon', 'coins')")
    img = np.asarray(loader(), dtype=np.float64)
    if img.ndim == 3:
        img = skimage.color.rgb2gray(img[..., :3] / max(img.max(), 1))
    img = skimage.transform.resize(img, shape, anti_aliasing=True, mode="reflect")
    img = img - img.min()
    return img / max(img.max(), 1e-12)


# --------------------------------------------------------------------------- probe
def fresnel_propagate(wave, distance: float, *, wavelength: float = 1.0e-10,
                      pixel_size: float = 10.0e-9) -> np.ndarray:
    """Propagate a 2-D wave field by ``distance`` with the paraxial Fresnel kernel.

    Uses the transfer function ``H(f) = exp(-i pi lambda z |f|^2)`` applied in
    Fourier space (periodic boundaries).

    Parameters
    ----------
    wave : ndarray, complex, shape (H, W)
    distance : float
        Propagation distance ``z`` in metres (may be negative).
    wavelength : float
        Wavelength in metres (default 0.1 nm, about 12.4 keV).
    pixel_size : float
        Sample-plane pixel size in metres (default 10 nm).

    Returns
    -------
    ndarray, complex64, shape (H, W)
    """
    wave = np.asarray(wave, dtype=np.complex128)
    if wave.ndim != 2:
        raise PtychoInputError(f"wave must be 2-D, got shape {wave.shape}")
    if wavelength <= 0 or pixel_size <= 0:
        raise PtychoInputError(f"wavelength and pixel_size must be > 0, got {wavelength!r}, "
                               f"{pixel_size!r}")
    fy = np.fft.fftfreq(wave.shape[0], d=pixel_size)[:, None]
    fx = np.fft.fftfreq(wave.shape[1], d=pixel_size)[None, :]
    kernel = np.exp(-1j * np.pi * wavelength * distance * (fx ** 2 + fy ** 2))
    return np.fft.ifft2(np.fft.fft2(wave) * kernel).astype(np.complex64)


def make_probe(shape, *, kind: str = "aperture", diameter: float | None = None,
               power: float = DEFAULT_PROBE_POWER, propagation_distance: float = 0.0,
               wavelength: float = 1.0e-10, pixel_size: float = 10.0e-9) -> np.ndarray:
    """Illumination (probe) centred in a frame.

    Parameters
    ----------
    shape : (int, int)
        Frame shape ``(H, W)``.
    kind : {"aperture", "focused", "gaussian"}
        ``"aperture"``: a circular pinhole of the given ``diameter`` just
        upstream of the sample (edge smoothed over about a pixel), usually
        with some ``propagation_distance`` to give it Fresnel fringes.
        ``"focused"``: the focus of a lens with a circular aperture (an Airy
        pattern, the inverse FFT of a circular pupil); ``diameter`` is the
        diameter of its central lobe; its rings fill the frame, which makes
        the problem harder.  ``"gaussian"``: a Gaussian whose full width at
        half maximum is ``diameter``.
    diameter : float, optional
        Pixels; default ``0.375 * min(H, W)`` (48 for 128x128 frames).
    power : float
        ``sum |P|^2`` after normalisation (photons per frame for a fully
        transmitting object).
    propagation_distance : float
        Metres to Fresnel-propagate the probe (0: in focus).
    wavelength, pixel_size : float
        Metres, see :func:`fresnel_propagate`.

    Returns
    -------
    ndarray, complex64, shape ``shape``
    """
    h, w = shape2(shape, "shape")
    if kind not in PROBES:
        raise PtychoInputError(f"probe kind must be one of {PROBES}, got {kind!r}")
    d = 0.375 * min(h, w) if diameter is None else float(diameter)
    if not (0 < d < min(h, w)):
        raise PtychoInputError(f"probe diameter must be > 0 and < the frame size {min(h, w)}, "
                               f"got {d!r}")
    if power <= 0:
        raise PtychoInputError(f"probe power must be > 0, got {power!r}")
    y = np.arange(h) - h // 2
    x = np.arange(w) - w // 2
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    if kind == "gaussian":
        sigma = d / (2 * math.sqrt(2 * math.log(2)))
        probe = np.exp(-r ** 2 / (2 * sigma ** 2)).astype(np.complex128)
    elif kind == "aperture":
        # a pinhole of diameter d, its edge smoothed over about one pixel
        probe = (0.5 * (1.0 - np.tanh((r - d / 2) / 0.7))).astype(np.complex128)
    else:
        # Airy first zero at radius 0.61 * N / r_pupil pixels (pupil radius r_pupil in
        # Fourier pixels), so a central-lobe diameter d needs r_pupil = 1.22 * N / d.
        ry = 1.22 * h / d
        rx = 1.22 * w / d
        pupil = ((y[:, None] / ry) ** 2 + (x[None, :] / rx) ** 2 <= 1.0).astype(np.complex128)
        probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil)))
    if propagation_distance:
        probe = fresnel_propagate(probe, propagation_distance, wavelength=wavelength,
                                  pixel_size=pixel_size)
    probe = probe * math.sqrt(power / float(np.sum(np.abs(probe) ** 2)))
    return probe.astype(np.complex64)


def make_probe_modes(probe, powers, *, angle: float = 0.5) -> np.ndarray:
    """Orthogonal incoherent probe modes with the given power fractions.

    Mode 0 has the shape of ``probe``; mode ``k`` that of ``probe`` times a
    low-order Hermite-like factor (``u``, ``v``, ``u v``, with ``u, v`` the
    pixel coordinates about the probe's intensity centroid turned by
    ``angle`` radians, in units of its rms radius), made orthogonal to the
    ones before it (Gram-Schmidt, in order).  Mode ``k`` then gets
    ``powers[k]`` of the power of ``probe``.

    Parameters
    ----------
    probe : ndarray, complex, shape (H, W)
    powers : sequence of float
        2 to 4 fractions, decreasing, > 0; scaled to sum to 1.
    angle : float
        Radians: the extra modes' axes relative to the frame's.

    Returns
    -------
    ndarray, complex64, shape (len(powers), H, W)
    """
    from .options import MAX_PROBE_MODES

    main = np.asarray(probe, dtype=np.complex128)
    if main.ndim != 2 or not np.any(main):
        raise PtychoInputError(f"probe must be a non-zero 2-D array, got shape {main.shape}")
    try:
        fractions = np.asarray([float(p) for p in powers], dtype=np.float64)
    except (TypeError, ValueError):
        raise PtychoInputError(f"mode_powers must be a sequence of numbers, got {powers!r}") from None
    if not 2 <= len(fractions) <= MAX_PROBE_MODES:
        raise PtychoInputError(f"mode_powers must hold 2 to {MAX_PROBE_MODES} fractions, "
                               f"got {len(fractions)}")
    if not np.all(np.isfinite(fractions)) or np.any(fractions <= 0) \
            or np.any(np.diff(fractions) > 0):
        raise PtychoInputError(f"mode_powers must be positive and decreasing, got {list(powers)}")
    fractions = fractions / fractions.sum()
    power = np.abs(main) ** 2
    total = float(power.sum())
    h, w = main.shape
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    cy = float((power * y).sum()) / total
    cx = float((power * x).sum()) / total
    radius = max(np.sqrt(float((power * ((y - cy) ** 2 + (x - cx) ** 2)).sum()) / total), 1.0)
    c, s = math.cos(angle), math.sin(angle)
    u = (c * (x - cx) + s * (y - cy)) / radius
    v = (-s * (x - cx) + c * (y - cy)) / radius
    shapes = [main, main * u, main * v, main * u * v][:len(fractions)]
    basis = []
    for shape in shapes:
        for b in basis:
            shape = shape - np.vdot(b, shape) * b
        basis.append(shape / np.sqrt(float(np.vdot(shape, shape).real)))
    return np.stack([b * np.sqrt(f * total) for b, f in zip(basis, fractions)]).astype(np.complex64)


# --------------------------------------------------------------------------- scan
def scan_positions(n: int, step: float, *, pattern: str = "spiral", jitter: float = 0.0,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Scan positions (float pixels, centred on 0) of ``n`` points.

    Parameters
    ----------
    n : int
        Number of positions (> 0).
    step : float
        Distance between neighbouring points, in pixels.  For the Fermat
        spiral ``r_k = c sqrt(k)``, ``theta_k = k * 137.508 deg`` the nearest-
        neighbour distance is about ``1.9 c``, so ``c = step / 1.9``.
    pattern : {"spiral", "raster"}
    jitter : float
        Uniform random offset in ``[-jitter, jitter]`` pixels added to each
        coordinate (breaks the raster-grid ambiguity).
    rng : numpy.random.Generator, optional

    Returns
    -------
    ndarray, float64, shape (n, 2)
        (row, col) coordinates.
    """
    if int(n) <= 0:
        raise PtychoInputError(f"number of scan positions must be > 0, got {n!r}")
    if not step > 0:
        raise PtychoInputError(f"scan step must be > 0 pixels, got {step!r}")
    if pattern not in SCANS:
        raise PtychoInputError(f"scan pattern must be one of {SCANS}, got {pattern!r}")
    n = int(n)
    if pattern == "spiral":
        k = np.arange(n, dtype=np.float64)
        c = step / 1.9
        r = c * np.sqrt(k)
        theta = k * math.radians(137.50776405003785)
        pts = np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1)
    else:
        side = int(math.ceil(math.sqrt(n)))
        iy, ix = np.divmod(np.arange(n), side)
        pts = np.stack([iy * step, ix * step], axis=1).astype(np.float64)
    if jitter:
        rng = np.random.default_rng() if rng is None else rng
        pts = pts + rng.uniform(-jitter, jitter, size=pts.shape)
    return pts


# --------------------------------------------------------------------------- forward model
def far_field(probe: np.ndarray, obj: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Noise-free intensities ``|fftshift(FFT2_ortho(P * O_j))|^2``.

    Parameters
    ----------
    probe : complex ndarray (H, W)
    obj : complex ndarray (Hy, Wx)
    positions : int ndarray (N, 2), top-left offsets

    Returns
    -------
    ndarray, float32, shape (N, H, W)
    """
    from numpy.lib.stride_tricks import sliding_window_view

    h, w = probe.shape
    views = sliding_window_view(obj, (h, w))
    out = np.empty((len(positions), h, w), np.float32)
    chunk = 64
    for start in range(0, len(positions), chunk):  # chunks only bound memory use
        pos = positions[start:start + chunk]
        waves = probe[None] * views[pos[:, 0], pos[:, 1]]
        spec = np.fft.fftshift(np.fft.fft2(waves, norm="ortho"), axes=(-2, -1))
        out[start:start + chunk] = (spec.real ** 2 + spec.imag ** 2)
    return out


def simulate(frames: int = 512, frame_size: int = 128, *, overlap: float = 0.7,
             photons: float | None = None, seed: int = 0, probe: str = "aperture",
             probe_diameter: float | None = None, scan: str = "spiral",
             propagation_distance: float = 0.0, jitter: float | None = None,
             mode_powers=None) -> PtychoData:
    """Simulate a far-field ptychographic scan with ground truth.

    Parameters
    ----------
    frames : int
        Number of diffraction patterns ``N`` (default 512).
    frame_size : int
        Frame side ``H = W`` in pixels (default 128).
    overlap : float
        Linear overlap of neighbouring probe footprints, ``1 - step / diameter``,
        in ``[0, 1)`` (default 0.7).
    photons : float or None
        Photons per frame for a fully transmitting object; the intensities are
        then Poisson samples.  ``None`` (default): noise-free, probe power
        :data:`DEFAULT_PROBE_POWER`.
    seed : int
        Seed of the one random generator (Poisson noise, raster jitter).
    probe : {"aperture", "gaussian"}
        See :func:`make_probe`.
    probe_diameter : float, optional
        Pixels, see :func:`make_probe`.
    scan : {"spiral", "raster"}
    propagation_distance : float
        Metres, Fresnel propagation of the probe (0: in focus).
    jitter : float, optional
        Position jitter in pixels (default 0 for spirals, 1 for rasters).
    mode_powers : sequence of float, optional
        A partially coherent beam: 2 to 4 incoherent probe modes with these
        power fractions (decreasing; :func:`make_probe_modes`), e.g.
        ``(0.7, 0.3)``; the intensities are the sums of the modes'.  The
        modes are stored as ``probe_modes_true``, the first as ``probe_true``.

    Returns
    -------
    PtychoData
        Object shape is the scan extent plus one frame.
    """
    frames = int(frames)
    frame_size = int(frame_size)
    if frames <= 0:
        raise PtychoInputError(f"frames must be > 0, got {frames}")
    if frame_size < 8:
        raise PtychoInputError(f"frame_size must be >= 8 pixels, got {frame_size}")
    if not 0 <= overlap < 1:
        raise PtychoInputError(f"overlap must be in [0, 1), got {overlap!r}")
    if photons is not None and not photons > 0:
        raise PtychoInputError(f"photons must be > 0 or None, got {photons!r}")
    rng = np.random.default_rng(seed)
    diameter = 0.375 * frame_size if probe_diameter is None else float(probe_diameter)
    step = max(diameter * (1.0 - overlap), 1.0)
    if jitter is None:
        jitter = 1.0 if scan == "raster" else 0.0
    pts = scan_positions(frames, step, pattern=scan, jitter=jitter, rng=rng)
    pos = np.round(pts - pts.min(axis=0)).astype(np.int64)
    object_shape = (int(pos[:, 0].max()) + frame_size, int(pos[:, 1].max()) + frame_size)
    power = DEFAULT_PROBE_POWER if photons is None else float(photons)
    prb = make_probe((frame_size, frame_size), kind=probe, diameter=diameter, power=power,
                     propagation_distance=propagation_distance)
    obj = make_object(object_shape)
    modes = None
    if mode_powers is not None:
        modes = make_probe_modes(prb, mode_powers)
        intensities = far_field(modes[0], obj, pos)
        for mode in modes[1:]:
            intensities += far_field(mode, obj, pos)
        prb = modes[0]
    else:
        intensities = far_field(prb, obj, pos)
    if photons is not None:
        intensities = rng.poisson(intensities).astype(np.float32)
    meta = {
        "frames": frames, "frame_size": frame_size, "overlap": float(overlap),
        "photons": photons, "seed": int(seed), "probe": probe, "probe_diameter": diameter,
        "scan": scan, "scan_step": step, "propagation_distance": float(propagation_distance),
        "jitter": float(jitter), "object_amplitude": "skimage.data.camera -> [0.5, 1]",
        "object_phase": "skimage.data.astronaut grey -> [-pi/3, pi/3] rad",
        "intensity_convention": "|fftshift(fft2(P*O_j, norm='ortho'))|^2",
    }
    if modes is not None:
        meta["probe_modes"] = int(len(modes))
        meta["mode_powers"] = [float(v) for v in np.asarray(mode_powers, float)
                               / float(np.sum(mode_powers))]
        meta["intensity_convention"] = "sum_m |fftshift(fft2(P_m*O_j, norm='ortho'))|^2"
    return PtychoData(intensities, pos, object_shape, obj, prb, meta, modes)


def model_probe(data: PtychoData) -> np.ndarray:
    """Nominal probe of a simulated scan: its aperture kind and diameter, in focus.

    What an experimenter knows before reconstructing (the optics, not the
    exact defocus): the probe ``kind`` and ``probe_diameter`` from the
    metadata, without the Fresnel propagation, with the power of the mean
    measured frame.  Files without that metadata fall back to
    :func:`sparkmpi.ptycho.initial_probe` (from the mean diffraction pattern).
    """
    from .engines import initial_probe

    meta = data.metadata or {}
    kind = meta.get("probe")
    if kind not in PROBES or not meta.get("probe_diameter"):
        return initial_probe(data.intensities)
    power = float(data.intensities.sum(axis=(1, 2), dtype=np.float64).mean())
    return make_probe(data.frame_shape, kind=kind, diameter=float(meta["probe_diameter"]),
                      power=max(power, 1e-30))
