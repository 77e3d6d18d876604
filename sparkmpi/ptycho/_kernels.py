"""Backend-specific pieces of the engines: frame gathers, the object scatter-add,
the Fourier-modulus projection, and the sum-over-ranks hook.

Everything else in :mod:`sparkmpi.ptycho.engines` is written once over the
array module ``xp``.  The few operations below have a faster form on one
backend than the generic one, so each has a NumPy and a CuPy branch:

* gather ``O_j = O[r_j : r_j + H, c_j : c_j + W]`` for all frames: NumPy
  fancy-indexes a read-only ``sliding_window_view`` (row copies), CuPy takes
  from precomputed flat indices;
* scatter-add ``sum_j shift(X_j, r_j)`` into an object-sized array: NumPy
  multiplies by a precomputed sparse 0/1 matrix in CSC layout (it streams the
  frames once; two column blocks run in two threads because SciPy's sparse
  kernels release the GIL), CuPy adds with float64 atomics in one kernel.
  The sums are complex128 on both: float32 partial sums differ with the split
  of the frames over ranks, and probe refinement amplifies the difference
  past the 1e-4 bound (docs/ptycho.md);
* ``sum_j shift(|P|^2, r_j)``: a circular convolution of the scan's
  position comb with ``|P|^2`` through object-sized real FFTs (exact, since
  every frame lies inside the object).

Each NumPy form is the fastest of those compared in BENCHMARKS.md
("Ptychography: why the code is written as it is").
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import Backend
from ..errors import InvalidArgument


# --------------------------------------------------------------------------- the hook
def allreduce_sums(comm, arrays, backend: Backend | None = None) -> None:
    """Sum arrays element-wise across the ranks of ``comm``, in place.

    This is the one place where partial sums over frames (the object and
    probe numerators and denominators of Thibault et al. 2009, the paper's
    eqs. 4 and 5, and the Fourier error) are combined across ranks.

    Parameters
    ----------
    comm : mpi4py-like communicator or None
        Needs ``size`` and ``Allreduce(sendbuf, recvbuf, op=...)`` accepting
        ``MPI.IN_PLACE``.  ``None`` or ``size == 1``: nothing to do.
    arrays : sequence of arrays
        NumPy or CuPy arrays (any real or complex dtype), each C-contiguous.
        Arrays of the same real dtype (complex64 counts as float32) travel in
        one ``Allreduce``.  CuPy arrays go through host memory.
    backend : Backend, optional
        Needed to copy CuPy arrays to and from the host.
    """
    if comm is None or int(getattr(comm, "size", 1)) <= 1:
        return
    from mpi4py import MPI

    groups: dict[np.dtype, list] = {}
    for arr in arrays:
        if arr.dtype.kind == "c":
            real = np.dtype(np.float32) if arr.dtype == np.complex64 else np.dtype(np.float64)
        else:
            real = np.dtype(arr.dtype)
        groups.setdefault(real, []).append(arr)
    for real, members in groups.items():
        on_gpu = backend is not None and backend.name == "cupy"
        hosts = [backend.asnumpy(a) if on_gpu else a for a in members]
        if len(hosts) == 1 and hosts[0].flags.c_contiguous and not on_gpu:
            buf = hosts[0].reshape(-1).view(real)
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            continue
        buf = np.concatenate([np.ascontiguousarray(h).reshape(-1).view(real) for h in hosts])
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        start = 0
        for arr, host in zip(members, hosts):
            n = host.size * (2 if host.dtype.kind == "c" else 1)
            part = buf[start:start + n].view(host.dtype).reshape(host.shape)
            start += n
            if on_gpu:
                arr.set(part)
            else:
                arr[...] = part


def allreduce_max(comm, values) -> np.ndarray:
    """Element-wise maximum of a short float64 vector over the ranks (exact in any order)."""
    buf = np.array(values, dtype=np.float64).reshape(-1)
    if comm is not None and int(getattr(comm, "size", 1)) > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return buf


class ExactSums:
    """Sums over frames and ranks that do not depend on how the frames are split.

    Each part (an array to be summed over frames: an object or probe
    numerator, a denominator) gets a power-of-two ``scale``; the caller's
    ``fill(scales)`` adds ``rint(contribution * scale)`` for each of its frames
    into :attr:`views` (zeroed first) and returns the largest ``|q|`` it added
    per part.  With every ``|q| <= 2**52 / cover`` (``cover``: the most frames
    that add into one element, over all ranks) every partial sum, in any order,
    is an integer below ``2**52``, so float64 adds it exactly: per-rank sums,
    thread sums and the float64 ``MPI_Allreduce`` give the same numbers for
    any number of ranks.  All parts travel in one ``Allreduce`` with one
    overflow flag each.

    The scale for the next call is set from the peak of this call's sums
    (identical on every rank), with a margin of ``2**margin_bits``.  A call
    whose contributions would exceed the bound anywhere (a global flag) is
    redone with the scale from the global maximum (an extra ``MPI.MAX``);
    the decision is the same on every rank and for every split.

    Parameters
    ----------
    comm : mpi4py-like communicator or None
    parts : list of (shape, is_complex)
        A complex part's :attr:`views` entry is a pair of float64 planes
        (real, imaginary), shape ``(2, *shape)``; :meth:`reduce` returns it as
        complex128.
    covers : list of int
        Upper bound on the number of contributions per element, all ranks.
    estimates : list of float
        Expected magnitude of one contribution per part, the same on every
        rank (sets the first scale).
    """

    LIMIT = 2.0 ** 52

    def __init__(self, comm, parts, covers, estimates, margin_bits: int = 4):
        self.comm = comm
        self.margin = int(margin_bits)
        self.covers = [max(1.0, float(c)) for c in covers]
        sizes = [int(np.prod(shape)) * (2 if cplx else 1) for shape, cplx in parts]
        self.buf = np.zeros(sum(sizes) + len(parts), dtype=np.float64)
        self.views = []
        start = 0
        for (shape, cplx), size in zip(parts, sizes):
            part = self.buf[start:start + size]
            # complex parts as two planes (real, imaginary): shape (2, *shape)
            self.views.append(part.reshape((2,) + tuple(shape)) if cplx
                              else part.reshape(shape))
            start += size
        self.complex = [bool(cplx) for _, cplx in parts]
        self.flags = self.buf[start:]
        self.exponents = [self._exponent(i, est) for i, est in enumerate(estimates)]

    def _exponent(self, i: int, magnitude: float) -> int:
        magnitude = float(magnitude)
        if not math.isfinite(magnitude) or magnitude <= 0:
            magnitude = 1.0
        e = math.floor(52 - self.margin - math.log2(self.covers[i] * magnitude))
        return int(min(max(e, -1000), 1000))

    def reduce(self, fill, totals: bool = True) -> list:
        """Run ``fill(scales)`` and sum over ranks; returns the sums (new float64 arrays),
        or with ``totals=False`` each part's ``1 / scale``: the sums are then
        ``views[i] / scale`` (read them before the next call)."""
        while True:
            self.buf.fill(0.0)
            scales = [math.ldexp(1.0, e) for e in self.exponents]
            tops = [float(t) for t in fill(scales)]
            for i, top in enumerate(tops):
                self.flags[i] = 1.0 if top * self.covers[i] > self.LIMIT else 0.0
            allreduce_sums(self.comm, [self.buf])
            over = [i for i in range(len(tops)) if self.flags[i] > 0]
            if not over:
                break
            peak = allreduce_max(self.comm, [t / s for t, s in zip(tops, scales)])
            for i in over:
                self.exponents[i] = min(self._exponent(i, peak[i]), self.exponents[i] - 1)
        out = []
        for i, view in enumerate(self.views):
            # max |x| as max(max x, -min x): the same number, no temporary array
            peak = (float(np.maximum(view.max(), -view.min())) / scales[i]
                    if view.size else 0.0)
            if peak > 0:   # a part left empty this time keeps its scale
                self.exponents[i] = self._exponent(i, peak)
            inv = 1.0 / scales[i]   # a power of two: exact
            if not totals:
                out.append(inv)
                continue
            if self.complex[i]:
                total = np.empty(view.shape[1:], dtype=np.complex128)
                np.multiply(view[0], inv, out=total.real)
                np.multiply(view[1], inv, out=total.imag)
            else:
                total = view * inv
            out.append(total)
        return out


# --------------------------------------------------------------------------- geometry
class Geometry:
    """Gathers frames out of, and scatter-adds frames into, an object array.

    Parameters
    ----------
    backend : Backend
    positions : ndarray, int, shape (N, 2)
        Top-left (row, col) offsets, already validated.
    frame_shape : (int, int)
    object_shape : (int, int)
    threads : int
        Threads for the NumPy scatter (1 disables threading).
    """

    def __init__(self, backend: Backend, positions: np.ndarray, frame_shape, object_shape,
                 threads: int = 1):
        self.backend = backend
        self.xp = backend.xp
        self.positions = np.asarray(positions, dtype=np.int64)
        self.frame_shape = tuple(frame_shape)
        self.object_shape = tuple(object_shape)
        n = len(self.positions)
        h, w = self.frame_shape
        oh, ow = self.object_shape
        start = self.positions[:, 0] * ow + self.positions[:, 1]
        self._comb = np.bincount(start, minlength=oh * ow).reshape(oh, ow).astype(np.float32)
        self._pool = None
        if backend.name == "cupy":
            xp = self.xp
            # frame pixel -> object pixel is computed inside the kernels from the
            # positions: no index arrays in GPU memory
            self._py = xp.asarray(self.positions[:, 0].astype(np.int32))
            self._px = xp.asarray(self.positions[:, 1].astype(np.int32))
            self._k = _cupy_geometry_kernels()
        else:
            # the sparse scatter matrix (and its N x H x W index) is built on first use: the
            # CPU engine's kernels never need it, and it is rebuilt when positions change
            self.threads = max(1, min(int(threads), n))
            self._csc = None
        self._rows = self.positions[:, 0]
        self._cols = self.positions[:, 1]
        self._comb_spectrum = None

    def _build_scatter(self) -> None:
        import scipy.sparse

        n = len(self.positions)
        h, w = self.frame_shape
        ow = self.object_shape[1]
        base = (np.arange(h)[:, None] * ow + np.arange(w)[None, :]).astype(np.int64)
        start = self.positions[:, 0] * ow + self.positions[:, 1]
        flat = (start[:, None, None] + base[None]).reshape(-1)
        k = flat.size
        # CSC: column k (one frame pixel) has a single 1 in row flat[k].
        ones = np.ones(k, dtype=np.complex128)   # complex128 sums (module docstring)
        indptr = np.arange(k + 1, dtype=np.int64 if k >= 2**31 else np.int32)
        self._csc = scipy.sparse.csc_matrix(
            (ones, flat.astype(indptr.dtype), indptr),
            shape=(self.object_shape[0] * self.object_shape[1], k))
        if self.threads > 1:
            edges = np.linspace(0, n, self.threads + 1).astype(int) * (h * w)
            self._parts = [(a, b, self._csc[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ptycho-scatter")

    def set_comb(self, comb) -> None:
        """Use ``comb`` (frames per top-left offset, float, object-shaped) for
        :meth:`scatter_probe_power`: the scan's global comb (summed over ranks)
        makes the object denominator the same on every rank, with no Allreduce."""
        comb = np.asarray(comb, dtype=np.float64)
        if comb.shape != self.object_shape:
            raise InvalidArgument(f"comb must have shape {self.object_shape}, got {comb.shape}")
        self._comb = comb
        self._comb_spectrum = None

    def coverage(self) -> int:
        """Most frames (of the comb) that cover one object pixel."""
        oh, ow = self.object_shape
        h, w = self.frame_shape
        # the frames covering pixel (y, x) start in the h x w box ending there: box sums of
        # the comb from its summed-area table (integer counts, exact in float64), with h
        # zero rows and w zero columns in front for the boxes that reach past the edge
        table = np.zeros((oh + h, ow + w), dtype=np.float64)
        np.cumsum(np.cumsum(np.asarray(self._comb, np.float64), axis=0), axis=1,
                  out=table[h:, w:])
        boxes = table[h:, w:] - table[:oh, w:] - table[h:, :ow] + table[:oh, :ow]
        return int(np.rint(boxes.max()))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def gather(self, obj, out=None):
        """Frames ``O[r_j:r_j+H, c_j:c_j+W]``, shape (N, H, W) (a new array if ``out`` is None)."""
        if self.backend.name == "cupy":
            h, w = self.frame_shape
            res = self.xp.empty((len(self.positions), h, w), dtype=self.xp.complex64) \
                if out is None else out
            self._k["gather"](obj, self._py, self._px, np.int32(h), np.int32(w),
                              np.int32(self.object_shape[1]), res)
            return res
        else:
            from numpy.lib.stride_tricks import sliding_window_view

            res = sliding_window_view(obj, self.frame_shape)[self._rows, self._cols]
        if out is None:
            return res
        out[...] = res
        return out

    def gather_at(self, obj, positions, out):
        """Frames of ``obj`` at other whole-pixel ``positions`` (N, 2), into ``out`` (N, H, W)."""
        pos = np.asarray(positions, dtype=np.int64)
        h, w = self.frame_shape
        if self.backend.name == "cupy":
            xp = self.xp
            self._k["gather"](obj, xp.asarray(pos[:, 0].astype(np.int32)),
                              xp.asarray(pos[:, 1].astype(np.int32)), np.int32(h), np.int32(w),
                              np.int32(self.object_shape[1]), out)
            return out
        from numpy.lib.stride_tricks import sliding_window_view

        out[...] = sliding_window_view(obj, self.frame_shape)[pos[:, 0], pos[:, 1]]
        return out

    def gather_multiply(self, obj, probe, out):
        """``out = probe * gather(obj)`` (the overlap-constrained exit waves)."""
        if self.backend.name == "cupy":
            h, w = self.frame_shape
            self._k["gather_mul"](obj, probe, self._py, self._px, np.int32(h), np.int32(w),
                                  np.int32(self.object_shape[1]), out)
        else:
            frames = self.gather(obj)
            np.multiply(frames, probe, out=out)
        return out

    def scatter(self, frames):
        """``sum_j shift(frames_j, r_j)``: complex128 object-shaped array."""
        shape = self.object_shape
        if self.backend.name == "cupy":
            return self.scatter_conj_mul(frames, None)
        vec = frames.reshape(-1)
        if self._csc is None:
            self._build_scatter()
        if self._pool is None:
            return (self._csc @ vec).reshape(shape)
        futures = [self._pool.submit(m.__matmul__, vec[a:b]) for a, b, m in self._parts[1:]]
        a, b, m = self._parts[0]
        acc = m @ vec[a:b]
        for fut in futures:
            acc += fut.result()
        return acc.reshape(shape)

    def scatter_conj_mul(self, frames, probe):
        """``sum_j shift(frames_j * conj(probe), r_j)`` (``probe`` None: no product).

        CuPy: one kernel, float64 atomic adds of real and imaginary parts.
        NumPy: the product into a new array, then :meth:`scatter`.  Either way
        a complex128 array.
        """
        if self.backend.name != "cupy":
            return self.scatter(frames if probe is None else frames * np.conj(probe))
        xp = self.xp
        h, w = self.frame_shape
        acc = xp.zeros(self.object_shape, dtype=xp.complex128)
        if probe is None:
            probe = xp.ones((h, w), dtype=xp.complex64)
        self._k["scatter"](frames, probe, self._py, self._px, np.int32(h), np.int32(w),
                           np.int32(self.object_shape[1]), acc.view(xp.float64))
        return acc

    def scatter_probe_power(self, probe):
        """``sum_j shift(|P|^2, r_j)``: float32 object-shaped array, via FFT convolution.

        ``probe`` (M, H, W): ``sum_j shift(sum_m |P_m|^2, r_j)``."""
        xp, fft = self.xp, self.backend.fft
        oh, ow = self.object_shape
        h, w = self.frame_shape
        # float64: the per-rank partial sums then agree with one process to ~1e-15
        power = xp.zeros((oh, ow), dtype=xp.float64)
        frame_power = probe.real.astype(xp.float64) ** 2 + probe.imag.astype(xp.float64) ** 2
        if frame_power.ndim == 3:   # incoherent modes (M, H, W): their powers add
            frame_power = frame_power.sum(axis=0)
        power[:h, :w] = frame_power
        # A frame ends inside the object, so the circular convolution over any larger
        # zero-padded plane is the same; one of 2-3-5 size avoids a slow FFT length
        # (466 = 2 x 233, a prime, for the bench's scan).
        from scipy.fft import next_fast_len

        size = (next_fast_len(oh, real=True), next_fast_len(ow, real=True))
        if self._comb_spectrum is None:
            self._comb_spectrum = fft.rfft2(xp.asarray(self._comb, dtype=xp.float64), s=size)
        conv = fft.irfft2(self._comb_spectrum * fft.rfft2(power, s=size), s=size)[:oh, :ow]
        conv = xp.maximum(conv, 0)  # FFT round-off leaves tiny negatives
        return conv.astype(xp.float32)


# --------------------------------------------------------------------------- Fourier step
def fft_kwargs(backend: Backend) -> dict:
    kw = {"axes": (-2, -1), "norm": "ortho", "overwrite_x": True}
    if backend.name == "numpy":
        kw["workers"] = backend.fft_workers
    return kw


_CUPY_KERNELS: dict = {}

_OFFSET = """
    int hw = H * W;
    int j = i / hw;
    int rem = i - j * hw;
    int r = rem / W;
    long long o = (long long)(py[j] + r) * Wx + px[j] + (rem - r * W);
"""


# float64 atomicAdd exists from compute capability 6.0 (Pascal) on; older GPUs
# get the compare-and-swap loop of CUDA's programming guide.
_ATOMIC_ADD_F64 = """
__device__ __forceinline__ void sparkmpi_add_f64(double* address, double value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
    unsigned long long int* bits = (unsigned long long int*)address;
    unsigned long long int seen = *bits, expected;
    do {
        expected = seen;
        seen = atomicCAS(bits, expected,
                         __double_as_longlong(value + __longlong_as_double(expected)));
    } while (expected != seen);
#else
    atomicAdd(address, value);
#endif
}
"""


def _cupy_geometry_kernels():
    import cupy

    if "gather" not in _CUPY_KERNELS:
        args = "raw int32 py, raw int32 px, int32 H, int32 W, int32 Wx"
        _CUPY_KERNELS["gather"] = cupy.ElementwiseKernel(
            "raw complex64 obj, " + args, "complex64 out",
            _OFFSET + "out = obj[o];", "sparkmpi_ptycho_gather")
        _CUPY_KERNELS["gather_mul"] = cupy.ElementwiseKernel(
            "raw complex64 obj, raw complex64 probe, " + args, "complex64 out",
            _OFFSET + "out = obj[o] * probe[rem];", "sparkmpi_ptycho_gather_mul")
        _CUPY_KERNELS["scatter"] = cupy.ElementwiseKernel(
            "complex64 v, raw complex64 probe, " + args, "raw float64 acc",
            _OFFSET + """
            complex<float> x = v * conj(probe[rem]);
            sparkmpi_add_f64(&acc[2 * o], (double)x.real());
            sparkmpi_add_f64(&acc[2 * o + 1], (double)x.imag());
            """, "sparkmpi_ptycho_scatter", preamble=_ATOMIC_ADD_F64)
    return _CUPY_KERNELS


def _cupy_kernels():
    import cupy

    if "project" not in _CUPY_KERNELS:
        _CUPY_KERNELS["project"] = cupy.ElementwiseKernel(
            "float32 a, float32 scale", "complex64 x",
            "x = x * (scale * a / (abs(x) + 1e-12f));",
            "sparkmpi_ptycho_modulus_project")
        # Squared misfits into a buffer, then per-frame row sums: a ReductionKernel
        # straight to one scalar is about 100x slower (BENCHMARKS.md).
        _CUPY_KERNELS["misfit"] = cupy.ElementwiseKernel(
            "complex64 x, float32 a", "float32 d",
            "float m = abs(x) - a; d = m * m;", "sparkmpi_ptycho_modulus_misfit")
    return _CUPY_KERNELS


class Fourier:
    """Frame-stack FFTs and the Fourier-modulus constraint.

    The engines keep their iterate in Fourier space, so the modulus
    projection ``Pi_F(X) = a X / |X|`` needs no transform, and the misfit of
    the overlap-consistent waves ``F(P O_j)`` is exact.  ``a = sqrt(I)`` is
    stored with zero frequency at index 0 (the data's ``fftshift`` is undone
    once, here).

    Parameters
    ----------
    backend : Backend
    amplitudes : backend array, float32, shape (N, H, W)
        ``sqrt(I)``, already ``ifftshift``-ed.
    """

    def __init__(self, backend: Backend, amplitudes, workers: int | None = None,
                 fft: str = "auto"):
        from ._fft import make_stack_fft

        self.backend = backend
        self.xp = backend.xp
        self.a = amplitudes
        self.kw = fft_kwargs(backend)
        if workers is not None and "workers" in self.kw:
            self.kw["workers"] = max(1, int(workers))
        self.stack_fft = make_stack_fft(backend, tuple(amplitudes.shape[1:]), fft, self.kw,
                                        int(self.kw.get("workers") or 1))
        self._m = None
        if backend.name == "cupy":
            self._k = _cupy_kernels()

    @property
    def m(self):
        """Stack-sized float32 scratch (allocated on first use)."""
        if self._m is None:
            self._m = self.xp.empty(self.a.shape, self.xp.float32)
        return self._m

    @property
    def fft_name(self) -> str:
        """The FFT in use: ``"fftw"``, ``"scipy"`` or ``"cupy"`` (:mod:`sparkmpi.ptycho._fft`)."""
        return self.stack_fft.name

    def forward(self, x):
        """In-place orthonormal 2-D FFT of each frame of ``x`` (complex64 (N, H, W))."""
        return self.stack_fft.forward(x)

    def inverse(self, x):
        """In-place orthonormal inverse 2-D FFT of each frame of ``x``."""
        return self.stack_fft.inverse(x)

    def chunk_transforms(self, count: int) -> list:
        """``count`` chunk FFTs (buffer of ``CHUNK`` frames, own plans; one per thread) with
        the stack FFT's per-frame bits, for the CPU engine's pipeline (:mod:`._fft`)."""
        return self.stack_fft.chunk_transforms(count, tuple(self.a.shape[1:]))

    def close(self) -> None:
        self.stack_fft.close()

    def misfit(self, spec):
        """``sum (|X| - a)^2`` over all frames (a float, or a 0-d CuPy array)."""
        if self.backend.name == "cupy":
            self._k["misfit"](spec, self.a, self.m)
            rows = self.m.reshape(self.m.shape[0], -1).sum(axis=1, dtype=self.xp.float64)
            return rows.sum()
        m = self.m
        np.abs(spec, out=m)
        m -= self.a
        flat = m.reshape(-1)
        return float(np.dot(flat, flat))

    def project(self, spec, scale: float = 1.0):
        """In place: ``X <- scale * a * X / |X|``."""
        if self.backend.name == "cupy":
            self._k["project"](self.a, np.float32(scale), spec)
            return spec
        m = self.m
        np.abs(spec, out=m)
        m += np.float32(1e-12)
        np.divide(self.a, m, out=m)
        if scale != 1.0:
            m *= np.float32(scale)
        np.multiply(spec, m, out=spec)
        return spec


class ModalFourier:
    """:class:`Fourier` for exit waves with incoherent modes, shape (N, M, H, W).

    The transforms run on the (N * M, H, W) view of the stack.  A frame's
    modes share its measured modulus: ``Pi_F`` scales every mode's wave by
    ``a / sqrt(sum_m |X_m|^2)`` and the misfit is ``sum (sqrt(sum_m |X_m|^2) - a)^2``
    (Thibault & Menzel 2013).

    Parameters
    ----------
    fourier : Fourier
        The single-mode one, for the FFTs and the amplitudes ``a`` (N, H, W).
    """

    def __init__(self, fourier: Fourier):
        self.single = fourier
        self.backend = fourier.backend
        self.xp = fourier.xp
        self.a = fourier.a
        self._square = None

    @property
    def fft_name(self) -> str:
        return self.single.fft_name

    @staticmethod
    def _frames(x):
        return x.reshape((-1,) + tuple(x.shape[-2:]))

    def forward(self, x):
        """In-place orthonormal 2-D FFT of each frame and mode of ``x`` (N, M, H, W)."""
        self.single.forward(self._frames(x))
        return x

    def inverse(self, x):
        self.single.inverse(self._frames(x))
        return x

    def close(self) -> None:
        self.single.close()

    def modulus(self, spec):
        """``sqrt(sum_m |X_m|^2)``, float32 (N, H, W), in a scratch buffer (valid until the
        next call)."""
        xp = self.xp
        total = self.single.m   # stack-sized float32 scratch, as the single-mode steps use
        if self._square is None:
            self._square = xp.empty(self.a.shape, dtype=xp.float32)
        square = self._square
        xp.abs(spec[:, 0], out=total)   # into buffers: no stack-sized temporaries
        total *= total
        for m in range(1, spec.shape[1]):
            xp.abs(spec[:, m], out=square)
            square *= square
            total += square
        return xp.sqrt(total, out=total)

    def misfit(self, spec):
        """``sum (sqrt(sum_m |X_m|^2) - a)^2`` over all frames."""
        diff = self.modulus(spec)
        diff -= self.a
        total = (diff * diff).sum(dtype=self.xp.float64)
        return float(total) if self.backend.name == "numpy" else total

    def project(self, spec, scale: float = 1.0):
        """In place: ``X_m <- scale * a * X_m / sqrt(sum_k |X_k|^2)`` for every mode."""
        xp = self.xp
        factor = self.modulus(spec)
        factor += np.float32(1e-12)
        xp.divide(self.a, factor, out=factor)
        if scale != 1.0:
            factor *= np.float32(scale)
        spec *= factor[:, None]
        return spec
