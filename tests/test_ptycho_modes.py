"""Mixed-state (incoherent) probe modes (issue 18, item 4; Thibault & Menzel 2013).

Partially coherent data (two modes, 70/30 power) need the modal projection: one
mode cannot fit them.  Small scans (32x32 frames), few iterations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkmpi import ptycho
from sparkmpi.ptycho import modes as pmodes
from sparkmpi.ptycho.errors import PtychoInputError

from ptycho_fixtures import rel_in_mask, run_ranks


@pytest.fixture(scope="module")
def mixed():
    """96 frames of 32x32, noise-free, a beam of two incoherent modes (70 % / 30 %)."""
    return ptycho.simulate(frames=96, frame_size=32, seed=1, mode_powers=(0.7, 0.3))


@pytest.fixture(scope="module")
def runs(mixed):
    """40 DM iterations with 1 and with 2 modes from the nominal probe."""
    probe = ptycho.model_probe(mixed)
    opts = dict(iterations=40, probe=probe, threads=1)
    return {m: ptycho.reconstruct(mixed, probe_modes=m, **opts) for m in (1, 2)}


def _gram(modes):
    flat = np.asarray(modes, np.complex128).reshape(len(modes), -1)
    return flat.conj() @ flat.T


def test_simulated_modes_are_orthogonal_with_the_given_powers(mixed, tmp_path):
    modes = mixed.probe_modes_true
    assert modes.shape == (2, 32, 32) and mixed.metadata["probe_modes"] == 2
    gram = _gram(modes)
    assert abs(gram[0, 1]) < 1e-5 * abs(gram[0, 0])
    np.testing.assert_allclose(ptycho.mode_powers(modes), (0.7, 0.3), atol=1e-6)
    np.testing.assert_array_equal(mixed.probe_true, modes[0])
    # the intensities are the incoherent sum of the modes' (not one coherent probe's)
    from sparkmpi.ptycho.simulate import far_field

    coherent = ptycho.simulate(frames=96, frame_size=32, seed=1)
    assert float((np.abs(modes) ** 2).sum()) == pytest.approx(
        float((np.abs(coherent.probe_true) ** 2).sum()), rel=1e-5)
    incoherent = sum(far_field(m, mixed.object_true, mixed.positions) for m in modes)
    np.testing.assert_allclose(mixed.intensities, incoherent, rtol=1e-5, atol=1e-3)
    assert not np.allclose(mixed.intensities, coherent.intensities, rtol=0.05)
    loaded = ptycho.load(mixed.save(tmp_path / "mixed.npz"))
    np.testing.assert_array_equal(loaded.probe_modes_true, modes)
    assert loaded.subset(slice(0, 4)).probe_modes_true is not None


def test_two_modes_fit_partially_coherent_data_one_cannot(mixed, runs):
    """The acceptance test: with the mode sum in the projection (a / sqrt(sum_m |Psi_m|^2))
    the 2-mode run fits the data 10x better and its object is 10x closer to the truth
    (measured: Fourier error 0.016 vs 0.143, NRMSE 0.056 vs 0.34); scaling each mode by
    its own modulus instead (the bug this guards against) leaves both no better than
    one mode's."""
    one, two = runs[1], runs[2]
    assert two.fourier_error < 0.25 * one.fourier_error
    q1 = ptycho.object_quality(one.object, mixed)
    q2 = ptycho.object_quality(two.object, mixed)
    assert q2.nrmse < 0.3 * q1.nrmse and q2.nrmse < 0.08
    assert two.probe_modes.shape == (2, 32, 32) and two.probe.shape == (32, 32)
    np.testing.assert_array_equal(two.probe, two.probe_modes[0])
    np.testing.assert_allclose(two.mode_powers, (0.7, 0.3), atol=0.05)
    quality = ptycho.probe_quality(two.probe_modes, mixed.probe_modes_true)
    assert quality.nrmse < 0.1 and quality.mode_powers == pytest.approx(two.mode_powers)
    assert "probe_mode_powers" in quality.as_dict("probe_")
    assert one.probe_modes.shape == (1, 32, 32) and one.mode_powers == (1.0,)


def test_modes_stay_orthogonal_and_sorted(mixed):
    probe = ptycho.model_probe(mixed)
    out = ptycho.reconstruct(mixed, iterations=15, probe=probe, probe_modes=3,
                             probe_update_start=2, algorithm="raar", threads=1)
    gram = _gram(out.probe_modes)
    off = np.abs(gram - np.diag(np.diag(gram))).max()
    assert off < 1e-5 * abs(gram[0, 0])
    powers = out.mode_powers
    assert powers[0] > powers[1] > powers[2] > 0 and sum(powers) == pytest.approx(1.0)


def test_orthogonalize_keeps_the_mixed_state_and_is_a_fixed_point():
    rng = np.random.default_rng(3)
    raw = (rng.normal(size=(3, 16, 16)) + 1j * rng.normal(size=(3, 16, 16))).astype(np.complex64)
    modes, mixing = ptycho.orthogonalize_modes(raw)
    gram = _gram(modes)
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-4 * abs(gram[0, 0])
    assert np.all(np.diff(np.diag(gram).real) < 0)
    np.testing.assert_allclose(mixing.conj().T @ mixing, np.eye(3), atol=1e-12)
    # the coherence function sum_m P_m(r) P_m(r')^* is unchanged
    flat_raw, flat = raw.reshape(3, -1), modes.reshape(3, -1)
    np.testing.assert_allclose(flat.T @ flat.conj(), flat_raw.T @ flat_raw.conj(), atol=2e-4)
    again, _ = ptycho.orthogonalize_modes(modes)
    np.testing.assert_allclose(again, modes, atol=1e-5 * np.abs(modes).max())
    # the exit waves get the same mixing: each frame's modes, mixed, are the new modes
    waves = np.stack([raw, 2 * raw])
    pmodes.mix_waves(waves, mixing)
    np.testing.assert_allclose(waves[1], 2 * modes, atol=1e-4 * np.abs(modes).max())


def test_initial_modes_are_deterministic_and_keep_the_power():
    probe = ptycho.make_probe((32, 32), kind="gaussian", power=100.0)
    first = ptycho.initial_modes(probe, 4)
    np.testing.assert_array_equal(first, ptycho.initial_modes(probe, 4))
    assert first.shape == (4, 32, 32)
    assert float((np.abs(first) ** 2).sum()) == pytest.approx(100.0, rel=1e-5)
    np.testing.assert_allclose(ptycho.mode_powers(first), (0.90, 0.05, 0.03, 0.02), atol=1e-4)


@pytest.mark.parametrize("algorithm", ["dm", "raar"])
def test_ranks_equal_one_process_with_modes(mixed, algorithm):
    """Thread 'ranks' (sums in another order) equal one process to the generic engine's
    1e-6 (measured: bit for bit, the complex128 sums of few terms being exact)."""
    pytest.importorskip("mpi4py")
    mask = ptycho.illuminated_mask(mixed)
    run = dict(algorithm=algorithm, iterations=20, probe=ptycho.model_probe(mixed),
               probe_update_start=5, probe_modes=2, threads=1)
    serial = ptycho.reconstruct(mixed, **run)
    out = run_ranks([0, 40, 96], lambda comm, sl: ptycho.reconstruct_rank(
        comm, mixed.intensities[sl], mixed.positions[sl], mixed.object_shape, **run))
    every = np.ones(serial.probe_modes.shape, bool)
    for o in out:
        assert rel_in_mask(o.object, serial.object, mask) < 1e-6
        assert rel_in_mask(o.probe_modes, serial.probe_modes, every) < 1e-6
        np.testing.assert_allclose(o.errors, serial.errors, rtol=1e-6)


def test_resume_with_modes_equals_one_run(mixed):
    run = dict(probe=ptycho.model_probe(mixed), probe_update_start=3, probe_modes=2, threads=1)
    whole = ptycho.reconstruct(mixed, iterations=12, **run)
    first = ptycho.reconstruct(mixed, iterations=7, **run)
    assert first.state.exit_waves.shape == (96, 2, 32, 32)
    rest = ptycho.reconstruct(mixed, iterations=5, state=first.state, **run)
    # float32 round-off: the state's exit waves pass through one inverse and one forward FFT
    assert rel_in_mask(rest.object, whole.object, ptycho.illuminated_mask(mixed)) < 1e-4
    np.testing.assert_allclose(rest.errors, whole.errors, rtol=1e-4)
    with pytest.raises(ptycho.FrameMismatchError, match="probe_modes=3"):
        ptycho.reconstruct(mixed, iterations=1, state=first.state,
                           **dict(run, probe_modes=3))


@pytest.mark.parametrize("settings, words", [
    (dict(probe_modes=0), "probe_modes must be an integer from 1 to 4, got 0"),
    (dict(probe_modes=5), "probe_modes must be an integer from 1 to 4, got 5"),
    (dict(probe_modes=1.5), "probe_modes must be an integer"),
    (dict(probe_modes=True), "probe_modes must be an integer"),
    (dict(probe_modes=2, kernels="numba"), "kernels='numba'"),
    (dict(probe_modes=2, kernels="numpy"), "needs kernels='auto' or 'generic'"),
    (dict(probe_modes=2, refine_positions=True), "refine_positions cannot yet"),
])
def test_bad_mode_options_are_named(settings, words):
    with pytest.raises(PtychoInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ptycho.Options(**settings)


def test_auto_kernels_pick_the_generic_engine_for_modes(mixed):
    from sparkmpi.ptycho._engine import ExactEngine, GenericEngine, make_engine
    from sparkmpi.backend import get_backend

    bk = get_backend("numpy")
    probe = ptycho.model_probe(mixed)
    args = (mixed.intensities, mixed.positions, mixed.object_shape)
    obj = np.ones(mixed.object_shape, np.complex64)
    for p, cls in ((probe, ExactEngine), (ptycho.initial_modes(probe, 2), GenericEngine)):
        eng = make_engine(bk, *args, p, obj, None, None, 1e-4, 1, kernels="auto")
        assert type(eng) is cls
        eng.close()
    with pytest.raises(PtychoInputError, match="single-mode"):
        make_engine(bk, *args, ptycho.initial_modes(probe, 2), obj, None, None, 1e-4, 1,
                    kernels="numba")


def test_bad_mode_inputs_raise_before_iterating(mixed):
    probe = ptycho.model_probe(mixed)
    with pytest.raises(PtychoInputError, match=r"probe must have shape \(H, W\) or \(2, H, W\)"):
        ptycho.reconstruct(mixed, iterations=1, probe=ptycho.initial_modes(probe, 3),
                           probe_modes=2)
    with pytest.raises(PtychoInputError, match="mode_powers must be positive and decreasing"):
        ptycho.simulate(frames=8, frame_size=16, mode_powers=(0.3, 0.7))
    with pytest.raises(PtychoInputError, match="mode_powers must hold 2 to 4"):
        ptycho.simulate(frames=8, frame_size=16, mode_powers=(1.0,))
    with pytest.raises(PtychoInputError, match="modes must be an integer from 1 to 4"):
        ptycho.initial_modes(probe, 5)


def test_outputs_and_cli_carry_every_mode(mixed, tmp_path):
    from sparkmpi.cli import main

    h5py = pytest.importorskip("h5py")
    path = mixed.save(tmp_path / "mixed.npz")
    out = tmp_path / "out"
    assert main(["--json", "ptycho", "reconstruct", str(path), "--iterations", "6",
                 "--probe-modes", "2", "--out", str(out)]) == 0
    with np.load(out / "reconstruction.npz") as npz:
        assert npz["probe"].shape == (32, 32) and npz["probe_modes"].shape == (2, 32, 32)
        summary = json.loads(str(npz["summary"]))
        np.testing.assert_array_equal(npz["probe"], npz["probe_modes"][0])
    assert summary["probe_modes"] == 2 and len(summary["probe_mode_powers"]) == 2
    assert summary["mode_powers"] == summary["probe_mode_powers"]
    with h5py.File(out / "reconstruction.h5", "r") as f:
        assert f["probe_modes"].shape == (2, 32, 32) and f["probe"].shape == (32, 32)
    assert (out / "probe_modes_amplitude.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["ptycho", "reconstruct", str(path), "--probe-modes", "5", "--out", str(out)])
    assert exit_info.value.code == 2
    sim = tmp_path / "sim.npz"
    assert main(["ptycho", "simulate", "--frames", "8", "--frame-size", "16",
                 "--mode-powers", "0.8,0.2", "--out", str(sim)]) == 0
    assert ptycho.load(sim).probe_modes_true.shape == (2, 16, 16)
    assert main(["ptycho", "simulate", "--frames", "8", "--frame-size", "16",
                 "--mode-powers", "0.2,0.8", "--out", str(sim)]) == 2


def test_bench_reports_one_mode_and_modes_side_by_side():
    import argparse

    from sparkmpi.bench import ptycho as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--frames", "64", "--frame-size", "32", "--iterations", "25",
                              "--probe-modes", "2", "--no-spark", "--no-mpiexec"])
    report = bench.run(args)
    assert report["probe_modes"] == 2 and report["mode_powers_true"] == pytest.approx([0.7, 0.3])
    assert report["nrmse_modes"] == report["nrmse"] < 0.5 * report["nrmse_1mode"]
    assert report["fourier_error_modes"] < 0.5 * report["fourier_error_1mode"]
    for key in ("seconds_per_iteration_modes", "seconds_per_iteration_1mode",
                "seconds_per_iteration_1mode_generic", "modes_vs_1mode_generic_seconds_ratio",
                "probe_nrmse"):
        assert report[key] > 0


def test_streaming_with_modes(mixed):
    stream = ptycho.StreamingReconstruction(mixed.object_shape, mixed.frame_shape,
                                            probe=ptycho.model_probe(mixed), probe_modes=2,
                                            probe_update_start=2, threads=1)
    result = stream.consume(ptycho.micro_batches(mixed, 48), 10)
    assert stream.n_frames == 96 and result.probe_modes.shape == (2, 32, 32)
    assert result.state.exit_waves.shape == (96, 2, 32, 32)
    assert result.errors[-1] < result.errors[0]
