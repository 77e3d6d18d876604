"""The feedback rule and the quality figures (pure), and the simulated ophyd devices with a real RunEngine."""

from __future__ import annotations

import numpy as np
import pytest

from sparkmpi.bluesky.feedback import ConvergenceRule, FeedbackState
from sparkmpi.bluesky.quality import coverage, error_trend, footprint_mask, missing_points, quality_document
from sparkmpi.errors import InvalidArgument


def q(batch, *, frames=100, coverage_value=0.8, errors=(1, 1), nrmse=None, missing=(), final=False):
    return quality_document(scan="s1", batch=batch, frames_used=frames, points_planned=200,
                            coverage_value=coverage_value, errors=list(errors), nrmse=nrmse,
                            last_event_time=100.0 + batch, now=200.0 + batch, missing_positions=missing,
                            checkpoint=None if final else batch, checkpoint_frames=10)


def test_stop_after_patience_documents_that_pass_every_threshold():
    state = FeedbackState(ConvergenceRule(min_coverage=0.7, error_tolerance=0.05, patience=2, min_frames=50))
    assert state.observe(q(1, coverage_value=0.5), 1.0) == []          # coverage too low
    assert state.observe(q(2, frames=10), 2.0) == []                    # too few frames
    assert state.observe(q(3, errors=[1, 2]), 3.0) == []                 # error still moving (+100 %)
    assert state.observe(q(4), 4.0) == []                                # 1 in a row
    (decision,) = state.observe(q(5), 5.0)                               # 2 in a row: stop
    assert decision.action == "stop" and decision.scan == "s1" and decision.batch == decision.checkpoint == 5
    assert decision.trigger_event_time == 105.0 and "coverage 0.80 >= 0.70" in decision.reason
    assert state.stopped("s1") and state.observe(q(6), 6.0) == []        # decided once


def test_the_final_reconstruction_document_is_not_read_by_the_stop_rule():
    state = FeedbackState(ConvergenceRule(min_coverage=0.5, patience=1, min_frames=1))
    assert state.observe(q(1, errors=[1]), 1) == []                     # no trend yet at the first checkpoint
    assert state.observe(q(2, final=True), 2) == []                     # the final one: passes, not read
    assert not state.stopped("s1")
    assert [d.action for d in state.observe(q(3), 3)] == ["stop"]


def test_a_failing_document_resets_the_streak():
    state = FeedbackState(ConvergenceRule(min_coverage=0.5, patience=2, min_frames=1))
    state.observe(q(1), 1)
    state.observe(q(2, coverage_value=0.1), 2)
    assert state.observe(q(3), 3) == []
    assert [d.action for d in state.observe(q(4), 4)] == ["stop"]


def test_nrmse_threshold_when_ground_truth_is_known():
    state = FeedbackState(ConvergenceRule(min_coverage=0.5, patience=1, min_frames=1, max_nrmse=0.05))
    assert state.observe(q(1, nrmse=0.2), 1) == []
    assert [d.action for d in state.observe(q(2, nrmse=0.01), 2)] == ["stop"]


def test_extra_points_once_each_and_capped():
    state = FeedbackState(ConvergenceRule(min_coverage=0.99, max_extra_points=2))
    (d,) = state.observe(q(1, missing=[(1.0, 2.0)]), 1)
    assert d.action == "extra_points" and d.positions == ((1.0, 2.0),)
    (d,) = state.observe(q(2, missing=[(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)]), 2)
    assert d.positions == ((3.0, 4.0),)                                # (1, 2) asked already; cap of 2
    assert state.observe(q(3, missing=[(5.0, 6.0)]), 3) == []


@pytest.mark.parametrize("kwargs", [{"min_coverage": 1.5}, {"patience": 0}, {"min_frames": -1},
                                    {"max_nrmse": 0}, {"error_tolerance": -1}])
def test_rule_rejects_bad_thresholds(kwargs):
    with pytest.raises(InvalidArgument):
        ConvergenceRule(**kwargs)


def test_quality_figures():
    assert error_trend([1.0]) is None
    assert error_trend([2, 1]) == pytest.approx(-0.5)                   # one checkpoint against the one before
    assert error_trend([2, 2, 1, 1], window=2) == pytest.approx(-0.5)
    mask = footprint_mask([[0, 0]], (20, 20), (8, 8), 4.0)
    assert mask.sum() == np.count_nonzero(mask[:8, :8]) and 8 <= mask.sum() <= 16
    planned = np.array([[0, 0], [0, 6], [6, 0], [6, 6]], float)
    assert coverage(planned, planned, (20, 20), (8, 8), 6.0) == 1.0
    half = coverage(planned[:2], planned, (20, 20), (8, 8), 6.0)
    assert 0.4 < half < 0.6
    holes = missing_points(planned[[0, 2]], planned, passed=3)
    np.testing.assert_array_equal(holes, [[0, 6]])
    doc = q(1)
    assert doc["fourier_error_trend"] == 0.0 and doc["coverage"] == 0.8
    assert doc["checkpoint"] == 1 and doc["checkpoint_frames"] == 10 and doc["final"] is False


def test_detector_frames_come_from_the_simulator_at_the_motor_positions(tmp_path):
    from sparkmpi.bluesky.scan import ScanSetup, close_run_engine, make_run_engine

    for write_hdf5 in (False, True):
        setup = ScanSetup.fermat(12, frame_size=16, write_hdf5=write_hdf5, directory=tmp_path)
        RE = make_run_engine()
        docs = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        try:
            RE(setup.plan())
        finally:
            close_run_engine(RE)
        names = [n for n, _ in docs]
        events = [d for n, d in docs if n == "event"]
        assert names[0] == "start" and names[-1] == "stop" and len(events) == len(setup.planned) >= 10
        assert ("resource" in names) == write_hdf5 and names.count("datum") == (len(events) if write_hdf5 else 0)
        md = docs[0][1]["ptycho"]
        assert md["image_key"] == "ptycho_det_image" and len(md["planned_positions"]) == len(events)
        ev = events[5]
        x, y = ev["data"]["x"], ev["data"]["y"]
        expected = setup.scene.frame_at(x, y)
        if write_hdf5:
            from sparkmpi.stream.bluesky_bridge import read_datum

            resource = next(d for n, d in docs if n == "resource")
            datum = next(d for n, d in docs if n == "datum" and d["datum_id"] == ev["data"]["ptycho_det_image"])
            image = read_datum(resource, datum)
        else:
            image = ev["data"]["ptycho_det_image"]
        np.testing.assert_allclose(image, expected, rtol=1e-6)
        assert not np.allclose(image, setup.scene.frame_at(x + 1.0, y))   # the position matters


def _checkpoint_series(cuts, reader):
    """Refine a 24-frame scan as LiveScans does, with the frames cut into batches of ``cuts`` sizes and
    frame i read by rank ``reader(i)``; returns each checkpoint's (frames, errors, object) on rank 0."""
    import threading
    from types import SimpleNamespace

    from ptycho_fixtures import ThreadComm
    from sparkmpi.bluesky.live import bluesky_frames, refine_scans
    from sparkmpi.bluesky.scan import ScanSetup
    from sparkmpi.ptycho.simulate import make_probe
    from sparkmpi.stream.frames import FrameHeader

    class Comm(ThreadComm):
        def _exchange(self, value):
            s = self._s
            s["objs"][self.rank] = value
            s["barrier"].wait()
            got = list(s["objs"])
            s["barrier"].wait()
            return got

        def allgather(self, value):
            return self._exchange(value)

        def alltoall(self, values):
            return [sent[self.rank] for sent in self._exchange(values)]

    setup = ScanSetup.fermat(24, frame_size=16)
    scene = setup.scene
    planned = setup.planned[:24]
    frames = [SimpleNamespace(header=FrameHeader("s1", i, scene.pixel_of(x, y), float(i)),
                              array=scene.frame_at(x, y)) for i, (y, x) in enumerate(planned)]
    job = {"object_shape": scene.object_shape, "frame_shape": scene.frame_shape, "iterations": 3,
           "probe": make_probe(scene.frame_shape, kind="aperture", diameter=scene.probe_diameter),
           "final": False, "final_iterations": 5}
    shared = {"parts": [None] * 2, "objs": [None] * 2, "barrier": threading.Barrier(2)}
    series, failures = [], []

    def rank(r):
        try:
            comm, state, done, seen = Comm(r, 2, shared), {}, 0, 0
            for size in cuts:
                batch = range(seen, seen + size)
                bluesky_frames(comm, [frames[i] for i in batch if reader(i) == r], state)
                seen += size
                checkpoints = list(range(done + 8, seen + 1, 8))   # frames 0..23 arrive in index order
                done = checkpoints[-1] if checkpoints else done
                out = refine_scans(comm, state, {"s1": dict(job, checkpoints=[c - 1 for c in checkpoints])})
                if r == 0:   # (checkpoint index, object, probe, errors) per checkpoint
                    series.extend((g[0] + 1, g[3], g[1]) for g in out["s1"] if g is not None)
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            failures.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    return series


def test_checkpoints_do_not_depend_on_how_the_batches_were_cut_or_which_rank_read_a_frame():
    many = _checkpoint_series([5, 3, 9, 7], reader=lambda i: i % 3 == 0)
    one = _checkpoint_series([24], reader=lambda i: int(i == 0))
    assert [frames for frames, _, _ in many] == [frames for frames, _, _ in one] == [8, 16, 24]
    for (_, errors_a, object_a), (_, errors_b, object_b) in zip(many, one):
        np.testing.assert_array_equal(errors_a, errors_b)
        np.testing.assert_array_equal(object_a, object_b)


def test_bad_checkpoint_and_fault_settings_are_refused():
    from sparkmpi.bluesky.live import LiveScans
    from sparkmpi.bluesky.scan import ScanSetup

    with pytest.raises(InvalidArgument, match="checkpoint_frames"):
        LiveScans(None, None, checkpoint_frames=0)
    with pytest.raises(InvalidArgument, match="lose_frames"):
        ScanSetup.fermat(12, frame_size=16, lose_frames=(1,))            # frames are lost on the way to a file
    with pytest.raises(InvalidArgument, match="lose_frames"):
        ScanSetup.fermat(12, frame_size=16, write_hdf5=True, directory="/tmp", lose_frames=(-1,))
