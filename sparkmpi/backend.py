"""Array backend switch: NumPy always, CuPy when a GPU and CuPy are present.

Numerical code takes ``xp`` (the array module) from :func:`get_backend` and
never imports numpy or cupy directly for array math, so the same function runs
on either.  ``fft`` is the matching FFT module (``scipy.fft`` with worker
threads on the CPU, ``cupyx.scipy.fft`` on the GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .config import setting
from .errors import InvalidArgument

BACKENDS = ("numpy", "cupy")


@dataclass(frozen=True)
class Backend:
    """An array module with its FFT module.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.
    xp : module
        ``numpy`` or ``cupy``.
    fft : module
        FFT functions with a ``workers`` keyword (scipy.fft) or the CuPy
        equivalent.
    """

    name: str
    xp: ModuleType
    fft: ModuleType

    def asnumpy(self, array: Any):
        """Return ``array`` as a NumPy array (a copy from the GPU for CuPy)."""
        if self.name == "cupy":
            return self.xp.asnumpy(array)
        return array

    def synchronize(self) -> None:
        """Wait for queued GPU work (no-op on the CPU), for honest timings."""
        if self.name == "cupy":
            self.xp.cuda.Stream.null.synchronize()

    @property
    def fft_workers(self) -> int | None:
        """Threads for scipy.fft on the CPU (all cores by default)."""
        if self.name == "cupy":
            return None
        return setting("fft_workers") or os.cpu_count() or 1


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA runtime errors without a GPU
        return False


def get_backend(name: str = "numpy") -> Backend:
    """Return the backend called ``name`` (``"numpy"``, ``"cupy"`` or ``"auto"``).

    ``"auto"`` picks CuPy when :func:`cupy_available`, else NumPy.

    Raises
    ------
    ValueError
        If ``name`` is not one of the choices, or CuPy was asked for and is
        not usable on this machine.
    """
    if name == "auto":
        name = "cupy" if cupy_available() else "numpy"
    if name == "numpy":
        import numpy
        import scipy.fft

        return Backend("numpy", numpy, scipy.fft)
    if name == "cupy":
        if not cupy_available():
            raise InvalidArgument("backend='cupy' needs CuPy and a CUDA GPU; none is usable here "
                             "(use backend='numpy' or 'auto')")
        import cupy
        import cupyx.scipy.fft

        return Backend("cupy", cupy, cupyx.scipy.fft)
    raise InvalidArgument(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
