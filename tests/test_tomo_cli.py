"""``sparkmpi tomo ...`` and ``sparkmpi bench tomo`` called in-process: exit codes, JSON, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from sparkmpi.cli import main
from sparkmpi.tomo import rmse


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture()
def simulated(tmp_path, capsys):
    tif = tmp_path / "np.tif"
    code = main(["tomo", "simulate", "--size", "20", "--angles", "14", "--phantom", "nanoparticles",
                 "--truth", str(tmp_path / "truth.tif"), "--out", str(tif), "--json"])
    assert code == 0
    summary = _json(capsys)
    assert summary["n_angles"] == 14 and summary["angle_range_deg"] == [-73.0, 73.0]
    assert (tmp_path / "np.angles.txt").exists()
    return tif, tmp_path / "truth.tif"


def test_simulate_then_reconstruct_single_process(simulated, tmp_path, capsys):
    tif, truth = simulated
    code = main(["tomo", "reconstruct", str(tif), "--algorithm", "sirt", "--iterations", "30",
                 "--spark-partitions", "0", "--truth", str(truth), "--out", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["mode"] == "single-process" and summary["shape"] == [20, 20, 20]
    assert summary["rmse"] < 0.08          # measured 0.045; all-zero scores 0.105, a constant 0.099
    truth_volume = tifffile.imread(truth)
    assert rmse(np.zeros_like(truth_volume), truth_volume) > 0.08
    assert "tomo sirt" in captured.err                               # progress on stderr
    volume = tifffile.imread(summary["tiff"])
    assert volume.dtype == np.float32 and volume.shape == (20, 20, 20)
    for key in ("vti", "png"):
        assert (tmp_path / "out").joinpath(summary[key].rsplit("/", 1)[-1]).exists()


@pytest.mark.slow
def test_reconstruct_through_spark_and_parquet(spark, simulated, tmp_path, capsys):
    tif, truth = simulated
    pq_path = tmp_path / "np.parquet"
    assert main(["tomo", "to-parquet", str(tif), "--out", str(pq_path), "--json"]) == 0
    capsys.readouterr()
    code = main(["tomo", "reconstruct", str(pq_path), "--algorithm", "art", "--spark-partitions", "2",
                 "--truth", str(truth), "--quiet", "--out", str(tmp_path / "spark"), "--json"])
    assert code == 0
    summary = _json(capsys)
    assert summary["mode"] == "spark-slices" and summary["partitions"] == 2
    local_code = main(["tomo", "reconstruct", str(tif), "--algorithm", "art", "--spark-partitions", "0",
                       "--quiet", "--out", str(tmp_path / "local"), "--json"])
    assert local_code == 0
    capsys.readouterr()
    np.testing.assert_allclose(tifffile.imread(tmp_path / "spark" / "volume.tif"),
                               tifffile.imread(tmp_path / "local" / "volume.tif"), atol=1e-5)


def test_bad_input_is_one_line_exit_1(simulated, tmp_path, capsys):
    tif, _ = simulated
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(str(a) for a in range(13)))
    code = main(["tomo", "reconstruct", str(tif), "--angles-file", str(bad), "--spark-partitions", "0",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert "13 angles for 14 projections" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()                              # failed before any work


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["tomo", "simulate", "--size", "0", "--out", str(tmp_path / "x.tif")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["tomo", "reconstruct", "x.tif", "--algorithm", "mart", "--out", str(tmp_path)])
    assert exc.value.code == 2


@pytest.mark.slow
def test_bench_tomo_small(spark, capsys):
    code = main(["bench", "tomo", "--size", "24", "--angles", "12", "--algorithm", "art", "--ranks", "2",
                 "--compare-matrix", "--json"])
    assert code == 0
    report = _json(capsys)
    for key in ("total_s", "recon_s", "matrix_s", "rmse", "reference_rmse", "rmse_ratio",
                "broadcast_total_s", "rebuild_total_s"):
        assert key in report
    assert report["mode"] == "spark-slices"
    assert abs(report["rmse_ratio"] - 1.0) < 0.05
    assert report["max_abs_diff_vs_reference"] < 1e-3
