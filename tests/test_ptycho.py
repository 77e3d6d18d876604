"""Ptychography: simulator, engines, distributed hook, streaming, metrics, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparkmpi import ptycho
from sparkmpi.ptycho import errors as perr
from sparkmpi.errors import UsageError

from ptycho_fixtures import rel_in_mask as _rel_in_mask, run_ranks as _run_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
    """96 frames of 48x48, in-focus aperture, noise-free (seeded)."""
    return ptycho.simulate(frames=96, frame_size=48, seed=1)


# --------------------------------------------------------------------------- simulator
def test_simulate_layout_and_truth(small):
    d = small
    assert d.intensities.shape == (96, 48, 48) and d.intensities.dtype == np.float32
    assert d.positions.shape == (96, 2) and d.positions.dtype == np.int64
    assert d.object_true.dtype == np.complex64 and d.object_true.shape == d.object_shape
    assert d.probe_true.shape == (48, 48)
    assert d.positions.min() == 0
    assert (d.positions.max(axis=0) + 48 == np.array(d.object_shape)).all()
    # forward model: intensities are |fftshift(FFT_ortho(P O_j))|^2
    j = 17
    y, x = d.positions[j]
    wave = d.probe_true * d.object_true[y:y + 48, x:x + 48]
    expect = np.abs(np.fft.fftshift(np.fft.fft2(wave, norm="ortho"))) ** 2
    np.testing.assert_allclose(d.intensities[j], expect, rtol=1e-4, atol=1e-3 * expect.max())
    # energy: sum of a frame equals sum |P O_j|^2 (orthonormal FFT)
    assert d.intensities[j].sum() == pytest.approx(np.sum(np.abs(wave) ** 2), rel=1e-4)
    # amplitude and phase ranges of the skimage-based object
    amp, pha = np.abs(d.object_true), np.angle(d.object_true)
    assert 0.49 < amp.min() and amp.max() < 1.01
    assert -np.pi / 3 - 0.01 < pha.min() and pha.max() < np.pi / 3 + 0.01


def test_simulate_is_seeded_and_noise_is_poisson():
    a = ptycho.simulate(frames=16, frame_size=32, photons=1e4, seed=3)
    b = ptycho.simulate(frames=16, frame_size=32, photons=1e4, seed=3)
    c = ptycho.simulate(frames=16, frame_size=32, photons=1e4, seed=4)
    np.testing.assert_array_equal(a.intensities, b.intensities)
    assert not np.array_equal(a.intensities, c.intensities)
    assert np.array_equal(a.intensities, np.round(a.intensities))   # photon counts
    clean = ptycho.simulate(frames=16, frame_size=32, photons=1e4, seed=3)
    assert clean.intensities.sum(axis=(1, 2)).mean() == pytest.approx(
        a.intensities.sum(axis=(1, 2)).mean(), rel=0.05)


def test_scan_overlap_and_raster():
    step = ptycho.simulate(frames=64, frame_size=64, overlap=0.7).metadata["scan_step"]
    assert step == pytest.approx(0.375 * 64 * 0.3)
    r = ptycho.simulate(frames=25, frame_size=32, scan="raster", seed=0)
    assert len(np.unique(r.positions, axis=0)) == 25
    pts = ptycho.simulate.__globals__["scan_positions"](200, 10.0)
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    assert 8.0 < np.median(dist.min(axis=1)) < 12.0   # neighbour distance ~ step


def test_probe_kinds_and_fresnel():
    for kind in ("aperture", "focused", "gaussian"):
        p = ptycho.make_probe((64, 64), kind=kind, diameter=20, power=100.0)
        assert p.dtype == np.complex64
        assert np.sum(np.abs(p) ** 2) == pytest.approx(100.0, rel=1e-4)
    p = ptycho.make_probe((64, 64), diameter=20)
    q = ptycho.fresnel_propagate(p, 50e-6)
    back = ptycho.fresnel_propagate(q, -50e-6)
    np.testing.assert_allclose(back, p, atol=1e-3 * np.abs(p).max())
    assert np.sum(np.abs(q) ** 2) == pytest.approx(np.sum(np.abs(p) ** 2), rel=1e-4)
    assert not np.allclose(q, p, atol=1e-2 * np.abs(p).max())


def test_save_load_roundtrip(tmp_path, small):
    path = small.save(tmp_path / "scan")
    assert path.name == "scan.npz" and not (tmp_path / "scan.npz.part").exists()
    back = ptycho.load(path)
    np.testing.assert_array_equal(back.intensities, small.intensities)
    np.testing.assert_array_equal(back.positions, small.positions)
    np.testing.assert_array_equal(back.object_true, small.object_true)
    assert back.object_shape == small.object_shape
    assert back.metadata["format"] == "sparkmpi-ptycho" and back.metadata["frames"] == 96
    np.savez(tmp_path / "bad.npz", intensities=small.intensities)
    with pytest.raises(perr.DataFormatError, match="missing key"):
        ptycho.load(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- engines
# Bounds ~2x the figures recorded in BENCHMARKS.md ("Quality bounds of the tests"): object NRMSE
# after 60 iterations, and the Fourier error's fall (last / first).
@pytest.mark.parametrize("algorithm,bound,fall", [("dm", 0.0065, 0.013), ("raar", 0.0017, 0.0012)])
def test_engines_converge(small, algorithm, bound, fall):
    mask = ptycho.illuminated_mask(small)
    start = ptycho.nrmse(np.ones(small.object_shape, np.complex64), small.object_true, mask)
    res = ptycho.reconstruct(small, algorithm=algorithm, iterations=60,
                             probe=ptycho.model_probe(small))
    err = ptycho.nrmse(res.object, small.object_true, mask)
    assert err < bound < start            # the blank (starting) object fails the bound
    assert ptycho.nrmse(np.roll(res.object, 3, axis=1), small.object_true, mask) > bound   # so does a shift
    assert res.errors.shape == (60,)
    assert res.errors[-1] < fall * res.errors[0]
    assert res.object.dtype == np.complex64 and res.probe.dtype == np.complex64


@pytest.mark.slow
def test_dm_reaches_issue_target_at_default_size():
    """The issue's target: DM, 512 frames of 128x128 (noise-free, default overlap), probe
    refined from the nominal aperture at iteration 10: NRMSE <= 0.05 after 100 iterations
    (measured 0.0096, Fourier error 0.0028; 0.071 before the probe-ramp pinning changed object
    and exit waves along with the probe).  Asserted: 2x the measured figures."""
    data = ptycho.simulate(512, 128, seed=0)
    res = ptycho.reconstruct(data, algorithm="dm", iterations=100,
                             probe=ptycho.model_probe(data))
    assert ptycho.object_nrmse(res.object, data) <= 0.02
    assert res.errors[-1] < 0.0055
    assert ptycho.object_nrmse(np.ones_like(res.object), data) > 0.02   # a blank object fails


def test_fixed_true_probe_recovers_object(small):
    res = ptycho.reconstruct(small, iterations=60, probe=small.probe_true, probe_update_start=None)
    np.testing.assert_array_equal(res.probe, small.probe_true)
    assert ptycho.object_nrmse(res.object, small) < 0.05          # measured 0.029
    assert ptycho.object_nrmse(np.ones_like(res.object), small) > 0.05


def test_resume_equals_one_run(small):
    # Float32 round-off (the state's exit waves pass through one inverse and one
    # forward FFT) grows while the probe is refined, so compare over the lit region.
    probe = ptycho.model_probe(small)
    mask = ptycho.illuminated_mask(small)
    for start, tol in ((None, 1e-5), (5, 1e-3)):
        whole = ptycho.reconstruct(small, iterations=16, probe=probe, probe_update_start=start)
        first = ptycho.reconstruct(small, iterations=7, probe=probe, probe_update_start=start)
        second = ptycho.reconstruct(small, iterations=9, probe_update_start=start,
                                    state=first.state)
        assert second.state.iteration == 16 and len(second.errors) == 16
        assert _rel_in_mask(second.object, whole.object, mask) < tol
        np.testing.assert_allclose(second.errors[:8], whole.errors[:8], rtol=1e-4)


def test_callback_and_options(small):
    seen = []
    ptycho.reconstruct(small, iterations=3, callback=lambda i, e: seen.append((i, e)))
    assert [i for i, _ in seen] == [0, 1, 2] and all(e > 0 for _, e in seen)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ptycho.reconstruct(small, algorithm="hio")
    with pytest.raises(ValueError, match="beta must be in"):
        ptycho.reconstruct(small, beta=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        ptycho.reconstruct(small, backend="tpu", iterations=1)


# --------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("edges", [[0, 48, 96], [0, 20, 61, 96]], ids=["2ranks", "3ranks"])
@pytest.mark.parametrize("algorithm,kernels", [("dm", "auto"), ("raar", "auto"), ("dm", "numpy")])
def test_partition_equals_serial_in_process(small, edges, algorithm, kernels):
    """Frames split over 2 or 3 thread 'ranks', probe refined from iteration 5 for 30
    iterations: the same object and probe as one process, within 1e-4 relative (the
    issue's bound; the quantised sums make it exact, so 1e-6 is asserted too)."""
    pytest.importorskip("mpi4py")
    probe = ptycho.model_probe(small)
    mask = ptycho.illuminated_mask(small)
    opts = dict(algorithm=algorithm, iterations=30, probe=probe, probe_update_start=5,
                kernels=kernels)
    serial = ptycho.reconstruct(small, **opts)
    out = _run_ranks(edges, lambda comm, sl: ptycho.reconstruct_rank(
        comm, small.intensities[sl], small.positions[sl], small.object_shape, threads=1,
        **opts))
    for o in out:
        rel_o = _rel_in_mask(o.object, serial.object, mask)
        rel_p = _rel_in_mask(o.probe, serial.probe, np.ones(o.probe.shape, bool))
        assert rel_o < 1e-4 and rel_p < 1e-4
        assert rel_o < 1e-6 and rel_p < 1e-6
        np.testing.assert_allclose(o.errors, serial.errors, rtol=1e-5)
    np.testing.assert_array_equal(out[0].object, out[-1].object)   # all ranks agree exactly


def test_partition_equals_serial_with_probe_from_data(small):
    """No probe given: the initial probe (mean diffraction pattern over all ranks) is
    summed exactly too, so 2 ranks still equal one process."""
    pytest.importorskip("mpi4py")
    serial = ptycho.reconstruct(small, iterations=20, probe_update_start=3)
    out = _run_ranks([0, 37, 96], lambda comm, sl: ptycho.reconstruct_rank(
        comm, small.intensities[sl], small.positions[sl], small.object_shape, threads=1,
        iterations=20, probe_update_start=3))
    for o in out:
        assert np.abs(o.object - serial.object).max() <= 1e-6 * np.abs(serial.object).max()
        assert np.abs(o.probe - serial.probe).max() <= 1e-6 * np.abs(serial.probe).max()


def test_threads_do_not_change_the_result(small):
    """Chunks of frames summed in 1 or 2 threads: the same numbers (quantised sums)."""
    probe = ptycho.model_probe(small)
    one = ptycho.reconstruct(small, iterations=12, probe=probe, probe_update_start=3, threads=1)
    two = ptycho.reconstruct(small, iterations=12, probe=probe, probe_update_start=3, threads=2)
    assert np.abs(one.object - two.object).max() <= 1e-6 * np.abs(one.object).max()
    assert np.abs(one.probe - two.probe).max() <= 1e-6 * np.abs(one.probe).max()


@pytest.mark.slow
@pytest.mark.parametrize("ranks,frames", [(2, [48, 48]), (3, [32, 32, 32])])
def test_mpiexec_ranks_equal_serial(tmp_path, small, ranks, frames):
    """Real MPI: ``mpiexec -n 2`` and ``-n 3`` (MPICH from the venv) match one process
    within 1e-4 relative with the probe refined (and fixed)."""
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the interpreter")
    data = small.save(tmp_path / "scan.npz")
    mask = ptycho.illuminated_mask(small)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for start in ("5", "-1"):
        out = tmp_path / f"result{start}.npz"
        cmd = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "sparkmpi.ptycho.mpi_job",
               str(data), "--out", str(out), "--iterations", "30", "--probe-update-start", start]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = np.load(out)
        assert int(got["ranks"]) == ranks and list(got["frames_per_rank"]) == frames
        serial = ptycho.reconstruct(small, iterations=30, probe=ptycho.model_probe(small),
                                    probe_update_start=None if start == "-1" else int(start))
        assert _rel_in_mask(got["object"], serial.object, mask) < 1e-4
        assert _rel_in_mask(got["probe"], serial.probe, np.ones(serial.probe.shape, bool)) < 1e-4
        np.testing.assert_allclose(got["errors"], serial.errors, rtol=1e-5)
        assert got["errors"][-1] < 0.5 * got["errors"][0]


def test_threads_per_rank_from_ranks_on_node():
    from sparkmpi.ptycho.mpi_job import ranks_on_node, threads_per_rank

    class Fake:
        rank, size = 0, 2

    cores = len(os.sched_getaffinity(0))
    assert ranks_on_node(Fake()) == 2
    assert threads_per_rank(Fake()) == max(1, cores // 2)
    Fake.size = 64
    assert threads_per_rank(Fake()) == 1


# --------------------------------------------------------------------------- kernels, sums
def _random_stack(seed=0, n=20, h=16, w=16, oshape=(40, 48)):
    rng = np.random.default_rng(seed)
    cplx = lambda *shape: (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
                           ).astype(np.complex64)
    pos = np.stack([rng.integers(0, oshape[0] - h + 1, n), rng.integers(0, oshape[1] - w + 1, n)], 1)
    return (cplx(n, h, w), cplx(h, w), cplx(*oshape), pos,
            np.abs(rng.standard_normal((n, h, w))).astype(np.float32), oshape)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_kernels_match_numpy_reference(threads):
    """Each numba kernel against its whole-stack NumPy form on random data."""
    from sparkmpi.ptycho import _fused

    if not _fused.HAVE_NUMBA:
        pytest.skip("numba not installed")
    psi, P, O, pos, a, oshape = _random_stack()
    h, w = P.shape
    fast, ref = _fused.FusedOps(pos, (h, w), oshape, threads), _fused.NumpyOps(pos, (h, w), oshape)
    g1, g2 = np.empty_like(psi), np.empty_like(psi)
    fast.gather_mul(O, P, g1)
    ref.gather_mul(O, P, g2)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-6 * np.abs(g2).max())
    # quantised sums: float64 products of the same float32 inputs, then exact adds
    acc = [np.zeros((2,) + oshape) for _ in range(2)]
    den = [np.zeros(oshape) for _ in range(2)]
    t1 = fast.scatter_object(psi, P, 2.0 ** 20, acc[0], 2.0 ** 18, den[0])
    t2 = ref.scatter_object(psi, P, 2.0 ** 20, acc[1], 2.0 ** 18, den[1])
    np.testing.assert_array_equal(acc[0], acc[1])
    np.testing.assert_array_equal(den[0], den[1])
    assert t1[0] == t2[0] and t1[1] >= t2[1] > 0
    expect = np.zeros(oshape, np.complex128)
    for j, (y, x) in enumerate(pos):
        expect[y:y + h, x:x + w] += psi[j].astype(np.complex128) * np.conj(P.astype(np.complex128))
    np.testing.assert_allclose(acc[0][0] + 1j * acc[0][1], expect * 2.0 ** 20, rtol=0,
                               atol=len(pos))
    pn = [np.zeros((2, h, w)) for _ in range(2)]
    pd = [np.zeros((h, w)) for _ in range(2)]
    fast.probe_sums(psi, O, 2.0 ** 20, 2.0 ** 18, pn[0], pd[0])
    ref.probe_sums(psi, O, 2.0 ** 20, 2.0 ** 18, pn[1], pd[1])
    np.testing.assert_array_equal(pn[0], pn[1])
    np.testing.assert_array_equal(pd[0], pd[1])
    # DM combination + modulus projection, RAAR halves (float32: a few ulps)
    s1, s2, w1, w2 = psi.copy(), psi.copy(), np.empty_like(psi), np.empty_like(psi)
    e1 = fast.dm_update(s1, g2, a, 0.8, w1)
    e2 = ref.dm_update(s2, g2, a, 0.8, w2)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6 * np.abs(s2).max())
    np.testing.assert_array_equal(s1, w1)
    assert e1 == pytest.approx(e2, rel=1e-6)
    s1, s2 = psi.copy(), psi.copy()
    fast.raar_pre(s1, a, 0.75, w1)
    ref.raar_pre(s2, a, 0.75, w2)
    np.testing.assert_allclose(w1, w2, rtol=0, atol=1e-6 * np.abs(w2).max())
    e1, e2 = fast.raar_post(s1, g2, a, 0.75), ref.raar_post(s2, g2, a, 0.75)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6 * np.abs(s2).max())
    assert e1 == pytest.approx(e2, rel=1e-6)
    # with a pending per-frame gauge phase
    phase = np.exp(1j * np.linspace(0, 3, len(pos))).astype(np.complex64)
    s1, s2 = psi.copy(), psi.copy()
    fast.dm_update(s1, g2, a, 1.0, w1, phase)
    ref.dm_update(s2, g2, a, 1.0, w2, phase)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=2e-6 * np.abs(s2).max())
    s1, s2 = psi.copy(), psi.copy()
    fast.raar_post(s1, g2, a, 0.75, phase)
    ref.raar_post(s2, g2, a, 0.75, phase)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=2e-6 * np.abs(s2).max())
    np.testing.assert_allclose(s2, psi * phase[:, None, None] + np.float32(0.75) * g2,
                               rtol=0, atol=2e-6 * np.abs(s2).max())
    fast.close()


def test_regularised_update_numba_and_numpy_give_the_same_bits():
    """The object's finishing pass (num / scale + d O) / (den + d): one numba pass and
    the NumPy form agree bit for bit, and with the plain complex formula to rounding."""
    from sparkmpi.ptycho import _fused

    if not _fused.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(3)
    shape = (37, 53)
    num = np.rint(rng.standard_normal((2,) + shape) * 2.0 ** 40)
    den = np.abs(rng.standard_normal(shape)) * 1e3
    den[0, :5] = num[:, 0, :5] = 0.0   # unlit pixels: only the regularisation holds them
    obj = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    inv, d = 2.0 ** -30, 1e-4 * float(den.max())
    fast = _fused.finish_update(num[0], num[1], inv, den, d, obj, use_numba=True)
    slow = _fused.finish_update(num[0], num[1], inv, den, d, obj, use_numba=False)
    assert fast.dtype == slow.dtype == np.complex64
    np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))
    plain = ((num[0] + 1j * num[1]) * inv + d * obj.astype(np.complex128)) / (den + d)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6 * np.abs(plain).max())
    np.testing.assert_allclose(fast[0, :5], obj[0, :5], rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["dm", "raar"])
def test_numba_engine_matches_numpy_engine(small, algorithm):
    """Whole reconstructions, fused kernels vs NumPy reference: float32 rounding only
    (fixed probe 1e-4; refined probe, where differences grow, 5e-3)."""
    from sparkmpi.ptycho import _fused

    if not _fused.HAVE_NUMBA:
        pytest.skip("numba not installed")
    probe = ptycho.model_probe(small)
    mask = ptycho.illuminated_mask(small)
    for start, tol in ((None, 1e-4), (5, 5e-3)):
        fast = ptycho.reconstruct(small, algorithm=algorithm, iterations=30, probe=probe,
                                  probe_update_start=start, kernels="numba")
        ref = ptycho.reconstruct(small, algorithm=algorithm, iterations=30, probe=probe,
                                 probe_update_start=start, kernels="numpy")
        assert _rel_in_mask(fast.object, ref.object, mask) < tol
        np.testing.assert_allclose(fast.errors, ref.errors, rtol=10 * tol)
    with pytest.raises(ValueError, match="kernels must be one of"):
        ptycho.reconstruct(small, iterations=1, kernels="fortran")


def test_works_without_numba_and_pyspark():
    """Where numba and pyspark are missing (GPU machines), the package imports and the
    CPU engine falls back to the NumPy kernels; kernels='numba' is a clear error."""
    code = (
        "import sys; sys.modules['numba'] = None; sys.modules['pyspark'] = None\n"
        "import numpy as np\n"
        "from sparkmpi import ptycho\n"
        "from sparkmpi.ptycho import _fused\n"
        "assert not _fused.HAVE_NUMBA\n"
        "d = ptycho.simulate(frames=16, frame_size=32, seed=2)\n"
        "a = ptycho.reconstruct(d, iterations=4)\n"
        "b = ptycho.reconstruct(d, iterations=4, kernels='numpy')\n"
        "assert np.array_equal(a.object, b.object)\n"
        "try:\n"
        "    ptycho.reconstruct(d, iterations=1, kernels='numba')\n"
        "except ptycho.PtychoInputError as exc:\n"
        "    print('refused:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: kernels='numba' needs the numba package" in proc.stdout


def test_exact_sums_any_split_and_overflow_redo():
    """Quantised sums: any split over 'ranks' gives identical bits; a first scale that is
    far too large is detected by the global flag and the sum redone."""
    from sparkmpi.ptycho._kernels import ExactSums

    rng = np.random.default_rng(5)
    values = rng.standard_normal((60, 8)) * np.exp(rng.uniform(-8, 8, (60, 1)))

    def fill_from(rows, sums):
        def fill(scales):
            q = np.rint(values[rows] * scales[0])
            sums.views[0] += q.sum(axis=0)
            return [float(np.abs(q).max()) if len(q) else 0.0]
        return fill

    results = []
    for edges in ([0, 60], [0, 13, 60], [0, 7, 31, 60]):
        sums_per_rank = {}

        def rank(comm, sl):
            # estimate 1e-12: the first scale overflows, the flag forces a redo
            sums = ExactSums(comm if comm.size > 1 else None, [((8,), False)], [60], [1e-12])
            sums_per_rank[comm.rank] = sums
            return sums.reduce(fill_from(np.arange(sl.start, sl.stop), sums))[0]

        out = _run_ranks(edges, rank) if len(edges) > 2 else \
            [rank(type("One", (), {"size": 1, "rank": 0})(), slice(0, 60))]
        results.append(out[0])
        for other in out[1:]:
            np.testing.assert_array_equal(other, out[0])
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    np.testing.assert_allclose(results[0], values.sum(axis=0), rtol=0,
                               atol=1e-9 * np.abs(values).max())


@pytest.mark.parametrize("object_shape", [(61, 53), (466, 466)])
def test_geometry_coverage_and_probe_power_against_direct_sums(object_shape):
    """The comb's coverage (summed-area table) and the object denominator
    sum_j shift(|P|^2) (FFT convolution over a padded 2-3-5 plane) against sums taken
    pixel by pixel, with frames at every edge; 466 = 2 x 233 is the bench scan's size."""
    from sparkmpi.backend import get_backend
    from sparkmpi.ptycho._kernels import Geometry

    rng = np.random.default_rng(11)
    h, w = 24, 20
    oh, ow = object_shape
    pos = np.stack([rng.integers(0, oh - h + 1, 40), rng.integers(0, ow - w + 1, 40)], axis=1)
    pos[:4] = [[0, 0], [oh - h, ow - w], [0, ow - w], [oh - h, 0]]
    pos[4:8] = pos[0]   # several frames on one offset
    probe = (rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))).astype(np.complex64)
    count = np.zeros(object_shape)
    power = np.zeros(object_shape)
    for y, x in pos:
        count[y:y + h, x:x + w] += 1
        power[y:y + h, x:x + w] += np.abs(probe.astype(np.complex128)) ** 2
    geom = Geometry(get_backend("numpy"), pos, (h, w), object_shape)
    assert geom.coverage() == count.max() >= 5
    got = geom.scatter_probe_power(probe)
    assert got.shape == object_shape and got.dtype == np.float32
    np.testing.assert_allclose(got, power, rtol=1e-6, atol=1e-6 * power.max())


def test_split_frames():
    from sparkmpi.ptycho.mpi_job import split_frames

    parts = [split_frames(10, 3, r) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError, match="cannot be split"):
        split_frames(2, 3, 0)


# --------------------------------------------------------------------------- streaming
def test_streaming_improves_with_frames(small):
    mask = ptycho.illuminated_mask(small)
    stream = ptycho.StreamingReconstruction(small.object_shape, small.frame_shape,
                                            probe=ptycho.model_probe(small), probe_update_start=20)
    quality = []
    stream.consume(ptycho.micro_batches(small, 24), iterations_per_batch=15,
                   on_batch=lambda s, r: quality.append(
                       (s.n_frames, ptycho.nrmse(r.object, small.object_true, mask))))
    frames = [f for f, _ in quality]
    errs = [e for _, e in quality]
    assert frames == [24, 48, 72, 96]
    assert errs[-1] < 0.5 * errs[0]
    assert errs[-1] < 0.016                # measured 0.008 (after 0.67, 0.87, 0.63 on fewer frames)
    assert ptycho.nrmse(np.ones_like(small.object_true), small.object_true, mask) > 0.016
    assert [h["frames"] for h in stream.history] == frames
    assert stream.history[-1]["iteration"] == 60
    with pytest.raises(perr.FrameMismatchError, match="frame_shape"):
        stream.add_frames(np.ones((2, 32, 32), np.float32), np.zeros((2, 2), int))


# --------------------------------------------------------------------------- metrics, output
def test_nrmse_removes_global_complex_scale(small):
    t = small.object_true
    mask = ptycho.illuminated_mask(small)
    assert ptycho.nrmse(t * (0.3 - 2.0j), t, mask) == pytest.approx(0.0, abs=1e-6)
    noisy = t + 0.05 * np.exp(1j * np.arange(t.size).reshape(t.shape))
    assert 0.02 < ptycho.nrmse(noisy, t, mask) < 0.1
    with pytest.raises(perr.FrameMismatchError, match="shape"):
        ptycho.nrmse(t[:10], t)


def test_write_outputs(tmp_path, small):
    res = ptycho.reconstruct(small, iterations=5)
    files = ptycho.write_outputs(tmp_path / "out", res.object, res.probe, res.errors,
                                 mask=ptycho.illuminated_mask(small), summary={"a": 1})
    from PIL import Image

    for role in ("object_phase", "object_amplitude", "probe_amplitude", "errors"):
        img = Image.open(files[role])
        assert img.format == "PNG" and min(img.size) > 10
    phase = np.asarray(Image.open(files["object_phase"]))
    assert phase.shape == small.object_shape and phase.std() > 5
    arrays = np.load(files["arrays"])
    np.testing.assert_array_equal(arrays["object"], res.object)
    assert json.loads(str(arrays["summary"])) == {"a": 1}
    curve = np.asarray(Image.open(files["errors"]).convert("RGB"))
    assert ((curve[..., 0] > 150) & (curve[..., 1] < 80)).sum() > 50   # the red line


# --------------------------------------------------------------------------- bad input
def _good(n=4, s=16, obj=40):
    rng = np.random.default_rng(0)
    return (rng.random((n, s, s)).astype(np.float32), np.array([[0, 0], [5, 5], [10, 3], [24, 24]]),
            (obj, obj))


@pytest.mark.parametrize("mutate,exc,message", [
    (lambda i, p, o: (i[:3], p, o), perr.FrameMismatchError, "positions has 4 rows but intensities has 3 frames"),
    (lambda i, p, o: (i[0], p, o), perr.FrameMismatchError, "must be a 3-D array"),
    (lambda i, p, o: (i.astype(np.complex64), p, o), perr.FrameMismatchError, "real numeric dtype"),
    (lambda i, p, o: (np.where(np.arange(16) == 3, np.nan, i).astype(np.float32), p, o),
     perr.NonFiniteError, "NaN or infinite"),
    (lambda i, p, o: (i - 0.5, p, o), perr.NegativeIntensityError, "negative values"),
    (lambda i, p, o: (i, p + np.array([[0, 0], [0, 0], [0, 0], [1, 0]]), o),
     perr.PositionOutOfBoundsError, "frame 3 at \\(row, col\\)=\\(25, 24\\)"),
    (lambda i, p, o: (i, p - 1, o), perr.PositionOutOfBoundsError, "outside the object"),
    (lambda i, p, o: (i, p[:, :1], o), perr.FrameMismatchError, "shape \\(N, 2\\)"),
    (lambda i, p, o: (i, p + 0.5, o), perr.FrameMismatchError, "whole pixel offsets"),
    (lambda i, p, o: (i, p, (10, 10)), perr.FrameMismatchError, "do not fit"),
])
def test_bad_input_raises_before_iterating(mutate, exc, message):
    i, p, o = mutate(*_good())
    calls = []
    with pytest.raises(exc, match=message):
        ptycho.reconstruct({"intensities": i, "positions": p, "object_shape": o}, iterations=2,
                           callback=lambda *a: calls.append(a))
    assert calls == []
    assert issubclass(exc, ValueError)


def test_bad_probe_and_state():
    i, p, o = _good()
    data = {"intensities": i, "positions": p, "object_shape": o}
    with pytest.raises(perr.ProbeShapeError, match="probe must have shape \\(16, 16\\), got shape \\(8, 8\\)"):
        ptycho.reconstruct(data, probe=np.ones((8, 8), np.complex64))
    with pytest.raises(perr.NonFiniteError, match="probe contains NaN"):
        ptycho.reconstruct(data, probe=np.full((16, 16), np.nan, np.complex64))
    first = ptycho.reconstruct(data, iterations=1)
    with pytest.raises(perr.FrameMismatchError, match="resume with the same frames"):
        ptycho.reconstruct({"intensities": i[:3], "positions": p[:3], "object_shape": o},
                           iterations=1, state=first.state)
    with pytest.raises(perr.PtychoInputError, match="cannot continue it with 'raar'"):
        ptycho.reconstruct(data, algorithm="raar", iterations=1, state=first.state)


def test_reconstruct_rank_checks_comm():
    i, p, o = _good()
    with pytest.raises(perr.PtychoInputError, match="comm must be an MPI communicator"):
        ptycho.reconstruct_rank(None, i, p, o)
    with pytest.raises(perr.PtychoInputError, match="has no 'Allreduce'"):
        ptycho.reconstruct_rank(object(), i, p, o)


# --------------------------------------------------------------------------- bench
def test_bench_report_keys_one_process():
    """``sparkmpi bench ptycho`` at a small size, one process only (the Spark and mpiexec
    runs are covered by their own tests)."""
    import argparse

    from sparkmpi.bench import ptycho as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--frames", "48", "--frame-size", "32", "--iterations", "20",
                              "--ranks", "2", "--no-spark", "--no-mpiexec"])
    report = bench.run(args)
    assert report["backend"] == "numpy" and report["frames"] == 48
    assert report["seconds_per_iteration_1rank"] > 0
    assert 0 < report["nrmse"] < 0.035 and 0 < report["fourier_error"] < 0.045   # measured 0.017, 0.021
    assert "seconds_per_iteration" not in report   # no Spark run asked for
    assert report["fft_backend"] in ("fftw", "scipy")   # 32^2: fftw when pyFFTW is installed
    assert report["fft_ms_per_rank_stack"] > 0 and report["fft_vs_scipy_ratio"] > 0
    with pytest.raises(UsageError, match="--frames must be a positive integer"):
        bench.run(parser.parse_args(["--frames", "0"]))
    with pytest.raises(UsageError, match="--repeats must be a positive integer"):
        bench.run(parser.parse_args(["--repeats", "0"]))


@pytest.mark.parametrize("algorithm", ["dm", "raar"])
def test_generic_array_path_the_gpu_runs_matches_the_exact_cpu_path(small, algorithm):
    """kernels='generic' runs, on NumPy, the backend-generic code the CuPy backend runs
    (complex128 scatter sums, no fused kernels): it converges like the exact CPU engine.
    Split over thread 'ranks', with the probe fixed and with it refined, it matches one
    process within the issue's 1e-4.  (With float32 scatter sums, DM with probe refinement
    missed it: 1.1e-3 after 30 iterations.  Sums of a few float32 products in float64 are
    exact in any order, so 1e-6 is asserted too.)"""
    pytest.importorskip("mpi4py")
    probe = ptycho.model_probe(small)
    mask = ptycho.illuminated_mask(small)
    opts = dict(algorithm=algorithm, iterations=30, probe=probe, probe_update_start=5)
    generic = ptycho.reconstruct(small, kernels="generic", **opts)
    exact = ptycho.reconstruct(small, kernels="numpy", **opts)
    assert _rel_in_mask(generic.object, exact.object, mask) < 5e-3
    np.testing.assert_allclose(generic.errors, exact.errors, rtol=5e-2)
    assert ptycho.nrmse(generic.object, small.object_true, mask) == pytest.approx(
        ptycho.nrmse(exact.object, small.object_true, mask), abs=2e-3)
    for start in (None, 5):
        run = dict(opts, probe_update_start=start, kernels="generic")
        serial = generic if start == 5 else ptycho.reconstruct(small, **run)
        out = _run_ranks([0, 40, 96], lambda comm, sl: ptycho.reconstruct_rank(
            comm, small.intensities[sl], small.positions[sl], small.object_shape, threads=1, **run))
        for o in out:
            assert _rel_in_mask(o.object, serial.object, mask) < 1e-6
            assert _rel_in_mask(o.probe, serial.probe, np.ones(o.probe.shape, bool)) < 1e-6
