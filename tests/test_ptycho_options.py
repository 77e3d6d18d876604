"""Ptychography options (one frozen dataclass) and the two step implementations behind one engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sparkmpi import ptycho
from sparkmpi.backend import get_backend
from sparkmpi.ptycho import Options
from sparkmpi.ptycho._engine import ExactEngine, GenericEngine, make_engine

from ptycho_fixtures import run_ranks


@pytest.fixture(scope="module")
def tiny():
    return ptycho.simulate(frames=24, frame_size=16, seed=5)


@pytest.mark.parametrize("field, value, words", [
    ("algorithm", "hio", r"algorithm must be one of \('dm', 'raar'\), got 'hio'"),
    ("iterations", -1, "iterations must be an integer >= 0, got -1"),
    ("iterations", 2.5, "iterations must be an integer >= 0, got 2.5"),
    ("iterations", "3", "iterations must be an integer >= 0, got '3'"),
    ("probe_update_start", True, "probe_update_start must be an integer >= 0 or None, got True"),
    ("beta", 0.0, r"beta must be in \(0, 1\], got 0.0"),
    ("beta", "x", r"beta must be in \(0, 1\], got 'x'"),
    ("backend", "tpu", "backend must be one of .*got 'tpu'"),
    ("regularization", 1.0, r"regularization must be in \(0, 1\), got 1.0"),
    ("threads", 0, "threads must be an integer >= 1 or None, got 0"),
    ("kernels", "fortran", "kernels must be one of .*got 'fortran'"),
])
def test_each_bad_option_is_named(field, value, words):
    with pytest.raises(ptycho.PtychoInputError, match=words):
        Options(**{field: value})
    with pytest.raises(ptycho.PtychoInputError, match=words):   # the same check through replace
        Options.of(Options(), **{field: value})


def test_options_are_frozen_and_merge_settings():
    base = Options(algorithm="raar", iterations=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.iterations = 3
    merged = Options.of(base, beta=0.5)
    assert (merged.algorithm, merged.iterations, merged.beta) == ("raar", 7, 0.5)
    assert base.beta is None and base.relaxation == 0.75 and merged.relaxation == 0.5
    assert Options().relaxation == 1.0
    assert Options.of() == Options() and Options.of(base) is base
    with pytest.raises(ptycho.PtychoInputError, match=r"unknown option\(s\) \['iteration'\]"):
        Options.of(base, iteration=3)
    with pytest.raises(ptycho.PtychoInputError, match="options must be a sparkmpi.ptycho.Options, got dict"):
        Options.of({"iterations": 3})
    assert [Options(probe_update_start=4).updates_probe(i) for i in (3, 4)] == [False, True]
    assert not Options(probe_update_start=None).updates_probe(100)
    assert not Options(probe_update_start=0, refine_probe=False).updates_probe(5)


def test_options_object_and_keywords_give_the_same_result(tiny):
    settings = dict(algorithm="raar", iterations=6, probe_update_start=2, beta=0.8)
    by_words = ptycho.reconstruct(tiny, **settings)
    by_object = ptycho.reconstruct(tiny, options=Options(**settings))
    overridden = ptycho.reconstruct(tiny, options=Options(**settings), iterations=3)
    np.testing.assert_array_equal(by_words.object, by_object.object)
    np.testing.assert_array_equal(by_words.errors, by_object.errors)
    assert len(overridden.errors) == 3
    with pytest.raises(ptycho.PtychoInputError, match=r"unknown option\(s\) \['iteratons'\]"):
        ptycho.reconstruct(tiny, iteratons=3)
    with pytest.raises(ptycho.PtychoInputError, match="options must be a sparkmpi.ptycho.Options"):
        ptycho.reconstruct_frames(tiny.intensities, tiny.positions, tiny.object_shape,
                                  {"iterations": 1})


def test_streaming_takes_the_same_options(tiny):
    with pytest.raises(ptycho.PtychoInputError, match="iterations is given to iterate()"):
        ptycho.StreamingReconstruction(tiny.object_shape, tiny.frame_shape, iterations=5)
    with pytest.raises(ptycho.PtychoInputError, match=r"unknown option\(s\) \['bta'\]"):
        ptycho.StreamingReconstruction(tiny.object_shape, tiny.frame_shape, bta=0.5)
    probe = ptycho.model_probe(tiny)
    stream = ptycho.StreamingReconstruction(tiny.object_shape, tiny.frame_shape, probe=probe,
                                            options=Options(algorithm="raar", beta=0.9))
    stream.add_frames(tiny.intensities, tiny.positions)
    got = stream.iterate(4)
    # all frames in one batch: the same as one call of the engine from P O_j exit waves
    state = ptycho.ReconstructionState("raar", 0, np.ones(tiny.object_shape, np.complex64), probe,
                                       _waves(tiny, probe), [])
    ref = ptycho.reconstruct(tiny, algorithm="raar", beta=0.9, iterations=4, state=state)
    np.testing.assert_array_equal(got.object, ref.object)


def _waves(data, probe):
    from numpy.lib.stride_tricks import sliding_window_view

    view = sliding_window_view(np.ones(data.object_shape, np.complex64), data.frame_shape)
    return (probe[None] * view[data.positions[:, 0], data.positions[:, 1]]).astype(np.complex64)


def test_rank_reports_the_slowest_rank(tiny):
    pytest.importorskip("mpi4py")
    seen = []

    def rank(comm, sl):
        return ptycho.reconstruct_rank(comm, tiny.intensities[sl], tiny.positions[sl],
                                       tiny.object_shape, iterations=3,
                                       callback=lambda i, e: seen.append(comm.rank))

    out = run_ranks([0, 10, 24], rank)
    assert out[0].seconds == out[1].seconds > 0   # one figure for the job: the slowest rank's
    assert sorted(seen) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(out[0].object, out[1].object)


@pytest.mark.parametrize("kernels, cls", [("auto", ExactEngine), ("numpy", ExactEngine),
                                          ("generic", GenericEngine)])
def test_one_engine_two_step_implementations(tiny, kernels, cls):
    probe = ptycho.model_probe(tiny)
    eng = make_engine(get_backend("numpy"), tiny.intensities, tiny.positions, tiny.object_shape,
                      probe, np.ones(tiny.object_shape, np.complex64), None, None, 1e-4, 1,
                      kernels=kernels)
    try:
        assert type(eng) is cls
        errs = [float(eng.step("dm")(1.0, True)) for _ in range(3)]
        assert errs[-1] < errs[0]   # the steps converge, whichever implementation
    finally:
        eng.close()
