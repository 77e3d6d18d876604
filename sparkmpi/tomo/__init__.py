"""Tomography: tilt series to 3-D volume with ART, SIRT and FBP (the paper's section IV).

Public API (plain functions over arrays; Spark only in :mod:`sparkmpi.tomo.spark`)::

    from sparkmpi import tomo
    series = tomo.read_tilt_series("series.tif")          # + series.angles.txt
    volume = tomo.art(series.sinograms(), series.angles_deg)
    tomo.write_outputs("out/", volume)

Layouts: a tilt series is ``(n_angles, n_slices, n_rays)`` (TIFF page order),
sinograms ``(n_slices, n_angles, n_rays)``, volumes ``(n_slices, n, n)``; the
rotation axis runs along the slices.
"""

from .algorithms import ALGORITHMS, FILTERS, art, art_reference, fbp, rmse, sirt, sirt_projections_rank
from .io import (TiltSeries, TiltSeriesError, angles_sidecar_path, read_angles_file,
                 read_parquet_sinograms, read_tilt_series, tiff_to_parquet, validate_angles,
                 write_angles_file, write_tilt_series)
from .mpi import projection_records, sirt_rank
from .output import Progress, read_vti, write_orthoslices_png, write_outputs, write_volume_tiff, write_vti
from .projector import cached_system_matrix, clear_matrix_cache, system_matrix
from .simulate import (PHANTOMS, default_angles, make_phantom, nanoparticles, project_volume,
                       shepp_logan_3d, simulate_tilt_series)

__all__ = [
    "ALGORITHMS", "FILTERS", "PHANTOMS",
    "art", "art_reference", "sirt", "sirt_projections_rank", "sirt_rank", "projection_records", "fbp", "rmse",
    "TiltSeries", "TiltSeriesError", "angles_sidecar_path", "read_angles_file", "read_parquet_sinograms",
    "read_tilt_series", "tiff_to_parquet", "validate_angles", "write_angles_file", "write_tilt_series",
    "Progress", "read_vti", "write_orthoslices_png", "write_outputs", "write_volume_tiff", "write_vti",
    "cached_system_matrix", "clear_matrix_cache", "system_matrix",
    "default_angles", "make_phantom", "nanoparticles", "project_volume", "shepp_logan_3d",
    "simulate_tilt_series",
]
