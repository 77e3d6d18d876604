"""Viewer without a browser: kind detection, loaders, pictures, snapshot contract, CLI errors."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
import subprocess
import sys
import threading

import numpy as np
import pytest

from sparkmpi.cli import main
from sparkmpi.viz import (
    PortInUseError,
    ResultNotFoundError,
    SnapshotError,
    SnapshotPoller,
    UnreadableResultError,
    WrongKindError,
    detect_kind,
    load_ptycho,
    load_volume,
    publish_snapshot,
    read_latest,
)
from sparkmpi.viz.app import check_port
from sparkmpi.viz.images import colorize, downsample, error_curve_svg, lut, robust_range, window_range
from sparkmpi.viz.loaders import PtychoResult
from sparkmpi.viz.models import PtychoModel, VolumeModel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sparkmpi.ptycho.output import write_outputs as write_ptycho
    from sparkmpi.tomo.output import write_outputs as write_tomo

    root = tmp_path_factory.mktemp("viz")
    rng = np.random.default_rng(0)
    vol = rng.random((6, 8, 10), dtype=np.float32)
    out = write_tomo(root / "tomo", vol)
    np.save(root / "vol.npy", vol)
    obj = np.exp(1j * rng.random((20, 20))).astype(np.complex64)
    probe = rng.random((8, 8)).astype(np.complex64)
    write_ptycho(root / "ptycho", obj, probe, [1.0, 0.5, 0.25], summary={"algorithm": "dm"})
    np.savez(root / "random.npz", a=np.arange(3), b=np.ones(4))
    (root / "notes.txt").write_text("hello, this is text\n")
    np.savez(root / "scan.npz", intensities=np.ones((2, 4, 4)), positions=np.zeros((2, 2)))
    return {"root": root, "vol": vol, "tif": out["tiff"], "vti": out["vti"], "npy": root / "vol.npy",
            "ptycho": root / "ptycho" / "reconstruction.npz", "obj": obj}


# ----------------------------------------------------------------- detection
@pytest.mark.parametrize("key", ["tif", "vti", "npy"])
def test_volumes_detected_and_read_back(files, key):
    assert detect_kind(files[key]) == "volume"
    vol = load_volume(files[key])
    assert vol.dtype == np.float32 and vol.shape == (6, 8, 10)
    np.testing.assert_array_equal(vol, files["vol"])


def test_kind_comes_from_content_not_extension(files, tmp_path):
    disguised = tmp_path / "volume.npz"
    disguised.write_bytes(open(files["tif"], "rb").read())
    assert detect_kind(disguised) == "volume"
    fake_tif = tmp_path / "result.tif"
    fake_tif.write_bytes(open(files["ptycho"], "rb").read())
    assert detect_kind(fake_tif) == "ptycho"
    assert load_ptycho(fake_tif).object.shape == (20, 20)


def test_ptycho_result_read(files):
    assert detect_kind(files["ptycho"]) == "ptycho"
    res = load_ptycho(files["ptycho"])
    np.testing.assert_allclose(res.object, files["obj"])
    assert res.probe.shape == (8, 8)
    np.testing.assert_array_equal(res.errors, [1.0, 0.5, 0.25])
    assert res.summary == {"algorithm": "dm"}


@pytest.mark.parametrize("name, error, words", [
    ("missing.tif", ResultNotFoundError, "does not exist"),
    ("random.npz", WrongKindError, "expected a ptychography result"),
    ("notes.txt", WrongKindError, "neither a tomography volume"),
    ("scan.npz", WrongKindError, "reconstruct it first"),
])
def test_bad_files_named_errors(files, name, error, words):
    with pytest.raises(error, match=words):
        detect_kind(files["root"] / name)


def test_empty_truncated_and_unreadable_files(files, tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableResultError, match="empty"):
        detect_kind(empty)
    for key, cut in (("tif", 0.6), ("ptycho", 0.5), ("npy", 0.5), ("vti", 0.7)):
        data = open(files[key], "rb").read()
        broken = tmp_path / f"cut_{key}{os.path.splitext(str(files[key]))[1]}"
        broken.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(UnreadableResultError, match="truncated|corrupt"):
            load_volume(broken) if key != "ptycho" else load_ptycho(broken)
    publish_snapshot(tmp_path / "live", {"object": np.ones((4, 4))})
    with pytest.raises(WrongKindError, match="snapshot directory"):
        detect_kind(tmp_path / "live")
    # A file that exists but cannot be read, for any user (root included): reading /proc/self/mem at
    # offset 0 fails with EIO.  And, for users other than root, a file without read permission.
    failing = tmp_path / "failing.tif"
    failing.symlink_to("/proc/self/mem")
    with pytest.raises(UnreadableResultError, match=f"cannot read '{failing}': Input/output error"):
        detect_kind(failing)
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.tif"
        locked.write_bytes(b"II*\x00")
        locked.chmod(0)
        with pytest.raises(UnreadableResultError, match="cannot read"):
            detect_kind(locked)
    # A directory where a result file should be.
    (tmp_path / "volume.tif").mkdir()
    with pytest.raises(WrongKindError, match="is a directory; expected a result file"):
        detect_kind(tmp_path / "volume.tif")


def test_two_dimensional_arrays_are_not_volumes(tmp_path):
    np.save(tmp_path / "flat.npy", np.ones((4, 4), dtype=np.float32))
    with pytest.raises(WrongKindError, match=r"shape \(4, 4\)"):
        load_volume(tmp_path / "flat.npy")


# ------------------------------------------------------------------ pictures
def test_colorize_window_and_luts():
    img = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    rgb = colorize(img, 0.0, 1.0, "grey")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[-1, -1].tolist() == [255, 255, 255]
    assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0)
    viridis = colorize(img, 0.0, 1.0, "viridis")
    assert not np.array_equal(viridis[..., 0], viridis[..., 1])
    assert lut("inferno").shape == (256, 3)
    assert window_range(0.0, 10.0, 0.5, 0.2) == pytest.approx((4.0, 6.0))
    with pytest.raises(ValueError, match="cmap must be one of"):
        colorize(img, 0, 1, "rainbow")
    with pytest.raises(ValueError, match="level must be in"):
        window_range(0, 1, 1.5, 0.5)
    with pytest.raises(ValueError, match=r"image must be a non-empty 2-D array, got shape \(2, 2, 2\)"):
        colorize(np.ones((2, 2, 2)), 0, 1)


def test_downsample_block_means():
    vol = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
    small, factor = downsample(vol, 4)
    assert factor == 2 and small.shape == (4, 3, 2)
    assert small[0, 0, 0] == pytest.approx(vol[:2, :2, :2].mean())
    same, one = downsample(vol, 8)
    assert one == 1 and same.shape == vol.shape
    with pytest.raises(ValueError, match="max_side"):
        downsample(vol, 1)


def test_error_curve_svg_and_models():
    svg = error_curve_svg([1.0, 0.1, 0.01])
    assert svg.startswith("<svg") and "polyline" in svg and "1e-2" in svg
    assert "no errors recorded yet" in error_curve_svg([])
    assert robust_range([np.nan, 1.0, 2.0, 3.0], (0, 100)) == (1.0, 3.0)
    model = VolumeModel(np.random.default_rng(1).random((5, 6, 7), dtype=np.float32))
    assert model.slice_array("y", 2).shape == (5, 7)
    assert model.slice_url("x", 6, 0.5, 1.0, "grey").startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match=r"index along z must be an integer in \[0, 4\], got 5"):
        model.slice_array("z", 5)
    obj = np.exp(1j * np.linspace(-1, 1, 400)).reshape(20, 20)
    pm = PtychoModel(PtychoResult(obj.astype(np.complex64), None, np.array([0.5, 0.2]), {"nrmse": 0.1234}))
    assert pm.probe_url() == "" and pm.phase_url(5.0) != pm.phase_url(0.0)
    assert "2 iterations" in pm.info() and "nrmse 0.1234" in pm.info()


# ----------------------------------------------------------------- snapshots
def test_publish_snapshot_contract(tmp_path):
    live = tmp_path / "live"
    assert read_latest(live) is None
    poller = SnapshotPoller(live)
    assert poller.poll() is None
    obj = np.ones((4, 5), dtype=np.complex64)
    path = publish_snapshot(live, {"object": obj, "errors": [0.5]}, {"batch": 1})
    assert path.name == "snapshot-000001.npz"
    latest = json.loads((live / "latest.json").read_text())
    assert latest["sequence"] == 1 and latest["file"] == path.name and latest["meta"] == {"batch": 1}
    assert latest["keys"] == ["errors", "object"]
    snap = poller.poll()
    assert snap.sequence == 1 and snap.meta == {"batch": 1}
    np.testing.assert_array_equal(snap.arrays["object"], obj)
    assert poller.poll() is None  # handed out once
    for k in range(2, 6):
        publish_snapshot(live, {"object": obj * k}, {"batch": k}, keep=2)
    names = sorted(p.name for p in live.iterdir())
    assert names == ["latest.json", "snapshot-000004.npz", "snapshot-000005.npz"]  # no temp files left
    snap = poller.poll()
    assert snap.sequence == 5 and snap.arrays["object"][0, 0] == 5


@pytest.mark.parametrize("args, words", [
    (("", {"object": np.ones(2)}), "directory must be a non-empty"),
    (("D", {}), "arrays must be a non-empty dict"),
    (("D", {"bad key": np.ones(2)}), "arrays keys must be identifiers"),
    (("D", {"__meta__": np.ones(2)}), "arrays keys must be identifiers"),
    (("D", {"object": np.array(["a", "b"])}), r"arrays\['object'\] must hold numbers, got dtype <U1"),
    (("D", {"object": np.ones(2)}, {"x": object()}), "meta must be JSON-serialisable"),
    (("D", {"object": np.ones(2)}, [1]), "meta must be a dict"),
])
def test_publish_snapshot_bad_arguments(tmp_path, args, words):
    directory = tmp_path / "d" if args[0] == "D" else args[0]
    with pytest.raises(SnapshotError, match=words):
        publish_snapshot(directory, *args[1:])
    with pytest.raises(SnapshotError, match="keep must be an integer >= 1, got 0"):
        publish_snapshot(tmp_path / "k", {"object": np.ones(2)}, keep=0)


def _point_at(live, sequence, name, **changes):
    """Write a latest.json naming ``name`` as snapshot ``sequence`` (what a broken writer could leave)."""
    pointer = dict(json.loads((live / "latest.json").read_text()), sequence=sequence, file=name, **changes)
    tmp = live / "latest.json.tmp"
    tmp.write_text(json.dumps(pointer))
    os.replace(tmp, live / "latest.json")


def test_corrupt_live_snapshots_are_errors_and_the_poller_goes_on(tmp_path):
    """Real snapshot files broken as a crashed or foreign writer would: the poller raises SnapshotError
    naming the file, keeps its place, and hands out the next good snapshot."""
    live = tmp_path / "live"
    obj = np.ones((4, 5), dtype=np.complex64)
    publish_snapshot(live, {"object": obj}, {"batch": 1})
    poller = SnapshotPoller(live)
    assert poller.poll().sequence == 1
    good = (live / "snapshot-000001.npz").read_bytes()
    # a truncated snapshot file
    (live / "snapshot-000002.npz").write_bytes(good[: len(good) // 2])
    _point_at(live, 2, "snapshot-000002.npz")
    with pytest.raises(SnapshotError, match=r"snapshot '.*snapshot-000002.npz' is unreadable \(BadZipFile"):
        poller.poll()
    # garbage bytes under a good name
    (live / "snapshot-000003.npz").write_bytes(b"\x93NUMPY" + os.urandom(200))
    _point_at(live, 3, "snapshot-000003.npz")
    with pytest.raises(SnapshotError, match="snapshot-000003.npz' is unreadable"):
        poller.poll()
    # latest.json itself cut short, then one naming a file outside the directory
    (live / "latest.json").write_text('{"format": "sparkmpi-snapsh')
    with pytest.raises(SnapshotError, match="latest.json' is not JSON"):
        poller.poll()
    (live / "latest.json").write_text(json.dumps({"format": "sparkmpi-snapshot", "sequence": 4,
                                                  "file": "../../etc/passwd"}))
    with pytest.raises(SnapshotError, match="is not a sparkmpi-snapshot pointer"):
        poller.poll()
    assert poller.sequence == 1     # nothing broken was handed out
    # a snapshot that reads but holds no object: the viewer's loader says what is missing
    from sparkmpi.viz.loaders import ptycho_from_arrays

    publish_snapshot(live, {"probe": obj}, {"batch": 5})
    snap = poller.poll()
    with pytest.raises(WrongKindError, match="object"):
        ptycho_from_arrays(snap.arrays, source=f"snapshot {snap.path.name}")
    publish_snapshot(live, {"object": obj * 3}, {"batch": 6})
    snap = poller.poll()
    assert snap.meta == {"batch": 6} and snap.arrays["object"][0, 0] == 3


def test_reader_never_sees_half_a_snapshot_while_writer_runs(tmp_path):
    """A poller in a thread reads while the writer publishes; every snapshot it gets is whole."""
    live = tmp_path / "live"
    seen, errors, done = [], [], threading.Event()

    def read():
        poller = SnapshotPoller(live)
        while not done.is_set() or poller.sequence < 40:
            try:
                snap = poller.poll()
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(exc)
                return
            if snap is not None:
                k = snap.meta["k"]
                assert np.all(snap.arrays["object"] == k) and snap.arrays["object"].shape == (64, 64)
                seen.append(snap.sequence)

    reader = threading.Thread(target=read)
    reader.start()
    for k in range(1, 41):
        publish_snapshot(live, {"object": np.full((64, 64), k, dtype=np.complex64)}, {"k": k}, keep=2)
    done.set()
    reader.join(30)
    assert not reader.is_alive() and not errors
    assert seen == sorted(set(seen)) and seen[-1] == 40


# ----------------------------------------------------------------------- CLI
def test_port_in_use_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)
    with pytest.raises(ValueError, match="port must be an integer in"):
        check_port("127.0.0.1", 70000)


@pytest.mark.parametrize("name, words", [
    ("missing.tif", "does not exist"),
    ("notes.txt", "neither a tomography volume"),
    ("random.npz", "arrays ['a', 'b']"),
])
def test_cli_bad_input_one_line(files, capsys, name, words):
    assert main(["view", str(files["root"] / name)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparkmpi: error: ") and words in err


def test_cli_usage_and_port_in_use(files, capsys):
    assert main(["view"]) == 2
    assert "give either PATH or --live DIR" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", str(files["tif"]), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"sparkmpi: error: port {port} on 127.0.0.1 is in use; pick another with --port, " \
                          f"or leave it out for a free one"


def test_cli_truncated_file_no_traceback_in_real_process(files, tmp_path):
    data = open(files["tif"], "rb").read()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "-m", "sparkmpi.cli", "view", str(broken)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().startswith("sparkmpi: error: ") and "truncated" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


# ---------------------------------------------------------------------- fuzz
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparkmpi.viz import ViewerError  # noqa: E402

_MAGICS = [b"", b"II*\x00", b"MM\x00*", b"\x93NUMPY", b"PK\x03\x04", b'<?xml version="1.0"?><VTKFile type="ImageData">']


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.sampled_from(_MAGICS), tail=st.binary(max_size=300))
def test_garbage_only_raises_viewer_errors(tmp_path, magic, tail):
    path = tmp_path / "garbage.bin"
    path.write_bytes(magic + tail)
    for read in (detect_kind, load_volume, load_ptycho):
        try:
            read(path)
        except ViewerError:
            pass


def test_cut_real_files_raise_or_give_the_whole_data(files, tmp_path):
    """A file cut anywhere raises a ViewerError, or (cut only in trailing markup) reads back exactly."""
    for key in ("tif", "vti", "npy", "ptycho"):
        data = open(files[key], "rb").read()
        for cut in list(range(0, len(data), max(1, len(data) // 23))) + [len(data) - 1]:
            path = tmp_path / f"cut-{key}"
            path.write_bytes(data[:cut])
            try:
                got = load_ptycho(path).object if key == "ptycho" else load_volume(path)
            except ViewerError:
                continue
            np.testing.assert_array_equal(got, files["obj"] if key == "ptycho" else files["vol"])


def test_results_in_an_output_folder(files, tmp_path):
    from sparkmpi.viz.loaders import results_in

    assert results_in(files["root"]) == [files["ptycho"], Path(files["tif"])]
    assert results_in(files["root"] / "tomo") == [Path(files["tif"])]
    with pytest.raises(ResultNotFoundError, match="holds no result"):
        results_in(tmp_path)


def test_cli_view_of_a_folder_opens_its_result(files, capsys):
    with socket.socket() as busy:  # stops the viewer once it got as far as serving the file
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", str(files["root"]), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"showing {files['ptycho']}" in err and f"port {port} on 127.0.0.1 is in use" in err
    assert "is a directory" not in err
