"""Frame-stack 2-D FFTs on the CPU: FFTW (pyFFTW) where it is faster, scipy.fft otherwise.

The exact distributed sums (docs/ptycho.md) need every frame's transform to
give the same bits whatever stack it is in: one process with all frames, a
rank with a block of them, the few frames that changed pixel in a position
refinement step, any number of threads.  :class:`FFTWStack` gets that by
construction: one single-threaded plan for :data:`CHUNK` frames, made with
``FFTW_ESTIMATE`` (the planner's choice then depends on the problem only,
not on timings taken in each process), executed chunk after chunk on the
stack in place; a short last chunk, or one whose memory is not aligned as
the plan needs, goes through the plan's own buffer.  Threads run their own
copies of the same plan on contiguous groups of chunks.  The orthonormal
scale is one float32 multiply per chunk while it is in cache.  The tests
check the per-frame bits against single-frame plans, other chunk offsets and
thread counts (``tests/test_ptycho_fft.py``).

``FFTW_ESTIMATE`` plans are fast for power-of-two frames and slower than
scipy's pocketfft otherwise (BENCHMARKS.md, issue 18): ``fft="auto"`` takes
FFTW for power-of-two frame sides when pyFFTW is installed, scipy.fft for
the rest.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import PtychoInputError

__all__ = ["CHUNK", "FFT_CHOICES", "FFTWStack", "ScipyStack", "choose_fft", "fftw_available",
           "make_stack_fft"]

#: Frames per FFTW plan execution (measured fastest of 8/16/32/64 at 128^2, BENCHMARKS.md).
CHUNK = 8
FFT_CHOICES = ("auto", "fftw", "scipy")


def import_pyfftw():
    """The ``pyfftw`` module, imported without its dask interface.

    ``import pyfftw`` imports ``pyfftw.interfaces``, which imports dask when it
    is installed (tiled brings it), and dask brings pandas and pyarrow: over a
    second of every rank's first import, and pyarrow's jemalloc thread, which
    keeps the rank fork server from preloading the engines.  The engines use
    only the ``FFTW`` class; a dask imported before or after is not affected.
    Raises ImportError when pyFFTW is not installed.
    """
    if "pyfftw" in sys.modules:
        return sys.modules["pyfftw"]
    block = "dask" not in sys.modules
    if block:
        sys.modules["dask"] = None   # pyfftw.interfaces then takes dask as absent
    try:
        import pyfftw
    finally:
        if block and sys.modules.get("dask", 0) is None:
            del sys.modules["dask"]
    return pyfftw


def fftw_available() -> bool:
    """Whether pyFFTW can be imported."""
    try:
        import_pyfftw()
    except ImportError:
        return False
    return True


def _power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def choose_fft(choice: str, frame_shape, backend_name: str = "numpy") -> str:
    """The FFT a ``choice`` from :data:`FFT_CHOICES` gives for these frames: ``"fftw"``,
    ``"scipy"``, or ``"cupy"`` on the GPU backend (where ``choice`` is ignored)."""
    if choice not in FFT_CHOICES:
        raise PtychoInputError(f"fft must be one of {FFT_CHOICES}, got {choice!r}")
    if backend_name != "numpy":
        return backend_name
    if choice == "scipy":
        return "scipy"
    if choice == "fftw":
        if not fftw_available():
            raise PtychoInputError("fft='fftw' needs pyFFTW (pip install pyfftw); "
                                   "use fft='auto' or 'scipy'")
        return "fftw"
    if fftw_available() and all(_power_of_two(int(n)) for n in frame_shape):
        return "fftw"
    return "scipy"


class ScipyStack:
    """Orthonormal in-place 2-D FFTs of a frame stack through ``backend.fft`` (scipy or CuPy)."""

    def __init__(self, fft_module, kwargs: dict, name: str = "scipy"):
        self.fft = fft_module
        self.kw = dict(kwargs)
        self.name = name

    def forward(self, x):
        spec = self.fft.fft2(x, **self.kw)
        if spec is not x:  # scipy.fft returns a new array even with overwrite_x
            x[...] = spec
        return x

    def inverse(self, x):
        back = self.fft.ifft2(x, **self.kw)
        if back is not x:
            x[...] = back
        return x

    def chunk_transforms(self, count: int, frame_shape) -> list:
        """``count`` :class:`ScipyChunk` (one per thread), for the engines' chunked pipeline."""
        return [ScipyChunk(self.fft, self.kw, frame_shape) for _ in range(count)]

    def close(self) -> None:
        pass


class ScipyChunk:
    """A :data:`CHUNK`-frame buffer and its orthonormal in-place FFTs through scipy.fft
    (one worker: the pipeline runs chunks in threads of its own).

    ``scale`` is None: pocketfft applies the orthonormal factor itself.
    """

    scale = None

    def __init__(self, fft_module, kwargs: dict, frame_shape):
        self.fft = fft_module
        self.kw = dict(kwargs)
        if "workers" in self.kw:
            self.kw["workers"] = 1
        self.buffer = np.zeros((CHUNK,) + tuple(frame_shape), dtype=np.complex64)

    def forward(self) -> None:
        spec = self.fft.fft2(self.buffer, **self.kw)
        if spec is not self.buffer:
            self.buffer[...] = spec

    def inverse(self) -> None:
        back = self.fft.ifft2(self.buffer, **self.kw)
        if back is not self.buffer:
            self.buffer[...] = back


class FFTWChunk:
    """A :data:`CHUNK`-frame aligned buffer with its own FFTW plans, the same plans
    (``FFTW_ESTIMATE``, same problem) as :class:`FFTWStack`'s, so the same bits per frame.

    The transforms are unscaled: ``scale`` (complex64 ``1 / sqrt(H W)``) is for the
    caller to apply while the chunk is in cache (:mod:`sparkmpi.ptycho._fused`).
    """

    def __init__(self, frame_shape):
        pyfftw = import_pyfftw()

        self.buffer = pyfftw.empty_aligned((CHUNK,) + tuple(frame_shape), dtype=np.complex64)
        self.buffer[...] = 0
        flags = ("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT")
        self._fwd = pyfftw.FFTW(self.buffer, self.buffer, axes=(1, 2), direction="FFTW_FORWARD",
                                flags=flags, threads=1)
        self._bwd = pyfftw.FFTW(self.buffer, self.buffer, axes=(1, 2),
                                direction="FFTW_BACKWARD", flags=flags, threads=1)
        self.scale = np.complex64(1.0 / np.sqrt(float(frame_shape[0] * frame_shape[1])))

    def forward(self) -> None:
        self._fwd.execute()

    def inverse(self) -> None:
        self._bwd.execute()


class FFTWStack:
    """Orthonormal in-place 2-D FFTs of complex64 frame stacks with fixed-size FFTW plans.

    Parameters
    ----------
    frame_shape : (H, W)
    threads : int
        Threads over groups of chunks (each with its own copy of the plans).
    """

    name = "fftw"

    def __init__(self, frame_shape, threads: int = 1):
        pyfftw = import_pyfftw()

        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.threads = max(1, int(threads))
        self.scale = np.float32(1.0 / np.sqrt(float(self.frame_shape[0] * self.frame_shape[1])))
        self.align = pyfftw.simd_alignment
        self._plans = []   # per thread: (buffer, forward plan, backward plan)
        for _ in range(self.threads):
            buf = pyfftw.empty_aligned((CHUNK,) + self.frame_shape, dtype=np.complex64)
            flags = ("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT")
            fwd = pyfftw.FFTW(buf, buf, axes=(1, 2), direction="FFTW_FORWARD", flags=flags,
                              threads=1)
            bwd = pyfftw.FFTW(buf, buf, axes=(1, 2), direction="FFTW_BACKWARD", flags=flags,
                              threads=1)
            self._plans.append((buf, fwd, bwd))
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="sparkmpi-fftw")
                      if self.threads > 1 else None)

    def _check(self, x) -> None:
        if x.dtype != np.complex64 or x.ndim != 3 or tuple(x.shape[1:]) != self.frame_shape:
            raise PtychoInputError(f"FFT stack must be complex64 (N, {self.frame_shape[0]}, "
                                   f"{self.frame_shape[1]}), got {x.dtype} {x.shape}")

    def _run_group(self, x, starts, slot: int, forward: bool) -> None:
        buf, fwd, bwd = self._plans[slot]
        plan = fwd if forward else bwd
        n = x.shape[0]
        direct = x.flags.c_contiguous and x.ctypes.data % self.align == 0
        for s in starts:
            blk = x[s:s + CHUNK]
            if direct and blk.shape[0] == CHUNK:
                plan.update_arrays(blk, blk)
                plan.execute()
                blk *= self.scale
            else:   # the plan's own aligned buffer, padded with zeros
                m = min(CHUNK, n - s)
                buf[:m] = blk
                buf[m:] = 0
                plan.update_arrays(buf, buf)
                plan.execute()
                np.multiply(buf[:m], self.scale, out=blk)

    def _run(self, x, forward: bool):
        self._check(x)
        starts = list(range(0, x.shape[0], CHUNK))
        if self._pool is None or len(starts) < 2:
            self._run_group(x, starts, 0, forward)
            return x
        groups = [g for g in np.array_split(np.asarray(starts), self.threads) if len(g)]
        futures = [self._pool.submit(self._run_group, x, g.tolist(), slot, forward)
                   for slot, g in enumerate(groups[1:], start=1)]
        self._run_group(x, groups[0].tolist(), 0, forward)
        for f in futures:
            f.result()
        return x

    def forward(self, x):
        """In-place orthonormal forward FFT of each frame of ``x`` (complex64 (N, H, W))."""
        return self._run(x, True)

    def inverse(self, x):
        """In-place orthonormal inverse FFT of each frame of ``x``."""
        return self._run(x, False)

    def chunk_transforms(self, count: int, frame_shape=None) -> list:
        """``count`` :class:`FFTWChunk` (one per thread), for the engines' chunked pipeline."""
        return [FFTWChunk(self.frame_shape) for _ in range(count)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def make_stack_fft(backend, frame_shape, choice: str, kwargs: dict, threads: int):
    """:class:`FFTWStack` or :class:`ScipyStack` for ``choice`` (see :func:`choose_fft`)."""
    kind = choose_fft(choice, frame_shape, backend.name)
    if kind == "fftw":
        return FFTWStack(frame_shape, threads)
    return ScipyStack(backend.fft, kwargs, kind)
