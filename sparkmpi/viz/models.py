"""What the viewer shows, computed from arrays and display settings; no web server, no VTK.

:class:`VolumeModel` gives the three orthogonal slices of a volume as images,
:class:`PtychoModel` the phase, amplitude, probe and error-curve images of a
ptychographic result.  The trame app (:mod:`sparkmpi.viz.app`) puts these
strings into its state; tests call them directly.
"""

from __future__ import annotations

import numpy as np

from .images import (
    colorize,
    error_curve_svg,
    phase_image,
    png_data_url,
    robust_range,
    svg_data_url,
    window_range,
)
from .loaders import PtychoResult
from ..errors import InvalidArgument, InvalidArgumentType

__all__ = ["AXES", "VolumeModel", "PtychoModel"]

# axis name -> array axis of a (nz, ny, nx) volume
AXES = {"z": 0, "y": 1, "x": 2}


class VolumeModel:
    """A volume and its display window.

    Parameters
    ----------
    volume : ndarray float32, (nz, ny, nx)
    """

    def __init__(self, volume):
        vol = np.asarray(volume)
        if vol.ndim != 3 or min(vol.shape) < 2:
            raise InvalidArgument(f"volume must have shape (nz, ny, nx) with every axis >= 2, got {vol.shape}")
        self.volume = np.ascontiguousarray(vol, dtype=np.float32)
        self.data_range = robust_range(self.volume)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.volume.shape)

    def window(self, level: float, width: float) -> tuple[float, float]:
        """Values ``(lo, hi)`` of a window given as fractions of the robust data range."""
        return window_range(*self.data_range, level, width)

    def slice_array(self, axis: str, index: int) -> np.ndarray:
        """The 2-D slice at ``index`` along ``axis`` (``"z"``, ``"y"`` or ``"x"``).

        ``z`` slices are shown as stored (y down, x right); ``y`` and ``x``
        slices are flipped so that z points up.
        """
        if axis not in AXES:
            raise InvalidArgument(f"axis must be one of {sorted(AXES)}, got {axis!r}")
        n = self.shape[AXES[axis]]
        if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise InvalidArgument(f"index along {axis} must be an integer in [0, {n - 1}], got {index!r}")
        if axis == "z":
            return self.volume[index]
        if axis == "y":
            return self.volume[::-1, index, :]
        return self.volume[::-1, :, index]

    def slice_url(self, axis: str, index: int, level: float, width: float, cmap: str) -> str:
        """The slice as a PNG data URL, coloured with ``cmap`` over the window."""
        lo, hi = self.window(level, width)
        return png_data_url(colorize(self.slice_array(axis, index), lo, hi, cmap))


class PtychoModel:
    """A ptychographic result and how to show it.

    Parameters
    ----------
    result : PtychoResult
    """

    def __init__(self, result: PtychoResult):
        if not isinstance(result, PtychoResult):
            raise InvalidArgumentType(f"result must be a PtychoResult, got {type(result).__name__}")
        self.result = result
        self.phase = phase_image(result.object)
        self.amplitude = np.abs(result.object).astype(np.float32)
        h, w = self.phase.shape
        # display ranges from the central half, where a scan illuminates
        self._centre = (slice(h // 4, h - h // 4 or h), slice(w // 4, w - w // 4 or w))

    def _clip_range(self, image: np.ndarray, clip: float) -> tuple[float, float]:
        if not 0.0 <= clip < 50.0:
            raise InvalidArgument(f"clip must be a percentage in [0, 50), got {clip!r}")
        return robust_range(image[self._centre], percentiles=(clip, 100.0 - clip))

    def phase_url(self, clip: float = 0.5, cmap: str = "grey") -> str:
        return png_data_url(colorize(self.phase, *self._clip_range(self.phase, clip), cmap))

    def amplitude_url(self, clip: float = 0.5, cmap: str = "grey") -> str:
        return png_data_url(colorize(self.amplitude, *self._clip_range(self.amplitude, clip), cmap))

    def probe_url(self, cmap: str = "grey") -> str:
        if self.result.probe is None:
            return ""
        amp = np.abs(self.result.probe)
        return png_data_url(colorize(amp, 0.0, float(amp.max()) or 1.0, cmap))

    def errors_url(self) -> str:
        return svg_data_url(error_curve_svg(self.result.errors))

    def info(self) -> str:
        """One line of figures: shape, iterations, last error and what the summary holds."""
        r = self.result
        parts = [f"object {r.object.shape[0]}x{r.object.shape[1]}"]
        if r.probe is not None:
            parts.append(f"probe {r.probe.shape[0]}x{r.probe.shape[1]}")
        if r.errors.size:
            parts.append(f"{r.errors.size} iterations, last error {r.errors[-1]:.3g}")
        for key in ("algorithm", "nrmse", "frames", "iteration", "batch"):
            value = r.summary.get(key)
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            elif isinstance(value, (int, str)):
                parts.append(f"{key} {value}")
        return " · ".join(parts)
