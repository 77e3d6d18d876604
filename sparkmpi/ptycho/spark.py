"""Distributed reconstruction through Spark: frames in an RDD, one MPI rank per partition.

The scan's frames become an RDD of records ``(frame_index, intensities,
position)`` in ``ranks`` partitions of contiguous frame blocks
(:func:`scan_rdd`); :func:`reconstruct_rdd` runs
``sparkmpi.run(rdd, fn)``, where each rank stacks the frames of its partition
and calls :func:`sparkmpi.ptycho.reconstruct_rank` (as under ``mpiexec``,
:mod:`sparkmpi.ptycho.mpi_job`): every sum over frames is combined with ``MPI_Allreduce``
each iteration, and the sums are order-independent (see
:mod:`sparkmpi.ptycho._fused`), so the object and probe equal a one-process
reconstruction of all frames.

Usage::

    import sparkmpi
    from sparkmpi.ptycho.spark import reconstruct_mpi

    spark = sparkmpi.spark_session("local[2]")
    out = reconstruct_mpi(spark, "scan.npz", ranks=2, iterations=100)
    out.object, out.probe, out.errors, out.seconds_per_iteration, out.job_seconds

Input checks happen before any iteration: the file's layout (shapes, dtypes,
positions inside the object) on the driver before the job starts; the values
(NaN, negative intensities) in each rank on its own frames, after which all
ranks agree to stop and the driver raises the same
:class:`~sparkmpi.ptycho.errors.PtychoInputError` subclass naming the global
frame.  Other failures raise :class:`sparkmpi.JobFailed`.
"""

from __future__ import annotations

import functools
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import errors as _errors
from ._validate import check_complex_image, check_positions, shape2
from .errors import DataFormatError, FrameMismatchError, PtychoInputError
from .options import Options

__all__ = ["SparkResult", "frame_records", "reconstruct_mpi", "reconstruct_rdd", "scan_rdd"]


@dataclass
class SparkResult:
    """Outcome of :func:`reconstruct_rdd` / :func:`reconstruct_mpi`.

    Attributes
    ----------
    object : ndarray, complex64, shape (Hy, Wx)
    probe : ndarray, complex64, shape (H, W)
        The probe; with ``probe_modes`` > 1 its main mode.
    errors : ndarray, float64, shape (iterations,)
        Fourier-modulus error per iteration, over all frames.
    seconds : float
        Wall time of the iteration loop, slowest rank (measured in the ranks).
    iterations : int
    job_seconds : float
        Wall time of the whole Spark-MPI job on the driver (rank start-up,
        loading the frames, set-up, iterations, results).
    ranks : int
    frames_per_rank : list of int
    threads_per_rank : int
        FFT / kernel threads each rank used.
    kernels : str
        ``"numba"`` or ``"numpy"`` (CPU, exact sums), ``"generic"`` (CPU, the
        array code CuPy runs: ``kernels="generic"`` or probe modes), or the
        backend's own (``"cupy"``).
    positions : ndarray (N, 2) float64 or None
        The scan positions at the end, in frame-index order (refined with
        ``refine_positions``), gathered from every rank.
    positions_moved : list of int
        Frames that changed whole pixel, per refinement step (all ranks).
    probe_modes : ndarray, complex64, shape (M, H, W) or None
        Every incoherent probe mode (:attr:`sparkmpi.ptycho.Result.probe_modes`).
    """

    object: np.ndarray
    probe: np.ndarray
    errors: np.ndarray
    seconds: float
    iterations: int
    job_seconds: float
    ranks: int
    frames_per_rank: list = field(default_factory=list)
    threads_per_rank: int = 1
    kernels: str = ""
    positions: np.ndarray | None = None
    positions_moved: list = field(default_factory=list)
    probe_modes: np.ndarray | None = None

    @property
    def seconds_per_iteration(self) -> float:
        return self.seconds / self.iterations if self.iterations else float("nan")

    @property
    def fourier_error(self) -> float:
        return float(self.errors[-1]) if len(self.errors) else float("nan")


# --------------------------------------------------------------------------- records
def frame_records(intensities, positions, start: int = 0):
    """``(frame_index, intensities (H, W) float32, position (2,) int64)`` per frame.

    ``frame_index`` counts from ``start`` (the block's first global frame).
    """
    for k in range(len(intensities)):
        yield (start + k, np.ascontiguousarray(intensities[k], dtype=np.float32),
               np.asarray(positions[k], dtype=np.int64))


def _npz_header(path: Path):
    """Shape and dtype of ``intensities`` in an NPZ, plus the small arrays, without the frames."""
    if not path.exists():
        raise DataFormatError(f"scan file {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            missing = [k for k in ("intensities", "positions", "object_shape")
                       if f"{k}.npy" not in names]
            if missing:
                raise DataFormatError(f"{path}: missing key(s) {missing}; expected a file "
                                      f"written by 'sparkmpi ptycho simulate'")
            with zf.open("intensities.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
    except zipfile.BadZipFile as exc:
        raise DataFormatError(f"{path} is not an NPZ file ({exc})") from None
    with np.load(path) as z:
        positions = np.asarray(z["positions"])
        object_shape = shape2(np.asarray(z["object_shape"]).tolist(), "object_shape")
    return tuple(shape), np.dtype(dtype), positions, object_shape


def _read_block(block):
    """Records of frames ``[start, stop)`` of an NPZ scan (runs on an executor)."""
    path, start, stop = block
    with np.load(path) as z:
        # the NPZ member is read whole (zip members cannot be memory-mapped); a block
        # keeps only its own frames
        frames = np.asarray(z["intensities"][start:stop])
        positions = np.asarray(z["positions"][start:stop])
    return list(frame_records(frames, positions, start))


def _blocks(n_frames: int, ranks: int):
    from .mpi_job import split_frames

    return [split_frames(n_frames, ranks, r) for r in range(ranks)]


def scan_rdd(spark, source, ranks: int):
    """An RDD of frame records in ``ranks`` partitions of contiguous frame blocks.

    Parameters
    ----------
    spark : SparkSession or SparkContext
    source : str, Path or PtychoData
        An NPZ scan (read by the executors, each its own block, so the path
        must be readable there) or data in the driver's memory.
    ranks : int
        Partitions (MPI ranks); block sizes differ by at most one frame.

    Returns
    -------
    rdd : pyspark.RDD
        Partition ``r`` holds frames ``split_frames(n, ranks, r)`` as records
        ``(frame_index, intensities (H, W) float32, position (2,) int64)``.
    info : dict
        ``n_frames``, ``frame_shape``, ``object_shape``, ``blocks`` (list of
        ``(start, stop)``), ``source`` (``"npz"`` or ``"memory"``).

    Raises
    ------
    PtychoInputError
        For a missing or malformed file, frames and positions that disagree, or
        positions outside the object (on the driver, before any job).
    """
    sc = getattr(spark, "sparkContext", spark)
    if int(ranks) != ranks or ranks < 1:
        raise PtychoInputError(f"ranks must be an integer >= 1, got {ranks!r}")
    ranks = int(ranks)
    if isinstance(source, (str, Path)):
        path = Path(source).resolve()
        shape, dtype, positions, object_shape = _npz_header(path)
        kind = "npz"
    elif hasattr(source, "intensities") and hasattr(source, "positions"):
        shape, dtype = tuple(np.shape(source.intensities)), np.asarray(source.intensities).dtype
        positions, object_shape = source.positions, shape2(source.object_shape, "object_shape")
        kind = "memory"
    else:
        raise PtychoInputError(f"source must be an NPZ path or PtychoData, "
                               f"got {type(source).__name__}")
    if len(shape) != 3:
        raise FrameMismatchError(f"intensities must be a 3-D array (frames, rows, cols), "
                                 f"got shape {shape}")
    if dtype.kind not in "fiu":
        raise FrameMismatchError(f"intensities must have a real numeric dtype (float32 "
                                 f"preferred), got dtype {dtype}")
    n = shape[0]
    frame_shape = shape[1:]
    if frame_shape[0] > object_shape[0] or frame_shape[1] > object_shape[1]:
        raise FrameMismatchError(f"frames of shape {frame_shape} do not fit in object_shape="
                                 f"{object_shape}; expected an object at least as large as a frame")
    check_positions(positions, n, frame_shape, object_shape)
    if n < ranks:
        raise PtychoInputError(f"{n} frames cannot be split over {ranks} ranks "
                               f"(each rank needs at least one frame)")
    blocks = _blocks(n, ranks)
    if kind == "npz":
        rdd = sc.parallelize([(str(path), b.start, b.stop) for b in blocks], ranks) \
            .flatMap(_read_block)
    else:
        rdd = sc.parallelize([list(frame_records(source.intensities[b], source.positions[b],
                                                 b.start)) for b in blocks], ranks) \
            .flatMap(lambda recs: recs)
    info = {"n_frames": n, "frame_shape": tuple(frame_shape), "object_shape": object_shape,
            "blocks": [(b.start, b.stop) for b in blocks], "source": kind}
    return rdd, info


# --------------------------------------------------------------------------- the rank body
def _stack(records):
    """Sort a partition's records by frame index and stack them."""
    items = sorted(records, key=lambda rec: int(rec[0]))
    if not items:
        return np.zeros(0, np.int64), None, None
    index = np.array([int(rec[0]) for rec in items], dtype=np.int64)
    first = np.shape(items[0][1])
    for rec in items:
        if np.shape(rec[1]) != first:
            raise FrameMismatchError(f"frame {int(rec[0])} has shape {np.shape(rec[1])} but frame "
                                     f"{int(index[0])} has shape {first}; expected equal shapes")
        if np.shape(rec[2]) != (2,):
            raise FrameMismatchError(f"frame {int(rec[0])}: position must be (row, col), "
                                     f"got shape {np.shape(rec[2])}")
    frames = np.stack([np.asarray(rec[1]) for rec in items])
    positions = np.stack([np.asarray(rec[2]) for rec in items])
    return index, frames, positions


def _check_rank_frames(rank, index, frames, positions, object_shape, probe):
    """The engines' input checks on this rank's frames, naming global frame indices."""
    from ._validate import check_frames

    if frames is None:
        raise FrameMismatchError(f"partition {rank} holds no frames; every rank needs at "
                                 f"least one (use fewer partitions)")
    try:
        check_frames(frames, positions, object_shape,
                     probe if probe is None or np.ndim(probe) == 2 else probe[0])
    except _errors.NonFiniteError:
        if frames.dtype.kind == "f" and not np.isfinite(frames).all():
            bad = ~np.isfinite(frames)
            g = int(index[np.argwhere(bad)[0][0]])
            raise _errors.NonFiniteError(
                f"intensities contain {int(bad.sum())} NaN or infinite values on partition "
                f"{rank} (first in frame {g}); expected finite intensities") from None
        raise
    except _errors.NegativeIntensityError:
        g = int(index[np.argwhere(frames < 0)[0][0]])
        raise _errors.NegativeIntensityError(
            f"intensities contain negative values on partition {rank} (minimum "
            f"{float(frames.min()):g}, first in frame {g}); expected intensities >= 0") from None
    except PtychoInputError as exc:
        raise type(exc)(f"partition {rank} (frames {int(index[0])}..{int(index[-1])}): "
                        f"{exc}") from None


def _kernels_used(options: Options) -> str:
    from ..backend import cupy_available
    from ._fused import HAVE_NUMBA

    backend = options.backend
    if backend == "cupy" or (backend == "auto" and cupy_available()):
        return "cupy"
    kernels = options.kernels
    if kernels == "generic" or options.probe_modes > 1:
        return "generic"
    return "numba" if kernels == "numba" or (kernels == "auto" and HAVE_NUMBA) else "numpy"


def _records_rank(comm, records, *, object_shape, options: Options, probe, object_init):
    """``fn(comm, records)`` of the Spark-MPI job: one result dict per rank."""
    from .engines import reconstruct_rank
    from .mpi_job import threads_per_rank

    if options.threads is None:   # fixed here so that the result can report it
        options = Options.of(options, threads=threads_per_rank(comm))
    error = None
    try:
        index, frames, positions = _stack(records)
        _check_rank_frames(comm.rank, index, frames, positions, object_shape, probe)
    except PtychoInputError as exc:
        error = (type(exc).__name__, str(exc))
    # every rank learns whether any rank's frames are bad before anyone iterates
    first = next((e for e in comm.allgather(error) if e is not None), None)
    if first is not None:
        return [{"rank": comm.rank, "error": first}]
    result = reconstruct_rank(comm, frames, positions, object_shape, probe=probe,
                              object_init=object_init, options=options)
    out = {"rank": comm.rank, "frames": int(len(index)), "threads": int(options.threads),
           "kernels": _kernels_used(options), "frame_index": np.asarray(index),
           "positions": result.positions, "positions_moved": list(result.positions_moved)}
    if comm.rank == 0:
        out.update(object=result.object, probe=result.probe, errors=result.errors,
                   probe_modes=result.probe_modes,
                   seconds=float(result.seconds), iterations=int(result.iterations))
    return [out]


def _sparkmpi_fork_server_warm_up() -> None:
    """Called once by a rank fork server that preloads this module: a tiny
    reconstruction, one thread, loads the engines' numba kernels (from numba's
    cache, or compiles them), which every forked rank then has instead of
    loading them in its first iteration (BENCHMARKS.md, live jobs)."""
    from ._fused import HAVE_NUMBA
    from .engines import reconstruct
    from .simulate import PtychoData

    if not HAVE_NUMBA:
        return
    # Any small scan runs the same kernels.
    positions = np.array([(r, c) for r in (0, 4, 8) for c in (0, 4, 8)], dtype=np.int64)
    frames = np.random.default_rng(0).random((len(positions), 16, 16)).astype(np.float32)
    data = PtychoData(frames, positions, (24, 24))
    probe = np.ones((16, 16), dtype=np.complex64)
    # One FFT worker: the fork server's thread check allows scipy.fft's pool as
    # one worker leaves it; more workers leave more threads behind.
    previous = os.environ.get("SPARKMPI_FFT_WORKERS")
    os.environ["SPARKMPI_FFT_WORKERS"] = "1"
    try:
        for algorithm in ("dm", "raar"):
            reconstruct(data, algorithm=algorithm, iterations=2, probe=probe,
                        probe_update_start=0, threads=1, kernels="numba")
    finally:
        if previous is None:
            del os.environ["SPARKMPI_FFT_WORKERS"]
        else:
            os.environ["SPARKMPI_FFT_WORKERS"] = previous


def reconstruct_rdd(rdd, object_shape, *, timeout: float | None = None, env=None,
                    probe=None, object_init=None, options: Options | None = None,
                    **settings) -> SparkResult:
    """Reconstruct from an RDD of frame records, one MPI rank per partition.

    Parameters
    ----------
    rdd : pyspark.RDD
        Records ``(frame_index, intensities (H, W), position (2,))``; partition
        ``r`` runs as rank ``r`` (:func:`scan_rdd` makes one).  Every
        partition needs at least one frame.
    object_shape : (int, int)
    timeout : float, optional
        Seconds the whole job may take (``sparkmpi.run(timeout=)``).
    env : dict, optional
        Environment variables for the rank processes.
    probe, object_init : array, optional
        The starting probe and object; they travel to every rank.
    options, **settings
        As for :func:`sparkmpi.ptycho.reconstruct_rank` (an
        :class:`~sparkmpi.ptycho.Options` and fields replacing its own;
        ``threads`` defaults to cores / ranks on the node).

    Returns
    -------
    SparkResult

    Raises
    ------
    PtychoInputError
        A rank found bad frames (NaN, negative, mismatched shapes): the same
        class as the check raised, naming the global frame, before any
        iteration.
    sparkmpi.JobFailed
        Anything else that made a rank fail.
    """
    import sparkmpi

    object_shape = shape2(object_shape, "object_shape")
    for key in ("comm", "state", "callback"):
        if key in settings:
            raise PtychoInputError(f"option {key!r} is not supported through Spark")
    options = Options.of(options, **settings)
    if probe is not None:
        probe = np.asarray(probe)
    if object_init is not None:
        object_init = check_complex_image(object_init, object_shape, "object_init")
    fn = functools.partial(_records_rank, object_shape=object_shape, options=options,
                           probe=probe, object_init=object_init)
    t0 = time.perf_counter()
    outs = sparkmpi.run(rdd, fn, timeout=timeout, env=env)
    job_seconds = time.perf_counter() - t0
    for out in outs:
        if "error" in out:
            name, message = out["error"]
            cls = getattr(_errors, name, PtychoInputError)
            if not (isinstance(cls, type) and issubclass(cls, PtychoInputError)):
                cls = PtychoInputError
            raise cls(message)
    outs = sorted(outs, key=lambda o: o["rank"])
    root = outs[0]
    positions = None
    if all(o.get("positions") is not None for o in outs):
        index = np.concatenate([o["frame_index"] for o in outs])
        positions = np.concatenate([o["positions"] for o in outs])[np.argsort(index, kind="stable")]
    return SparkResult(object=root["object"], probe=root["probe"], errors=root["errors"],
                       seconds=root["seconds"], iterations=root["iterations"],
                       job_seconds=job_seconds, ranks=len(outs),
                       frames_per_rank=[o["frames"] for o in outs],
                       threads_per_rank=root["threads"], kernels=root["kernels"],
                       positions=positions, positions_moved=root.get("positions_moved", []),
                       probe_modes=root.get("probe_modes"))


def reconstruct_mpi(spark, source, *, ranks: int = 2, timeout: float | None = None,
                    env=None, probe=None, object_init=None, options: Options | None = None,
                    **settings) -> SparkResult:
    """Load a scan into an RDD (:func:`scan_rdd`) and reconstruct it over ``ranks`` MPI ranks.

    Parameters
    ----------
    spark : SparkSession or SparkContext
        Needs ``ranks`` free task slots (one barrier stage).
    source : str, Path or PtychoData
        NPZ scan (format of :mod:`sparkmpi.ptycho.simulate`) or in-memory data.
    ranks : int
    timeout, env, probe, object_init, options, **settings
        As for :func:`reconstruct_rdd`.

    Returns
    -------
    SparkResult
    """
    rdd, info = scan_rdd(spark, source, ranks)
    if probe is not None:
        check_complex_image(probe, info["frame_shape"] if np.ndim(probe) != 3
                            else (np.shape(probe)[0],) + tuple(info["frame_shape"]), "probe")
    return reconstruct_rdd(rdd, info["object_shape"], timeout=timeout, env=env, probe=probe,
                           object_init=object_init, options=options, **settings)
