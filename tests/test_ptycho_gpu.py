"""Ptychography on CuPy: same results as NumPy; speed at the paper's size.

Skipped where CuPy or a CUDA GPU is missing (CI).  Run as a script on a GPU
machine for the benchmark figure::

    PYTHONPATH=. python3 tests/test_ptycho_gpu.py --frames 512 --frame-size 384
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pytest

from sparkmpi import ptycho
from sparkmpi.backend import cupy_available

from ptycho_fixtures import rel_in_mask, run_ranks

gpu = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA GPU")


@gpu
@pytest.mark.parametrize("algorithm", ["dm", "raar"])
def test_cupy_matches_numpy(algorithm):
    data = ptycho.simulate(frames=96, frame_size=48, seed=1)
    probe = ptycho.model_probe(data)
    mask = ptycho.illuminated_mask(data)
    cpu = ptycho.reconstruct(data, algorithm=algorithm, iterations=30, probe=probe,
                             probe_update_start=None)
    gpu_res = ptycho.reconstruct(data, algorithm=algorithm, iterations=30, probe=probe,
                                 probe_update_start=None, backend="cupy")
    assert gpu_res.state.backend == "cupy"
    rel = np.linalg.norm((gpu_res.object - cpu.object)[mask]) / np.linalg.norm(cpu.object[mask])
    assert rel < 1e-3
    np.testing.assert_allclose(gpu_res.errors[:5], cpu.errors[:5], rtol=1e-3)
    refined = ptycho.reconstruct(data, algorithm=algorithm, iterations=60, probe=probe,
                                 backend="cupy")
    # NumPy gives 0.0032 (DM) and 0.0008 (RAAR) here; the generic kernels may differ by 2e-3
    # (test_ptycho.py).  Not yet run on a GPU at this bound.
    assert ptycho.nrmse(refined.object, data.object_true, mask) < 0.01
    assert ptycho.nrmse(np.ones_like(refined.object), data.object_true, mask) > 0.01


@gpu
@pytest.mark.parametrize("algorithm", ["dm", "raar"])
def test_cupy_partition_equals_serial(algorithm):
    """Frames split over 3 thread 'ranks' on one GPU (sums through the host), probe
    refined: the same object and probe as one CuPy process within the issue's 1e-4.
    The object numerator adds float32 products with float64 atomics, exact in any
    order, so the bound is tighter still."""
    pytest.importorskip("mpi4py")
    data = ptycho.simulate(frames=96, frame_size=48, seed=1)
    probe = ptycho.model_probe(data)
    mask = ptycho.illuminated_mask(data)
    run = dict(algorithm=algorithm, iterations=30, probe=probe, probe_update_start=5,
               backend="cupy")
    serial = ptycho.reconstruct(data, **run)
    out = run_ranks([0, 40, 96], lambda comm, sl: ptycho.reconstruct_rank(
        comm, data.intensities[sl], data.positions[sl], data.object_shape, **run))
    for o in out:
        assert rel_in_mask(o.object, serial.object, mask) < 1e-5
        assert rel_in_mask(o.probe, serial.probe, np.ones(o.probe.shape, bool)) < 1e-5


@gpu
def test_cupy_probe_modes_match_numpy():
    """Two incoherent probe modes on CuPy run the same generic array code as NumPy
    (``kernels="generic"``): the same object and modes to float32 round-off.
    Not yet run on a GPU (none lent when it was written)."""
    data = ptycho.simulate(frames=96, frame_size=32, seed=1, mode_powers=(0.7, 0.3))
    run = dict(iterations=30, probe=ptycho.model_probe(data), probe_modes=2)
    cpu = ptycho.reconstruct(data, **run)
    gpu_res = ptycho.reconstruct(data, backend="cupy", **run)
    mask = ptycho.illuminated_mask(data)
    assert gpu_res.state.backend == "cupy" and gpu_res.probe_modes.shape == (2, 32, 32)
    assert rel_in_mask(gpu_res.object, cpu.object, mask) < 1e-3
    np.testing.assert_allclose(gpu_res.mode_powers, cpu.mode_powers, atol=1e-3)
    np.testing.assert_allclose(gpu_res.errors[:10], cpu.errors[:10], rtol=1e-3)


def profile_steps(data, probe, reps=10):
    """Milliseconds per call of each step of an iteration (CuPy, synchronised)."""
    from sparkmpi.backend import get_backend
    from sparkmpi.ptycho._engine import make_engine

    bk = get_backend("cupy")
    eng = make_engine(bk, data.intensities, data.positions, data.object_shape, probe,
                      np.ones(data.object_shape, np.complex64), None, None, 1e-4, 1)
    steps = {
        "copy": lambda: eng.work.__setitem__(Ellipsis, eng.Psi),
        "ifft": lambda: eng.fourier.inverse(eng.work),
        "object_update": lambda: eng.object_update(eng.work, eng.tmp),
        "probe_update": lambda: eng.probe_update(eng.work, eng.tmp),
        "gather_mul": lambda: eng.geom.gather_multiply(eng.O, eng.P, out=eng.tmp),
        "fft": lambda: eng.fourier.forward(eng.tmp),
        "misfit": lambda: eng.fourier.misfit(eng.tmp),
        "project": lambda: eng.fourier.project(eng.tmp),
        "axpy": lambda: eng.Psi.__isub__(eng.tmp),
        "dm_step": lambda: eng.dm_step(1.0, False),
        "dm_step_probe": lambda: eng.dm_step(1.0, True),
    }
    out = {}
    for name, fn in steps.items():
        fn()
        bk.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        bk.synchronize()
        out[name] = 1e3 * (time.perf_counter() - t0) / reps
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--frame-size", type=int, default=384)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    data = ptycho.simulate(args.frames, args.frame_size)
    mask = ptycho.illuminated_mask(data)
    probe = ptycho.model_probe(data)
    report = {"simulate_seconds": time.perf_counter() - t0,
              "object_shape": list(data.object_shape)}
    ptycho.reconstruct(data, iterations=12, probe=probe, backend="cupy")   # warm-up
    report["steps_ms"] = profile_steps(data, probe)
    print(json.dumps(report["steps_ms"]), flush=True)
    for algorithm in ("dm", "raar"):
        t0 = time.perf_counter()
        res = ptycho.reconstruct(data, algorithm=algorithm, iterations=args.iterations,
                                 probe=probe, backend="cupy")
        report[algorithm] = {
            "iterations_seconds": res.seconds,
            "seconds_per_iteration": res.seconds_per_iteration,
            "call_seconds_incl_setup_and_transfers": time.perf_counter() - t0,
            "nrmse": ptycho.nrmse(res.object, data.object_true, mask),
            "fourier_error": res.fourier_error,
        }
        print(json.dumps({algorithm: report[algorithm]}), flush=True)
    fixed = ptycho.reconstruct(data, iterations=args.iterations, probe=probe, backend="cupy",
                               probe_update_start=None)
    report["dm_fixed_probe_seconds"] = fixed.seconds
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
