"""Frame-stack FFTs (sparkmpi.ptycho._fft): FFTW's per-frame bits do not depend on the stack."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi import ptycho
from sparkmpi.ptycho import _fft
from sparkmpi.ptycho.errors import PtychoInputError

from ptycho_fixtures import run_ranks

pytest.importorskip("pyfftw")


def _stack(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + shape)
            + 1j * rng.standard_normal((n,) + shape)).astype(np.complex64)


@pytest.mark.parametrize("shape", [(32, 32), (48, 40)])
def test_fftw_frames_same_bits_in_any_stack(shape):
    """Each frame's transform is the same bits whole stack, one frame alone, at another
    place in the stack (other chunk offsets, a short last chunk), in an unaligned array,
    with 1 or 3 threads; and it is the orthonormal DFT (numpy) to float32 rounding."""
    x = _stack(21, shape)
    ref = _fft.FFTWStack(shape, threads=1)
    whole = ref.forward(x.copy())
    np.testing.assert_allclose(whole, np.fft.fft2(x, norm="ortho"), atol=2e-6 * np.abs(whole).max())
    for start, stop in [(0, 1), (3, 21), (5, 13), (20, 21)]:
        np.testing.assert_array_equal(ref.forward(x[start:stop].copy()), whole[start:stop])
    raw = np.empty(x.nbytes + 8, dtype=np.uint8)
    unaligned = raw[8:].view(np.complex64).reshape(x.shape)
    assert unaligned.ctypes.data % ref.align != 0
    unaligned[...] = x
    np.testing.assert_array_equal(ref.forward(unaligned), whole)
    three = _fft.FFTWStack(shape, threads=3)
    try:
        np.testing.assert_array_equal(three.forward(x.copy()), whole)
        back = three.inverse(whole.copy())
    finally:
        three.close()
    np.testing.assert_array_equal(back, ref.inverse(whole.copy()))
    np.testing.assert_allclose(back, x, atol=2e-6 * np.abs(x).max())
    with pytest.raises(PtychoInputError, match="complex64"):
        ref.forward(x.astype(np.complex128))


def test_choice_of_fft(monkeypatch):
    assert _fft.choose_fft("auto", (128, 128)) == "fftw"
    assert _fft.choose_fft("auto", (48, 48)) == "scipy"      # FFTW_ESTIMATE slower there
    assert _fft.choose_fft("fftw", (48, 48)) == "fftw"
    assert _fft.choose_fft("scipy", (128, 128)) == "scipy"
    assert _fft.choose_fft("fftw", (128, 128), "cupy") == "cupy"
    with pytest.raises(PtychoInputError, match="fft must be one of"):
        ptycho.Options(fft="mkl")
    monkeypatch.setattr(_fft, "fftw_available", lambda: False)
    assert _fft.choose_fft("auto", (128, 128)) == "scipy"
    with pytest.raises(PtychoInputError, match="needs pyFFTW"):
        _fft.choose_fft("fftw", (128, 128))


@pytest.mark.parametrize("algorithm", ["dm", "raar"])
def test_fftw_split_over_ranks_equals_one_process_bit_for_bit(algorithm):
    """FFTW (forced on 48x48 frames) with 2 and 3 thread ranks, probe refined, 2 threads in
    the one process: the same object and probe bits; and close to the scipy.fft run."""
    pytest.importorskip("mpi4py")
    data = ptycho.simulate(60, 48, seed=2)
    opts = dict(algorithm=algorithm, iterations=20, probe=ptycho.model_probe(data),
                probe_update_start=4, fft="fftw")
    serial = ptycho.reconstruct(data, threads=2, **opts)
    for edges in ([0, 29, 60], [0, 7, 33, 60]):
        out = run_ranks(edges, lambda comm, sl: ptycho.reconstruct_rank(
            comm, data.intensities[sl], data.positions[sl], data.object_shape, threads=1,
            **opts))
        for o in out:
            np.testing.assert_array_equal(o.object, serial.object)
            np.testing.assert_array_equal(o.probe, serial.probe)
    scipy_run = ptycho.reconstruct(data, threads=2, **dict(opts, fft="scipy"))
    np.testing.assert_allclose(serial.errors, scipy_run.errors, rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["dm", "raar"])
@pytest.mark.parametrize("fft, threads", [("fftw", 1), ("fftw", 2), ("scipy", 2)])
def test_chunked_pipeline_gives_the_whole_stack_bits(algorithm, fft, threads):
    """The CPU engine's chunk-by-chunk steps against its whole-stack steps: the same bits
    of the iterate, object, probe, misfit and F(P O_j), with the probe fixed and refined,
    a probe move (centring) inside a step, and a frame count that leaves a short chunk."""
    from sparkmpi.backend import get_backend
    from sparkmpi.ptycho import _fused
    from sparkmpi.ptycho._engine import ExactEngine, make_engine

    if not _fused.HAVE_NUMBA:
        pytest.skip("numba not installed")
    data = ptycho.simulate(29, 32, seed=4)
    # off-centre start: the first probe updates move the probe (and ramp the iterate)
    probe = np.roll(ptycho.model_probe(data), (3, -2), axis=(0, 1))
    moves = []
    engines = []
    for pipeline in (True, False):
        eng = make_engine(get_backend("numpy"), data.intensities, data.positions,
                          data.object_shape, probe, np.ones(data.object_shape, np.complex64),
                          None, None, 1e-4, threads, probe_support=0.8, probe_center=True,
                          fft=fft)
        assert isinstance(eng, ExactEngine) and eng.fourier.fft_name == fft
        eng.pipeline = pipeline
        move = eng._move_probe
        eng._move_probe = lambda dy, dx, move=move, p=pipeline: (moves.append(p), move(dy, dx))
        engines.append(eng)
    beta = 1.0 if algorithm == "dm" else 0.75
    try:
        for it in range(8):
            errs = []
            for eng in engines:
                eng.keep_phi = it % 3 == 2
                errs.append(float(eng.step(algorithm)(beta, it >= 2)))
            fast, ref = engines
            assert errs[0] == errs[1]
            for name in ("Psi", "O", "P"):
                np.testing.assert_array_equal(getattr(fast, name), getattr(ref, name))
            assert fast.phi_after_step == fast.keep_phi and ref.phi_after_step
            if fast.keep_phi:
                np.testing.assert_array_equal(fast.tmp, ref.tmp)
        assert moves.count(True) == moves.count(False) >= 1
    finally:
        for eng in engines:
            eng.close()


@pytest.mark.parametrize("fft, threads", [("fftw", 1), ("scipy", 2)])
def test_pipelined_refinement_sums_equal_the_whole_stack_sums(fft, threads):
    """Position refinement's five sums per frame, chunk by chunk from the step's F(P O_j)
    (chi and the object's gradient made where they are summed), against the whole-stack
    array code, with the probe support on and a frame at the object's edge."""
    from sparkmpi.backend import get_backend
    from sparkmpi.ptycho import _fused
    from sparkmpi.ptycho._engine import make_engine

    if not _fused.HAVE_NUMBA:
        pytest.skip("numba not installed")
    data = ptycho.simulate(29, 32, seed=4)
    sums = []
    for pipeline in (True, False):
        eng = make_engine(get_backend("numpy"), data.intensities, data.positions, data.object_shape,
                          ptycho.model_probe(data), np.ones(data.object_shape, np.complex64), None, None,
                          1e-4, threads, probe_support=0.8, fft=fft)
        eng.pipeline = pipeline
        try:
            for it in range(5):
                eng.keep_phi = True
                eng.step("dm")(1.0, it >= 2)
            assert eng.phi_after_step
            sums.append(eng._refinement_sums(True))
        finally:
            eng.close()
    fast, ref = sums
    assert fast.shape == (29, 5) and np.abs(ref[:, 3:]).max() > 0
    np.testing.assert_allclose(fast, ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max())
