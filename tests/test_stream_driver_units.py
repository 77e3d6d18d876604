"""The driver's pure pieces: range assignment, trigger, reconciliation, output files (no broker, no Spark)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparkmpi.stream._batches import (
    OutputRanges, assign_ranges, batch_file_name, parse_batch_file_name, percentiles, reconcile, trigger_due,
)
from sparkmpi.stream._errors import OffsetError
from sparkmpi.stream._output import (
    list_outputs, output_ranges, read_outputs, remove_stale_temporaries, write_atomic_npz,
)
from sparkmpi.stream.offsets import OffsetRange


def R(p, s, e, t="frames"):
    return OffsetRange(t, p, s, e)


# ---------------------------------------------------------------- assign_ranges

def _offsets(pieces):
    return sorted((r.topic, r.partition, o) for rank in pieces for r in rank for o in range(r.start, r.end))


def test_assign_splits_evenly_and_keeps_ranges_contiguous():
    ranges = [R(0, 10, 17), R(1, 0, 3)]
    got = assign_ranges(ranges, 2)
    assert got == [[R(0, 10, 15)], [R(0, 15, 17), R(1, 0, 3)]]
    assert assign_ranges(ranges, 1) == [[R(0, 10, 17), R(1, 0, 3)]]
    # more ranks than messages: some ranks get nothing
    assert assign_ranges([R(0, 5, 7)], 4) == [[R(0, 5, 6)], [R(0, 6, 7)], [], []]
    assert assign_ranges([], 3) == [[], [], []]
    # empty ranges are ignored; input order does not matter
    assert assign_ranges([R(1, 0, 2), R(2, 4, 4), R(0, 0, 2)], 2) == [[R(0, 0, 2)], [R(1, 0, 2)]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 40)), min_size=0, max_size=6),
       st.integers(1, 8))
def test_assign_covers_every_offset_once_with_balanced_ranks(spans, ranks):
    ranges = [R(p, start, start + n) for p, (start, n) in enumerate(spans)]
    pieces = assign_ranges(ranges, ranks)
    assert len(pieces) == ranks
    want = sorted(("frames", r.partition, o) for r in ranges for o in range(r.start, r.end))
    assert _offsets(pieces) == want
    sizes = [sum(r.count for r in rank) for rank in pieces]
    assert max(sizes) - min(sizes) <= 1
    assert all(r.count > 0 for rank in pieces for r in rank)


def test_assign_rejects_bad_input():
    with pytest.raises(ValueError, match=r"ranks: expected an integer >= 1, got 0"):
        assign_ranges([R(0, 0, 1)], 0)
    with pytest.raises(ValueError, match=r"ranks: expected an integer >= 1, got True"):
        assign_ranges([R(0, 0, 1)], True)
    with pytest.raises(ValueError, match=r"frames\[0\] appears more than once"):
        assign_ranges([R(0, 0, 1), R(0, 1, 2)], 2)
    with pytest.raises(TypeError, match="expected OffsetRange items, got tuple"):
        assign_ranges([("frames", 0, 0, 1)], 2)


# ---------------------------------------------------------------- trigger

def test_trigger_due():
    assert not trigger_due(0, 99.0, trigger=0.5, max_frames=10)
    assert trigger_due(3, 0.6, trigger=0.5, max_frames=10)
    assert not trigger_due(3, 0.1, trigger=0.5, max_frames=10)
    assert trigger_due(10, 0.0, trigger=0.5, max_frames=10)   # N frames ready: at once
    assert not trigger_due(10, 0.1, trigger=0.5, max_frames=None)


# ---------------------------------------------------------------- reconcile

def test_reconcile_nothing_on_disk():
    rec = reconcile({("frames", 0): 5, ("frames", 1): None}, [])
    assert rec.to_commit == () and rec.next_batch == 0
    assert rec.committed == {("frames", 0): 5, ("frames", 1): None}


def test_reconcile_commits_outputs_written_but_not_committed():
    outputs = [OutputRanges(0, (R(0, 0, 10), R(1, 0, 8))), OutputRanges(1, (R(0, 10, 20), R(1, 8, 9))),
               OutputRanges(2, (R(0, 20, 25),))]
    # batches 0 and 1 committed; batch 2 written, then the driver died before its commit
    rec = reconcile({("frames", 0): 20, ("frames", 1): 9}, outputs)
    assert rec.to_commit == (R(0, 20, 25),)
    assert rec.committed == {("frames", 0): 25, ("frames", 1): 9}
    assert rec.next_batch == 3
    # everything committed already: nothing to do
    assert reconcile({("frames", 0): 25, ("frames", 1): 9}, outputs).to_commit == ()
    # never committed at all (crash before the very first commit)
    rec = reconcile({("frames", 0): None, ("frames", 1): None}, outputs[:1])
    assert rec.to_commit == (R(0, 0, 10), R(1, 0, 8)) and rec.next_batch == 1
    # the group is further than the outputs (e.g. old outputs moved away): nothing to do
    assert reconcile({("frames", 0): 90, ("frames", 1): 90}, outputs).to_commit == ()


def test_reconcile_refuses_overlaps_and_gaps():
    with pytest.raises(OffsetError, match=r"batches 0 and 1 overlap on frames\[0\] \(\[0, 10\) and \[5, 12\)\)"):
        reconcile({}, [OutputRanges(0, (R(0, 0, 10),)), OutputRanges(1, (R(0, 5, 12),))])
    with pytest.raises(OffsetError, match=r"jump from 10 to 12 \(batch 2\); was an output file removed"):
        reconcile({("frames", 0): 10}, [OutputRanges(2, (R(0, 12, 20),))])
    with pytest.raises(OffsetError, match="overlaps the committed offset 10"):
        reconcile({("frames", 0): 10}, [OutputRanges(2, (R(0, 8, 20),))])
    with pytest.raises(OffsetError, match="batch 3 appears twice"):
        reconcile({}, [OutputRanges(3, ()), OutputRanges(3, ())])


def test_batch_file_names_and_percentiles():
    assert batch_file_name(42) == "batch-000042.npz"
    assert parse_batch_file_name("batch-000042.npz") == 42
    assert parse_batch_file_name("batch-1234567.npz") == 1234567
    assert parse_batch_file_name(".tmp-batch-000042.npz.77") is None
    with pytest.raises(ValueError, match="batch: expected an integer >= 0, got -1"):
        batch_file_name(-1)
    assert percentiles([]) == {"p50": None, "p99": None}
    got = percentiles(np.arange(101.0))
    assert got == {"p50": 50.0, "p99": 99.0}


# ---------------------------------------------------------------- output files

def _write_batch(out, batch, ranges, indices, *, topic="frames", group="g", ts=100.0, written=101.0):
    meta = {"batch": batch, "topic": topic, "group": group, "ranges": [r.to_json() for r in ranges],
            "written_at": written, "dead_letters": 1, "end_markers_count": 0}
    write_atomic_npz(out / batch_file_name(batch), {
        "meta": np.array(json.dumps(meta)), "frame_index": np.asarray(indices, np.int64),
        "frame_ts": np.full(len(indices), ts)})


def test_outputs_round_trip_and_lost_duplicated(tmp_path):
    _write_batch(tmp_path, 0, [R(0, 0, 3)], [0, 2, 4], ts=100.0, written=100.5)
    _write_batch(tmp_path, 1, [R(0, 3, 5)], [6, 6], ts=101.0, written=102.0)
    assert [b for b, _ in list_outputs(tmp_path)] == [0, 1]
    assert output_ranges(tmp_path, topic="frames", group="g") == [
        OutputRanges(0, (R(0, 0, 3),)), OutputRanges(1, (R(0, 3, 5),))]
    summary = read_outputs(tmp_path)
    assert summary.batches == 2 and summary.dead_letters == 2
    assert summary.lost_and_duplicated(range(8)) == (4, 1)   # 1, 3, 5, 7 lost; 6 twice
    np.testing.assert_allclose(summary.latencies, [0.5, 0.5, 0.5, 1.0, 1.0])
    assert (summary.first_written, summary.last_written) == (100.5, 102.0)
    with pytest.raises(ValueError, match=r"written for group 'g', not 'other'; use another output folder"):
        output_ranges(tmp_path, topic="frames", group="other")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic_npz(tmp_path / "batch-000000.npz", {"a": np.zeros(3), "b": Boom()})
    assert os.listdir(tmp_path) == []
    # a killed driver's temporary is cleaned at start
    (tmp_path / ".tmp-batch-000001.npz.123").write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == 1 and os.listdir(tmp_path) == []


# ---------------------------------------------------------------- integrate_frames

class _OneRank:
    """The two collectives integrate_frames uses, for a world of one rank."""

    rank = 0

    def allgather(self, value):
        return [value]

    def Allreduce(self, local, out, op=None):
        out[...] = local


class _F:
    def __init__(self, array):
        self.array = array


def _integrate_one_by_one(arrays):
    intensity, centre, total = [], [], None
    for a in arrays:
        rows, cols = a.sum(axis=1, dtype=np.float64), a.sum(axis=0, dtype=np.float64)
        s = float(rows.sum())
        intensity.append(s)
        centre.append((rows @ np.arange(rows.size) / s, cols @ np.arange(cols.size) / s) if s else (np.nan, np.nan))
        total = a.astype(np.float64) if total is None else total + a
    return np.array(intensity), np.array(centre).reshape(-1, 2), total


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "uint32", "int64", "float32", "float64"])
def test_integrate_frames_matches_the_frame_by_frame_sums(dtype):
    from sparkmpi.stream._rank import integrate_frames

    rng = np.random.default_rng(3)
    high = 255 if dtype == "uint8" else 60000 if dtype != "int16" else 30000
    arrays = [rng.integers(0, high, (23, 17)).astype(dtype) for _ in range(150)]   # > 2 chunks
    arrays[70][:] = 0   # an empty frame: NaN centre
    out = integrate_frames(_OneRank(), (_F(a) for a in arrays))
    intensity, centre, total = _integrate_one_by_one(arrays)
    np.testing.assert_array_equal(out["intensity"], intensity)
    np.testing.assert_allclose(out["centre_of_mass"], centre, rtol=1e-13, equal_nan=True)
    np.testing.assert_allclose(out["sum_image"], total, rtol=1e-13)
    assert np.isnan(out["centre_of_mass"][70]).all()


def test_integrate_frames_without_a_sum_image_when_shapes_differ_and_refuses_non_images():
    from sparkmpi.errors import InvalidArgument
    from sparkmpi.stream._rank import integrate_frames

    arrays = [np.ones((4, 4), np.uint16)] * 3 + [np.ones((4, 5), np.uint16)] + [np.full((4, 4), 2, np.uint16)]
    out = integrate_frames(_OneRank(), (_F(a) for a in arrays))
    assert "sum_image" not in out
    np.testing.assert_array_equal(out["intensity"], [16, 16, 16, 20, 32])
    empty = integrate_frames(_OneRank(), iter(()))
    assert empty["intensity"].shape == (0,) and empty["centre_of_mass"].shape == (0, 2)
    with pytest.raises(InvalidArgument, match=r"2-d images, got shape \(2, 2, 2\)"):
        integrate_frames(_OneRank(), iter([_F(np.ones((2, 2, 2)))]))
