"""Spark slice-partitioned reconstruction equals the single-process volume (local[2] session)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi.tomo import (TiltSeriesError, art, default_angles, fbp, read_tilt_series, simulate_tilt_series,
                           sirt, tiff_to_parquet)
from sparkmpi.tomo.spark import SlicePartitioner, load_sinograms_rdd, partition_slices, reconstruct_spark

ANGLES = default_angles(16, 70.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("tomo_spark") / "series.tif"
    series, phantom = simulate_tilt_series(24, angles_deg=ANGLES, out=path)
    return path, series


def test_partitioner_makes_contiguous_ranges():
    part = SlicePartitioner(10, 3)
    assert [part(s) for s in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert part == SlicePartitioner(10, 3) and part != SlicePartitioner(10, 4)


def test_art_through_spark_tiff_equals_serial(spark, stack):
    path, series = stack
    calls = []
    volume, info = reconstruct_spark(spark, path, algorithm="art", iterations=1, partitions=2,
                                     progress=lambda d, t: calls.append((d, t)))
    serial = art(series.sinograms(), series.angles_deg)
    assert volume.shape == (24, 24, 24)
    np.testing.assert_allclose(volume, serial, atol=1e-5)
    assert info["partition_slices"] == [12, 12] and info["partitions"] == 2
    assert calls and calls[-1][0] == calls[-1][1]


@pytest.mark.slow
def test_sirt_through_spark_parquet_uneven_partitions(spark, stack, tmp_path):
    path, series = stack
    pq_path = tiff_to_parquet(path, tmp_path / "series.parquet")
    rdd, meta = load_sinograms_rdd(spark, pq_path)
    assert meta["n_slices"] == 24 and meta["partitioned"] == 0
    volume, info = reconstruct_spark(spark, pq_path, algorithm="sirt", iterations=20, partitions=5,
                                     positivity=True)
    serial = sirt(series.sinograms(), series.angles_deg, iterations=20, positivity=True)
    np.testing.assert_allclose(volume, serial, atol=1e-5)
    assert sorted(info["partition_slices"]) == [4, 5, 5, 5, 5]


def test_fbp_with_broadcast_matrix_equals_serial(spark, stack):
    path, series = stack
    volume, info = reconstruct_spark(spark, path, algorithm="fbp", partitions=3, matrix_mode="broadcast",
                                     filter="hann")
    np.testing.assert_allclose(volume, fbp(series.sinograms(), series.angles_deg, filter="hann"), atol=1e-5)
    assert info["matrix_mode"] == "broadcast"


def test_partitions_keep_neighbouring_slices(spark, stack):
    path, _ = stack
    rdd, meta = load_sinograms_rdd(spark, path, num_slices=4)
    parts = partition_slices(rdd, meta["n_slices"], 3).keys().glom().collect()
    assert [sorted(p) for p in parts] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    with pytest.raises(ValueError, match="partitions .* must not exceed"):
        partition_slices(rdd, 24, 25)


def test_bad_input_fails_before_spark_work(spark, stack, tmp_path):
    path, _ = stack
    with pytest.raises(TiltSeriesError, match="15 angles for 16 projections"):
        reconstruct_spark(spark, path, angles=ANGLES[:-1])
    with pytest.raises(TiltSeriesError, match="does not exist"):
        reconstruct_spark(spark, tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        reconstruct_spark(spark, read_tilt_series(path), algorithm="mlem")


@pytest.mark.slow
def test_sirt_mpi_mode_through_sparkmpi_run_equals_serial(spark, stack):
    from sparkmpi.tomo.spark import reconstruct_mpi

    path, series = stack
    volume, info = reconstruct_mpi(spark, path, ranks=2, iterations=15, positivity=True, timeout=120)
    serial = sirt(series.sinograms(), series.angles_deg, iterations=15, positivity=True)
    assert info["ranks"] == 2
    np.testing.assert_allclose(volume, serial, atol=1e-5)
