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
    assert ptycho.nrmse(refined.object, data.object_true, mask) < 0.05


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
