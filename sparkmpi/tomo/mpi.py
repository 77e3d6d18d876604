"""MPI mode: projections split across ranks, SIRT combined by Allreduce.

:func:`sirt_rank` has the ``fn(comm, partition_iterator)`` shape that
``sparkmpi.run(rdd, fn)`` calls on every rank, so the Spark-MPI job is::

    records = sc.parallelize(projection_records(series), ranks)
    volumes = sparkmpi.run(records, functools.partial(sirt_rank, iterations=100))

and it runs unchanged under ``mpiexec -n R`` with each rank given its share
of :func:`projection_records` (see ``tests/test_tomo_mpi.py``).
"""

from __future__ import annotations

import numpy as np

from .algorithms import sirt_projections_rank
from .io import TiltSeries
from ..errors import InvalidArgument

__all__ = ["projection_records", "split_records", "sirt_rank"]


def projection_records(series: TiltSeries):
    """One record per projection: ``(angle_index, angle_deg, projection (n_slices, n_rays))``."""
    return [(i, float(a), series.projections[i]) for i, a in enumerate(series.angles_deg)]


def split_records(records, rank: int, size: int):
    """The contiguous share of ``records`` that rank ``rank`` of ``size`` takes (as Spark would)."""
    if not 0 <= rank < size:
        raise InvalidArgument(f"rank must be in [0, {size}), got {rank}")
    n = len(records)
    return records[rank * n // size:(rank + 1) * n // size]


def sirt_rank(comm, records, n_slices: int | None = None, n_rays: int | None = None, only_root: bool = True,
              **options):
    """One rank of a projection-distributed SIRT from records: stacks them, runs
    :func:`~sparkmpi.tomo.algorithms.sirt_projections_rank`.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or compatible
    records : iterable of (int, float, ndarray (n_slices, n_rays))
        This rank's projections, as made by :func:`projection_records`.
    n_slices, n_rays : int, optional
        Needed only by a rank that may get no records.
    only_root : bool
        Yield the volume on rank 0 only (the others yield nothing).
    **options
        ``n``, ``iterations``, ``relaxation``, ``positivity``, ``x0``,
        ``backend`` as in :func:`sparkmpi.tomo.algorithms.sirt`.

    Yields
    ------
    numpy.ndarray, float32, shape (n_slices, n, n)
    """
    items = sorted(records, key=lambda r: r[0])
    if items:
        proj = np.stack([np.asarray(r[2], dtype=np.float32) for r in items])
        angles = np.array([r[1] for r in items], dtype=np.float64)
    else:
        if n_slices is None or n_rays is None:
            raise InvalidArgument(f"rank {comm.rank} got no projections; pass n_slices and n_rays")
        proj = np.zeros((0, n_slices, n_rays), dtype=np.float32)
        angles = np.zeros(0)
    volume = sirt_projections_rank(comm, proj, angles, **options)
    if not only_root or comm is None or comm.rank == 0:
        yield volume
