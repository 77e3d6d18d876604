"""Tilt-series files (TIFF, angles sidecar, Parquet) and volume outputs (TIFF, VTI, PNG)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile

from sparkmpi.tomo import (Progress, TiltSeriesError, angles_sidecar_path, default_angles, read_angles_file,
                           read_parquet_sinograms, read_tilt_series, read_vti, simulate_tilt_series,
                           tiff_to_parquet, validate_angles, write_orthoslices_png, write_outputs,
                           write_tilt_series, write_vti)

ANGLES = default_angles(12, 60.0)


@pytest.fixture()
def stack(tmp_path):
    """A 12-projection 16-bit series of a 16^3 Shepp-Logan head, with its sidecar."""
    path = tmp_path / "series.tif"
    series, phantom = simulate_tilt_series(16, angles_deg=ANGLES, out=path)
    return path, series


def test_uint16_round_trip_keeps_values_within_quantisation(tmp_path):
    truth, _ = simulate_tilt_series(16, angles_deg=ANGLES)
    path = write_tilt_series(tmp_path / "a.tif", truth.projections, ANGLES)
    back = read_tilt_series(path)
    assert angles_sidecar_path(path).name == "a.angles.txt"
    assert back.stored_dtype == "uint16" and back.projections.dtype == np.float32
    assert back.projections.shape == (12, 16, 16)
    np.testing.assert_allclose(back.projections, truth.projections, atol=back.scale * 0.51)
    np.testing.assert_array_equal(back.angles_deg, ANGLES)
    np.testing.assert_array_equal(back.sinograms(2, 5), back.projections[:, 2:5].transpose(1, 0, 2))


def test_float32_stack_with_explicit_angles_and_angles_file(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7), dtype=np.float32)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    angles = [-40, -20, 0, 20, 40]
    got = read_tilt_series(path, angles=angles)
    np.testing.assert_array_equal(got.projections, data)
    assert got.scale == 1.0
    other = tmp_path / "tilts.txt"
    other.write_text("# my angles\n-40\n-20  # comment\n\n0\n20\n40\n")
    np.testing.assert_array_equal(read_tilt_series(path, angles_file=other).angles_deg, angles)
    decreasing = read_tilt_series(path, angles=angles[::-1])
    assert decreasing.angles_deg[0] == 40


def test_parquet_round_trip_equals_tiff(stack, tmp_path):
    path, _ = stack
    pq_path = tiff_to_parquet(path, tmp_path / "series.parquet")
    from_tiff = read_tilt_series(path)
    from_pq = read_parquet_sinograms(pq_path)
    np.testing.assert_array_equal(from_pq.projections, from_tiff.projections)
    np.testing.assert_array_equal(from_pq.angles_deg, from_tiff.angles_deg)
    import pyarrow.parquet as pq

    table = pq.read_table(pq_path)
    assert table.num_rows == 16                                       # one row per slice
    assert set(table.column_names) == {"slice", "n_angles", "n_rays", "dtype", "scale", "data"}
    assert table.column("dtype")[0].as_py() == "<u2"
    assert json.loads(table.schema.metadata[b"sparkmpi.tomo.angles_deg"]) == list(ANGLES)


# ------------------------------------------------------------- bad inputs
def _write(path, pages):
    with tifffile.TiffWriter(path) as tw:
        for page in pages:
            tw.write(page, photometric="minisblack")
    return path


@pytest.mark.parametrize("angles, match", [
    (ANGLES[:-1], "11 angles for 12 projections"),
    (np.r_[ANGLES[:5], ANGLES[4], ANGLES[6:]], "not strictly monotonic: angle 4 is .* and angle 5"),
    (np.r_[ANGLES[:6], ANGLES[7], ANGLES[6], ANGLES[8:]], "not strictly monotonic"),
    (np.r_[-95.0, ANGLES[1:]], "angle 0 is -95 degrees, out of range"),
    (np.r_[ANGLES[:3], np.nan, ANGLES[4:]], "angle 3 is nan"),
])
def test_bad_angles_are_named(stack, angles, match):
    path, _ = stack
    with pytest.raises(TiltSeriesError, match=match):
        read_tilt_series(path, angles=angles)


def test_bad_angles_file(stack, tmp_path):
    path, _ = stack
    bad = tmp_path / "bad.txt"
    bad.write_text("0\n10\nten\n")
    with pytest.raises(TiltSeriesError, match="line 3: expected one angle in degrees, got 'ten'"):
        read_tilt_series(path, angles_file=bad)
    with pytest.raises(TiltSeriesError, match="cannot read angles file"):
        read_tilt_series(path, angles_file=tmp_path / "none.txt")
    angles_sidecar_path(path).unlink()
    with pytest.raises(TiltSeriesError, match=r"no tilt angles .* expected a sidecar file .*series.angles.txt"):
        read_tilt_series(path)
    with pytest.raises(TiltSeriesError, match="either angles or angles_file"):
        read_tilt_series(path, angles=ANGLES, angles_file=bad)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(TiltSeriesError, match="holds no angles"):
        read_angles_file(tmp_path / "empty.txt")


def test_mixed_shapes_and_types(tmp_path):
    p = _write(tmp_path / "mixed.tif", [np.zeros((8, 8), np.uint16), np.zeros((8, 9), np.uint16)])
    with pytest.raises(TiltSeriesError, match=r"mixed page shapes: page 0 is \(8, 8\), page 1 is \(8, 9\)"):
        read_tilt_series(p, angles=[0, 1])
    p = _write(tmp_path / "types.tif", [np.zeros((8, 8), np.uint16), np.zeros((8, 8), np.float32)])
    with pytest.raises(TiltSeriesError, match="mixed pixel types"):
        read_tilt_series(p, angles=[0, 1])
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(TiltSeriesError, match="expected a 2-D grey-scale image"):
        read_tilt_series(p, angles=[0])
    p = tmp_path / "int8.tif"
    tifffile.imwrite(p, np.zeros((2, 4, 4), np.int8), photometric="minisblack")
    with pytest.raises(TiltSeriesError, match="pixel type int8"):
        read_tilt_series(p, angles=[0, 1])


def test_truncated_and_unreadable_files(stack, tmp_path):
    path, _ = stack
    raw = path.read_bytes()
    for cut in (len(raw) - 100, len(raw) // 2, 40):
        bad = tmp_path / f"cut{cut}.tif"
        bad.write_bytes(raw[:cut])
        with pytest.raises(TiltSeriesError, match=rf"cut{cut}.tif"):
            read_tilt_series(bad, angles=ANGLES)
    tail = tmp_path / "tail.tif"
    tail.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(TiltSeriesError, match="tail.tif' is truncated"):
        read_tilt_series(tail, angles=ANGLES)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a TIFF file at all")
    with pytest.raises(TiltSeriesError, match="cannot read .*junk.tif' as TIFF"):
        read_tilt_series(junk, angles=ANGLES)
    with pytest.raises(TiltSeriesError, match="does not exist"):
        read_tilt_series(tmp_path / "missing.tif", angles=ANGLES)
    with pytest.raises(TiltSeriesError, match="truncated"):
        tiff_to_parquet(tail, tmp_path / "x.parquet", angles=ANGLES)


def test_bad_parquet(tmp_path, stack):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, _ = stack
    good = tiff_to_parquet(path, tmp_path / "s.parquet")
    table = pq.read_table(good)
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "nometa.parquet")
    with pytest.raises(TiltSeriesError, match="metadata"):
        read_parquet_sinograms(tmp_path / "nometa.parquet")
    pq.write_table(table.drop(["scale"]), tmp_path / "nocol.parquet")
    with pytest.raises(TiltSeriesError, match=r"missing columns \['scale'\]"):
        read_parquet_sinograms(tmp_path / "nocol.parquet")
    short = table.set_column(5, "data", pa.array([b"\0" * 10] * table.num_rows))
    pq.write_table(short, tmp_path / "short.parquet")
    with pytest.raises(TiltSeriesError, match="holds 10 bytes; expected 384"):
        read_parquet_sinograms(tmp_path / "short.parquet")
    pq.write_table(table.slice(0, 5), tmp_path / "few.parquet")
    with pytest.raises(TiltSeriesError, match="should hold slices 0..15"):
        read_parquet_sinograms(tmp_path / "few.parquet")


def test_validate_angles_counts():
    assert validate_angles([1, 2, 3], 3).dtype == np.float64
    with pytest.raises(TiltSeriesError, match="--angles: 2 angles for 3 projections"):
        validate_angles([1, 2], 3, source="--angles")


# ----------------------------------------------------------------- outputs
def test_vti_round_trip_and_header(tmp_path):
    vol = np.random.default_rng(2).random((3, 4, 5), dtype=np.float32)
    path = write_vti(tmp_path / "v.vti", vol, spacing=(0.5, 1, 2))
    back, meta = read_vti(path)
    np.testing.assert_array_equal(back, vol)
    assert meta == {"spacing": (0.5, 1.0, 2.0), "origin": (0.0, 0.0, 0.0), "name": "density"}
    head = path.read_bytes()[:600].decode("ascii", "replace")
    assert 'type="ImageData"' in head and 'WholeExtent="0 4 0 3 0 2"' in head
    with pytest.raises(ValueError, match="volume must have shape"):
        write_vti(tmp_path / "x.vti", np.zeros((4, 4)))


def test_vti_opens_in_vtk_when_installed(tmp_path):
    vtk = pytest.importorskip("vtkmodules.vtkIOXML")
    from vtkmodules.util.numpy_support import vtk_to_numpy

    vol = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    path = write_vti(tmp_path / "v.vti", vol)
    reader = vtk.vtkXMLImageDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    assert image.GetDimensions() == (5, 4, 3)
    np.testing.assert_array_equal(vtk_to_numpy(image.GetPointData().GetArray("density")), vol.ravel())


def test_outputs_write_tiff_vti_png(tmp_path):
    from PIL import Image

    vol = np.random.default_rng(3).random((6, 10, 10), dtype=np.float32)
    paths = write_outputs(tmp_path / "out", vol)
    np.testing.assert_array_equal(tifffile.imread(paths["tiff"]), vol)
    assert tifffile.imread(paths["tiff"]).dtype == np.float32
    np.testing.assert_array_equal(read_vti(paths["vti"])[0], vol)
    with Image.open(paths["png"]) as img:
        assert img.mode == "L" and img.size == (10 + 10 + 10 + 8, 10)
    png = write_orthoslices_png(tmp_path / "const.png", np.ones((4, 4, 4)))
    assert png.exists()


def test_progress_writes_to_given_stream():
    out = io.StringIO()
    progress = Progress("art", stream=out, interval=0.0)
    progress(1, 4)
    progress(4, 4)
    progress.message("done")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("art: 1/4 ( 25.0%)") and lines[1].startswith("art: 4/4 (100.0%)")
    assert lines[2] == "art: done"
    silent = io.StringIO()
    Progress("x", enabled=False, stream=silent)(1, 2)
    assert silent.getvalue() == ""
