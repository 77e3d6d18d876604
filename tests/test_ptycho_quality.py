"""Issue 18: the registered quality metric, probe constraints, position refinement, files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sparkmpi import ptycho
from sparkmpi.ptycho import errors as perr
from sparkmpi.ptycho import metrics


@pytest.fixture(scope="module")
def scan():
    return ptycho.simulate(96, 32, seed=1)


def _copy(obj, shift, ramp, scale):
    """``scale * obj(r - shift) e^{i ramp.r}``: the shift circular and exact (Fourier)."""
    return scale * metrics._fourier_shift(obj, shift) * metrics._ramp(obj.shape, *ramp)


# --------------------------------------------------------------------------- the metric
@pytest.mark.parametrize("shift,ramp,scale", [
    ((3.3, -5.7), (0.02, -0.035), 0.7 * np.exp(1.1j)),
    ((0.0, 0.0), (0.0, 0.0), 1.0),
    ((-7.6, 2.2), (-0.1, 0.05), 2.0 - 1.0j),
    ((0.45, 0.0), (0.0, 0.004), -0.3j),
])
def test_registered_nrmse_agrees_with_the_known_transform(scan, shift, ramp, scale):
    """A noisy object, shifted (subpixel), rescaled and phase-ramped: the reported NRMSE equals,
    to 1e-3, the NRMSE computed by undoing the known transform (independent of the search)."""
    truth = scan.object_true.astype(np.complex128)
    mask = ptycho.illuminated_mask(scan)
    rng = np.random.default_rng(7)
    noisy = truth + 0.03 * (rng.standard_normal(truth.shape) + 1j * rng.standard_normal(truth.shape))
    copy = _copy(noisy, shift, ramp, scale)
    # independent: undo the ramp, the shift and the scale as they were made
    undone = metrics._fourier_shift(copy * metrics._ramp(truth.shape, -ramp[0], -ramp[1]),
                                    (-shift[0], -shift[1])) / scale
    independent = float(np.linalg.norm((undone - truth)[mask]) / np.linalg.norm(truth[mask]))
    got = ptycho.register(copy, truth, mask)
    assert got.nrmse == pytest.approx(independent, abs=1e-3)
    assert got.shift_px == pytest.approx(shift, abs=0.05)
    assert got.ramp == pytest.approx(ramp, abs=1e-3)
    assert abs(got.scale * scale - 1) < 0.01   # gamma undoes the scale
    if shift != (0.0, 0.0):   # the plain metric is fooled by the translation
        assert got.nrmse_unregistered > 2 * got.nrmse
    assert ptycho.registered_nrmse(copy, truth, mask) == got.nrmse


def test_registered_nrmse_still_fails_wrong_objects(scan):
    truth = scan.object_true
    mask = ptycho.illuminated_mask(scan)
    rng = np.random.default_rng(0)
    blank = np.ones_like(truth)
    noise = np.exp(1j * rng.uniform(-np.pi, np.pi, truth.shape)).astype(truth.dtype)
    flipped = truth[::-1, ::-1]
    for wrong in (blank, noise, flipped):
        assert ptycho.registered_nrmse(wrong, truth, mask) > 0.3
    assert ptycho.registered_nrmse(truth, truth, mask) < 1e-6
    # no worse than the plain figure, ever
    assert ptycho.registered_nrmse(noise, truth, mask) <= ptycho.nrmse(noise, truth, mask) + 1e-12


def test_probe_quality_reports_the_opposite_shift(scan):
    probe = scan.probe_true.astype(np.complex128)
    moved = _copy(probe, (-2.5, 1.25), (0.0, 0.0), 3.0)
    q = ptycho.probe_quality(moved, scan.probe_true)
    assert q.nrmse < 1e-3 and q.shift_px == pytest.approx((-2.5, 1.25), abs=0.02)
    assert q.nrmse_unregistered > 0.3


def test_object_quality_and_bad_arguments(scan):
    q = ptycho.object_quality(scan.object_true, scan)
    assert q.nrmse < 1e-6 and set(q.as_dict()) >= {"nrmse", "shift_px", "nrmse_unregistered"}
    with pytest.raises(perr.FrameMismatchError, match="shape"):
        ptycho.register(scan.object_true[:5], scan.object_true)
    with pytest.raises(perr.FrameMismatchError, match="mask has shape"):
        ptycho.register(scan.object_true, scan.object_true, np.ones((3, 3), bool))
    with pytest.raises(perr.PtychoInputError, match="no pixels"):
        ptycho.register(scan.object_true, scan.object_true, np.zeros(scan.object_shape, bool))
    with pytest.raises(perr.PtychoInputError, match="upsample"):
        ptycho.register(scan.object_true, scan.object_true, upsample=0)
    with pytest.raises(perr.ProbeShapeError, match="probe"):
        ptycho.probe_quality(np.ones((3, 3)), scan.probe_true)


# --------------------------------------------------------------------------- probe constraints
@pytest.fixture(scope="module")
def off_centre(scan):
    """The nominal probe moved (5, -4) px: a start that is not the true probe."""
    return np.roll(ptycho.model_probe(scan), (5, -4), axis=(0, 1))


def test_centring_and_support_hold_the_probe_in_place(scan, off_centre):
    from sparkmpi.ptycho._engine import probe_offset, probe_support_mask

    free = ptycho.reconstruct(scan, iterations=60, probe=off_centre, probe_center=False,
                              probe_support=None)
    held = ptycho.reconstruct(scan, iterations=60, probe=off_centre)   # the defaults
    assert max(map(abs, probe_offset(free.probe))) > 3     # it stays where it started
    assert max(map(abs, probe_offset(held.probe))) < 1     # centred
    outside = probe_support_mask(scan.frame_shape, 0.8) == 0
    assert not held.probe[outside].any() and free.probe[outside].any()
    q_free, q_held = ptycho.object_quality(free.object, scan), ptycho.object_quality(held.object, scan)
    # the drifted reconstruction is as good once registered; only the plain metric is fooled
    assert q_free.nrmse < 0.02 and q_held.nrmse < 0.02
    assert q_free.nrmse_unregistered > 0.3 > 0.02 > q_held.nrmse_unregistered
    assert max(map(abs, q_free.shift_px)) > 3 > 0.5 > max(map(abs, q_held.shift_px))


def test_probe_power_normalisation(scan, off_centre):
    res = ptycho.reconstruct(scan, iterations=15, probe=off_centre * 3, probe_power=True,
                             probe_update_start=5)
    target = float(scan.intensities.sum(axis=(1, 2), dtype=np.float64).max())
    power = float((np.abs(res.probe.astype(np.complex128)) ** 2).sum())
    assert power == pytest.approx(target, rel=1e-5)
    plain = ptycho.reconstruct(scan, iterations=15, probe=off_centre * 3, probe_update_start=5)
    assert float((np.abs(plain.probe.astype(np.complex128)) ** 2).sum()) != pytest.approx(target, rel=1e-3)


@pytest.mark.parametrize("kernels", ["auto", "generic"])
def test_constraints_distributed_equal_one_process(scan, off_centre, kernels):
    """Support, centring (which fires: the start is off centre) and power, frames split over 2
    thread ranks: bit-equal to one process on the exact CPU path; the generic (CuPy) code to
    rounding."""
    pytest.importorskip("mpi4py")
    from ptycho_fixtures import run_ranks

    opts = dict(iterations=25, probe=off_centre, probe_update_start=3, probe_power=True,
                kernels=kernels)
    serial = ptycho.reconstruct(scan, **opts)
    out = run_ranks([0, 40, 96], lambda comm, sl: ptycho.reconstruct_rank(
        comm, scan.intensities[sl], scan.positions[sl], scan.object_shape, threads=1, **opts))
    for o in out:
        if kernels == "auto":
            np.testing.assert_array_equal(o.object, serial.object)
            np.testing.assert_array_equal(o.probe, serial.probe)
        else:
            mask = ptycho.illuminated_mask(scan)
            assert np.linalg.norm((o.object - serial.object)[mask]) < 1e-4 * np.linalg.norm(serial.object[mask])
    from sparkmpi.ptycho._engine import probe_offset
    assert max(map(abs, probe_offset(serial.probe))) < 1


def test_probe_constraint_options_are_checked():
    for bad in (0, -0.1, 2.0, "x", True):
        with pytest.raises(ptycho.PtychoInputError, match="probe_support must be"):
            ptycho.Options(probe_support=bad)
    with pytest.raises(ptycho.PtychoInputError, match="probe_center must be True or False"):
        ptycho.Options(probe_center="yes")


# --------------------------------------------------------------------------- files
CXI_GEOMETRY = dict(energy_j=8000 * 1.602176634e-19, distance_m=2.0, detector_pixel_m=75e-6)


def test_cxi_round_trip_converts_metres_with_the_documented_geometry(tmp_path, scan):
    from sparkmpi.ptycho import files

    path = files.write_cxi(tmp_path / "scan.cxi", scan, **CXI_GEOMETRY)
    got = files.read_scan(path)
    np.testing.assert_array_equal(got.intensities, scan.intensities)
    np.testing.assert_array_equal(got.positions, scan.positions - scan.positions.min(axis=0))
    assert got.object_shape == tuple(int(v) for v in
                                     (scan.positions - scan.positions.min(axis=0)).max(axis=0)
                                     + np.array(scan.frame_shape))
    # lambda z / (N p): 1.5498 A * 2 m / (32 * 75 um) = 129.2 nm
    wavelength = 6.62607015e-34 * 299792458.0 / CXI_GEOMETRY["energy_j"]
    expected = wavelength * 2.0 / (scan.frame_shape[0] * 75e-6)
    assert got.metadata["pixel_size_m"] == pytest.approx([expected, expected], rel=1e-6)
    # eV instead of CXI's joules is recognised
    import h5py

    with h5py.File(path, "r+") as f:
        f[files.CXI_PATHS["energy"]][()] = 8000.0
    assert files.read_scan(path).metadata["pixel_size_m"][0] == pytest.approx(expected, rel=1e-6)
    res = ptycho.reconstruct(got, iterations=5, probe=ptycho.model_probe(scan))
    assert np.isfinite(res.errors).all()


@pytest.mark.parametrize("break_it, exc, words", [
    (lambda f: f.__delitem__("entry_1/data_1/data"), perr.DataFormatError,
     "missing dataset 'entry_1/data_1/data'"),
    (lambda f: f.__delitem__("entry_1/sample_1/geometry_1/translation"), perr.DataFormatError,
     "missing dataset 'entry_1/sample_1/geometry_1/translation'"),
    (lambda f: f.__delitem__("entry_1/instrument_1/detector_1/distance"), perr.DataFormatError,
     "missing dataset 'entry_1/instrument_1/detector_1/distance'"),
    (lambda f: f.__delitem__("entry_1/instrument_1/source_1/energy"), perr.DataFormatError,
     "missing dataset 'entry_1/instrument_1/source_1/energy'"),
    (lambda f: [f.__delitem__("entry_1/instrument_1/detector_1/x_pixel_size"),
                f.__delitem__("entry_1/instrument_1/detector_1/y_pixel_size")],
     perr.DataFormatError, "x_pixel_size"),
    (lambda f: _replace(f, "entry_1/sample_1/geometry_1/translation", np.zeros((5, 3))),
     perr.FrameMismatchError, r"translation' has shape \(5, 3\); expected \(96, 3\)"),
    (lambda f: _replace(f, "entry_1/data_1/data", np.zeros((96, 32))),
     perr.FrameMismatchError, r"must be \(frames, rows, cols\), got shape \(96, 32\)"),
    (lambda f: _replace(f, "entry_1/instrument_1/detector_1/distance", -1.0),
     perr.DataFormatError, "distance' must hold a positive number"),
])
def test_bad_cxi_files_name_what_is_wrong(tmp_path, scan, break_it, exc, words):
    import h5py

    from sparkmpi.ptycho import files

    path = files.write_cxi(tmp_path / "scan.cxi", scan, **CXI_GEOMETRY)
    with h5py.File(path, "r+") as f:
        break_it(f)
    with pytest.raises(exc, match=words):
        files.read_scan(path)


def _replace(f, name, value):
    del f[name]
    f[name] = value


def test_not_hdf5_and_unknown_suffix(tmp_path):
    from sparkmpi.ptycho import files

    bad = tmp_path / "scan.cxi"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(perr.DataFormatError, match="cannot read CXI file"):
        files.read_scan(bad)
    with pytest.raises(perr.DataFormatError, match="expected a .cxi"):
        files.read_scan(tmp_path / "scan.tif")


def test_results_written_to_hdf5_with_positions(tmp_path, scan):
    import h5py

    res = ptycho.reconstruct(scan, iterations=3, probe=ptycho.model_probe(scan))
    written = ptycho.write_outputs(tmp_path / "out", res.object, res.probe, res.errors,
                                   summary={"nrmse": 0.1}, positions=res.positions)
    with h5py.File(written["hdf5"], "r") as f:
        np.testing.assert_array_equal(f["object"][()], res.object)
        np.testing.assert_array_equal(f["positions"][()], res.positions)
        assert '"nrmse": 0.1' in f.attrs["summary"]
    with np.load(written["arrays"]) as npz:
        np.testing.assert_array_equal(npz["positions"], scan.positions)


# --------------------------------------------------------------------------- position refinement
@pytest.fixture(scope="module")
def refine_scan():
    """128 frames of 48x48 (noise-free) and the exact-position reconstruction's NRMSE."""
    data = ptycho.simulate(128, 48, seed=0)
    exact = ptycho.reconstruct(data, iterations=100, probe=ptycho.model_probe(data))
    return data, ptycho.object_quality(exact.object, data).nrmse


@pytest.mark.parametrize("errors", [dict(random_px=2), dict(scale=1.03, rotation_deg=1.0)],
                         ids=["random-2px", "scale-rotation"])
def test_position_refinement_recovers_injected_errors(refine_scan, errors):
    """Injected errors (random up to 2 px; a 3 % scale with a 1 degree rotation): the position
    error falls to about half or less, and the NRMSE to within a few times the exact-position
    result, from ~100x (measured with the overlap-weighted step and gain 3: random
    1.63 -> 0.39 px, NRMSE 0.0049 against 0.285 unrefined and 0.0024 exact; systematic
    0.94 -> 0.45 px, 0.0059 against 0.216; before the weight, 0.028 and 0.042)."""
    from sparkmpi.ptycho.positions import perturb_positions, position_error

    data, exact = refine_scan
    noisy = perturb_positions(data.positions, data.frame_shape, data.object_shape, seed=1, **errors)
    scan = ptycho.PtychoData(data.intensities, noisy, data.object_shape)
    probe = ptycho.model_probe(data)
    plain = ptycho.reconstruct(scan, iterations=100, probe=probe)
    refined = ptycho.reconstruct(scan, iterations=100, probe=probe, refine_positions=True)
    before = position_error(noisy, data.positions)
    after = position_error(refined.positions, data.positions)
    assert after < 0.6 * before
    nrmse_plain = ptycho.object_quality(plain.object, data).nrmse
    nrmse_refined = ptycho.object_quality(refined.object, data).nrmse
    assert nrmse_refined < 0.1 * nrmse_plain and nrmse_refined < 5 * exact
    assert sum(refined.positions_moved) > 0
    assert refined.positions.dtype == np.float64 and refined.positions.shape == noisy.shape
    assert np.abs(refined.positions - noisy).max() <= 8.0 + 1e-9   # position_max_shift


def test_overlap_weight_is_the_share_of_illumination_from_the_other_frames():
    """``w = 1 - |P|^2 / D``: 0 where the frame alone lights the object (or nothing does), 1/2
    where one other frame lights it as brightly, near 1 where many others do."""
    from sparkmpi.ptycho.positions import overlap_weight

    probe = np.full((2, 3), 2.0 + 0j, dtype=np.complex64)     # |P|^2 = 4
    den = np.array([[[4.0, 8.0, 40.0], [0.0, 3.9, 16.0]]], dtype=np.float32)
    np.testing.assert_allclose(overlap_weight(probe, den)[0],
                               [[0.0, 0.5, 0.9], [0.0, 0.0, 0.75]], atol=1e-7)


def test_position_sums_fused_kernel_equals_the_array_code_with_the_overlap_weight():
    """The CPU's fused pass and the array code (CuPy's) give the same weighted sums; a frame
    whose pixels are lit by it alone has no evidence (all five sums 0), and without the
    weight it would have some."""
    from sparkmpi.ptycho._fused import HAVE_NUMBA, FusedOps, NumpyOps
    from sparkmpi.ptycho.positions import position_sums

    rng = np.random.default_rng(3)
    frame, shape = (16, 12), (40, 36)
    pos = np.array([[0, 0], [24, 24], [5, 13], [6, 14], [4, 15]])

    def cplx(*s):
        return (rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(np.complex64)

    chi, probe, grad_y, grad_x = cplx(5, *frame), cplx(*frame), cplx(*shape), cplx(*shape)
    power = np.abs(probe).astype(np.float64) ** 2
    den = np.zeros(shape)
    for y, x in pos:
        den[y:y + 16, x:x + 12] += power
    den = den.astype(np.float32)                 # frames 0 and 1 overlap no other frame
    ops = [NumpyOps(pos, frame, shape)] + ([FusedOps(pos, frame, shape)] if HAVE_NUMBA else [])
    got = [o.position_sums(chi, probe, grad_y, grad_x, den) for o in ops]
    win = [np.stack([g[y:y + 16, x:x + 12] for y, x in pos]) for g in (grad_y, grad_x, den)]
    array = position_sums(probe, win[0], win[1], chi, np, den=win[2])
    for g in got:
        np.testing.assert_allclose(g, array, rtol=1e-6, atol=1e-9 * np.abs(array).max())
    assert np.all(np.abs(array[:2]) < 1e-6 * np.abs(array).max())   # float32 D: w ~ 1e-7
    assert np.all(np.abs(array[2:, :2]) > 0)
    unweighted = position_sums(probe, win[0], win[1], chi, np)
    assert np.all(np.abs(unweighted[:2, :2]) > 0)


def test_position_sums_of_the_exact_and_generic_engines_agree(scan):
    """The exact CPU engine (fused kernel) and the generic engine (the array code CuPy runs)
    give the same weighted sums for the same state, denominator included."""
    from sparkmpi.backend import get_backend
    from sparkmpi.ptycho._engine import make_engine

    bk = get_backend("numpy")
    probe = ptycho.model_probe(scan)
    rng = np.random.default_rng(5)
    obj = (1 + 0.3 * rng.standard_normal(scan.object_shape)).astype(np.complex64)
    engines = [make_engine(bk, scan.intensities, scan.positions, scan.object_shape, probe, obj,
                           None, None, 1e-3, 1, kernels=k) for k in ("auto", "generic")]
    try:
        chi = (rng.standard_normal(scan.intensities.shape) + 0j).astype(np.complex64)
        grad_y = np.roll(obj, -1, axis=0) - obj
        grad_x = np.roll(obj, -1, axis=1) - obj
        sums = [e._position_sums(chi, grad_y, grad_x, e.geom.scatter_probe_power(e.P))
                for e in engines]
    finally:
        for e in engines:
            e.close()
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-5, atol=1e-7 * np.abs(sums[1]).max())


def test_position_refinement_distributed_equals_one_process(scan):
    """Frames split over 2 thread ranks (exact CPU path and the generic/CuPy code): the same
    object, probe and refined positions as one process, bit for bit."""
    pytest.importorskip("mpi4py")
    from ptycho_fixtures import run_ranks
    from sparkmpi.ptycho.positions import perturb_positions

    noisy = perturb_positions(scan.positions, scan.frame_shape, scan.object_shape,
                              random_px=2, seed=1)
    for kernels in ("auto", "generic"):
        opts = dict(iterations=24, probe=ptycho.model_probe(scan), refine_positions=True,
                    position_refine_start=3, position_refine_interval=2, kernels=kernels)
        serial = ptycho.reconstruct(dict(intensities=scan.intensities, positions=noisy,
                                         object_shape=scan.object_shape), **opts)
        out = run_ranks([0, 40, 96], lambda comm, sl: ptycho.reconstruct_rank(
            comm, scan.intensities[sl], noisy[sl], scan.object_shape, threads=1, **opts))
        assert sum(serial.positions_moved) > 0
        np.testing.assert_array_equal(np.concatenate([o.positions for o in out]), serial.positions)
        for o in out:
            np.testing.assert_array_equal(o.object, serial.object)
            np.testing.assert_array_equal(o.probe, serial.probe)
            assert o.positions_moved == serial.positions_moved


def test_resume_carries_refined_positions(scan):
    from sparkmpi.ptycho.positions import perturb_positions

    noisy = perturb_positions(scan.positions, scan.frame_shape, scan.object_shape,
                              random_px=2, seed=1)
    data = dict(intensities=scan.intensities, positions=noisy, object_shape=scan.object_shape)
    opts = dict(probe=ptycho.model_probe(scan), refine_positions=True, position_refine_start=2,
                position_refine_interval=2)
    one = ptycho.reconstruct(data, iterations=20, **opts)
    first = ptycho.reconstruct(data, iterations=9, **opts)
    second = ptycho.reconstruct(data, iterations=11, state=first.state, **opts)
    # a resumed run is not bit-equal (the state's exit waves pass through two float32 FFTs)
    np.testing.assert_allclose(second.positions, one.positions, atol=1e-3)
    assert first.positions_moved + second.positions_moved == one.positions_moved
    np.testing.assert_array_equal(second.state.positions_whole, one.state.positions_whole)
    assert np.abs(second.object - one.object).max() < 1e-2


def test_position_options_are_checked():
    for field, bad, words in [("position_refine_interval", 0, "position_refine_interval must be"),
                              ("position_max_step", 0, "position_max_step must be"),
                              ("position_max_shift", -1, "position_max_shift must be"),
                              ("position_refine_stop", -2, "position_refine_stop must be"),
                              ("position_refine_settle", 0, "position_refine_settle must be"),
                              ("refine_positions", 1, "refine_positions must be True or False")]:
        with pytest.raises(ptycho.PtychoInputError, match=words):
            ptycho.Options(**{field: bad})
    o = ptycho.Options(refine_positions=True, position_refine_start=4, position_refine_interval=3,
                       position_refine_stop=12)
    assert [i for i in range(20) if o.refines_positions(i)] == [4, 7, 10]
    assert not any(ptycho.Options().refines_positions(i) for i in range(50))
    fixed = dataclasses.replace(o, position_refine_settle=None).refinement_schedule()
    assert [i for i in range(20) if fixed.due(i)] == [4, 7, 10]


def _steps(schedule, moves, iterations=100):
    """The iterations a schedule refines at, each step moving ``moves(k)`` frames (k-th step)."""
    done = []
    for it in range(iterations):
        if schedule.due(it):
            schedule.record(it, moves(len(done)))
            done.append(it)
    return done


def test_refinement_backs_off_once_no_frame_changes_pixel_and_comes_back_when_one_does():
    from sparkmpi.ptycho.positions import RefinementSchedule

    moves = [5, 3, 0, 1, 0, 0, 2, 0, 0, 0]   # 1 of 100 frames is still, 2 is not
    steps = _steps(RefinementSchedule(10, 4, None, settle=2, frames=100),
                   lambda k: moves[k] if k < len(moves) else 0)
    # 2 still steps (18, 22), then 8, 16, 16 (at most 4 x 4); 2 moves at 62 put 4 back
    assert steps[:10] == [10, 14, 18, 22, 30, 46, 62, 66, 70, 78], steps
    assert _steps(RefinementSchedule(10, 4, 50, settle=None), lambda k: 0) == list(range(10, 50, 4))
    assert _steps(RefinementSchedule(10, 4, None, settle=2, frames=100), lambda k: 2) == list(range(10, 100, 4))
    assert _steps(RefinementSchedule(10, 4, None, settle=2, frames=1000), lambda k: 5)[:4] == [10, 14, 22, 38]
    resumed = RefinementSchedule(10, 4, None, settle=2)
    assert [i for i in range(37, 50) if resumed.due(i)][:1] == [38]   # the base grid in a resumed call


def test_cli_reconstructs_a_cxi_file_and_reports_the_registered_metric(tmp_path, scan, capsys):
    """``sparkmpi ptycho reconstruct scan.cxi --refine-positions --json``: reads the CXI file,
    writes NPZ, PNG and HDF5 with the positions; an NPZ with ground truth reports the registered
    NRMSE and shift; a bad CXI file fails with the dataset named (exit 1) before iterating."""
    import json

    import h5py

    from sparkmpi.cli import main
    from sparkmpi.ptycho import files

    cxi = files.write_cxi(tmp_path / "scan.cxi", scan, **CXI_GEOMETRY)
    assert main(["ptycho", "reconstruct", str(cxi), "--iterations", "12", "--probe-init", "data",
                 "--refine-positions", "--position-refine-start", "4", "--out",
                 str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "nrmse" not in summary and set(summary["files"]) >= {"arrays", "hdf5"}
    with h5py.File(summary["files"]["hdf5"], "r") as f:
        assert f["positions"].shape == (scan.n_frames, 2)
    npz = scan.save(tmp_path / "scan.npz")
    assert main(["ptycho", "reconstruct", str(npz), "--iterations", "30", "--out",
                 str(tmp_path / "out2"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < summary["nrmse"] < 0.05 and len(summary["shift_px"]) == 2
    assert summary["nrmse"] <= summary["nrmse_unregistered"] + 1e-12
    assert "probe_nrmse" in summary
    with h5py.File(cxi, "r+") as f:
        del f[files.CXI_PATHS["translation"]]
    assert main(["ptycho", "reconstruct", str(cxi), "--out", str(tmp_path / "out3")]) == 1
    assert "entry_1/sample_1/geometry_1/translation" in capsys.readouterr().err
