"""The Bluesky document stream as a pure state object: every document kind, every bad input (no I/O)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from bluesky_fixtures import FRAME, OBJECT, RunDocs, geometry_md
from sparkmpi.stream.bluesky_docs import (
    DocumentError, DocumentStream, FrameOut, Rejected, ScanClosed, ScanOpened, decode_document, encode_document,
)


def feed_all(stream, docs):
    out = []
    for name, doc in docs:
        out += stream.feed(name, doc)
    return out


def frames(actions):
    return [a for a in actions if isinstance(a, FrameOut)]


def rejected(actions):
    return [a.code for a in actions if isinstance(a, Rejected)]


def test_inline_run_gives_frames_with_positions_in_object_pixels():
    run = RunDocs(5)
    stream = DocumentStream()
    out = feed_all(stream, run.all())
    assert isinstance(out[0], ScanOpened) and out[0].uid == run.uid
    got = frames(out)
    assert [f.index for f in got] == [0, 1, 2, 3, 4]
    # x = 1.5 i, y = 1.0 i motor units, pixel size 0.5, origin 0: row = 2 i, col = 3 i
    assert [f.position for f in got] == [(2.0 * i, 3.0 * i) for i in range(5)]
    assert all(f.uid == run.uid for f in got)
    np.testing.assert_array_equal(got[3].array, run.frame(3))
    closed = out[-1]
    assert isinstance(closed, ScanClosed) and closed.exit_status == "success" and closed.frames == 5
    geo = stream.scans[run.uid]
    assert geo.frame_shape == FRAME and geo.object_shape == OBJECT and geo.points_planned == 5
    np.testing.assert_allclose(geo.planned_positions[1], [2.0, 3.0])   # motor units -> pixels
    assert stream.open_scans() == [] and rejected(out) == []


def test_external_run_gives_the_datum_to_read():
    run = RunDocs(3, external=True)
    got = frames(feed_all(DocumentStream(), run.all()))
    assert [f.array for f in got] == [None, None, None]
    resource, datum = got[2].datum
    assert resource["spec"] == "AD_HDF5" and datum["datum_kwargs"] == {"point_number": 2}


def test_event_page_and_datum_page_are_expanded():
    from event_model import pack_datum_page, pack_event_page

    run = RunDocs(4, external=True)
    docs = run.all()
    datums = [d for n, d in docs if n == "datum"]
    events = [d for n, d in docs if n == "event"]
    paged = [docs[0], docs[1], docs[2], ("datum_page", pack_datum_page(*datums)),
             ("event_page", pack_event_page(*events)), docs[-1]]
    got = frames(feed_all(DocumentStream(), paged))
    assert [f.index for f in got] == [0, 1, 2, 3]
    assert got[1].datum[1]["datum_id"] == datums[1]["datum_id"]


def test_two_scans_at_once_are_kept_apart():
    a, b = RunDocs(3), RunDocs(2)
    da, db = a.all(), b.all()
    interleaved = [da[0], db[0], da[1], db[1]] + [x for pair in zip(da[2:], db[2:]) for x in pair] + da[len(db):]
    stream = DocumentStream()
    out = feed_all(stream, interleaved)
    assert sorted(f.index for f in frames(out) if f.uid == a.uid) == [0, 1, 2]
    assert sorted(f.index for f in frames(out) if f.uid == b.uid) == [0, 1]
    assert set(stream.closed) == {a.uid, b.uid} and rejected(out) == []


@pytest.mark.parametrize("case, code", [
    ("descriptor_before_start", "unknown_scan"),
    ("event_before_descriptor", "unknown_descriptor"),
    ("datum_before_resource", "unknown_resource"),
    ("stop_of_unknown_scan", "unknown_scan"),
    ("event_after_stop", "after_stop"),
    ("repeated_event", "out_of_order"),
    ("duplicate_start", "duplicate_start"),
])
def test_documents_out_of_order_or_for_an_unknown_scan(case, code):
    run = RunDocs(3, external=case == "datum_before_resource")
    docs = run.all()
    stream = DocumentStream()
    if case == "descriptor_before_start":
        out = stream.feed("descriptor", run.descriptor)
    elif case == "event_before_descriptor":
        stream.feed("start", run.start)
        out = stream.feed("event", run.event(0)[0][1])
    elif case == "datum_before_resource":
        stream.feed("start", run.start)
        stream.feed("descriptor", run.descriptor)
        out = stream.feed("datum", run.event(0)[0][1])
    elif case == "stop_of_unknown_scan":
        out = stream.feed("stop", run.stop())
    elif case == "event_after_stop":
        feed_all(stream, docs)
        out = stream.feed("event", run.event(7)[0][1])
    elif case == "repeated_event":
        feed_all(stream, docs[:3])
        out = stream.feed("event", docs[2][1])
    else:
        stream.feed("start", run.start)
        out = stream.feed("start", run.start)
    assert rejected(out) == [code]
    assert out[0].reason and out[0].doc is not None   # the document is kept with the reason
    # the stream goes on: a good run after it is unaffected
    good = RunDocs(2)
    assert len(frames(feed_all(stream, good.all()))) == 2


def test_descriptor_that_changes_shape_mid_scan_refuses_its_events():
    run = RunDocs(4)
    stream = DocumentStream()
    out = feed_all(stream, run.all()[:4])   # start, descriptor, two events
    bigger = run.bundle.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "SIM", "dtype": "array", "shape": [32, 32], "dtype_numpy": "<f4"},
        "x": {"source": "SIM", "dtype": "number", "shape": []}, "y": {"source": "SIM", "dtype": "number", "shape": []}})
    out = stream.feed("descriptor", bigger.descriptor_doc)
    assert rejected(out) == ["shape_changed"] and "[32, 32]" in out[0].reason and "[16, 16]" in out[0].reason
    ev = bigger.compose_event(data={"det_image": np.zeros((32, 32), np.float32), "x": 0.0, "y": 0.0},
                              timestamps={"det_image": 0, "x": 0, "y": 0}, seq_num=1, validate=False)
    assert rejected(stream.feed("event", ev)) == ["shape_changed"]
    # the original descriptor's events still flow
    assert len(frames(stream.feed("event", run.event(2)[0][1]))) == 1


def test_missing_datum_and_aborted_scan():
    run = RunDocs(3, external=True)
    stream = DocumentStream()
    docs = run.all("abort")
    docs = [d for i, d in enumerate(docs) if not (d[0] == "datum" and d[1]["datum_kwargs"]["point_number"] == 1)]
    out = feed_all(stream, docs)
    assert [f.index for f in frames(out)] == [0, 2]
    assert rejected(out) == ["missing_datum", "scan_aborted"]
    closed = stream.closed[run.uid]
    assert closed.exit_status == "abort" and closed.frames == 2


@pytest.mark.parametrize("mutate, code", [
    (lambda md: md.pop("pixel_size"), "no_geometry"),
    (lambda md: md.update(pixel_size=-1), "no_geometry"),
    (lambda md: md.update(object_shape=[40]), "no_geometry"),
    (lambda md: md.update(origin="here"), "no_geometry"),
    (lambda md: md.update(x_motor=""), "no_geometry"),
    (lambda md: md.update(planned_positions=[[1, 2, 3]]), "no_geometry"),
])
def test_start_without_usable_geometry(mutate, code):
    md = geometry_md()
    mutate(md)
    run = RunDocs(2, md=md)
    stream = DocumentStream()
    out = feed_all(stream, run.all())
    assert rejected(out)[0] == code and out[0].uid == run.uid
    # its later documents belong to no known scan
    assert set(rejected(out)[1:]) == {"unknown_scan", "unknown_descriptor"}
    assert frames(out) == []


def test_bad_events():
    run = RunDocs(3)
    stream = DocumentStream()
    feed_all(stream, run.all()[:2])
    good = run.event(0)[0][1]
    no_motor = copy.deepcopy(good)
    del no_motor["data"]["x"]
    assert rejected(stream.feed("event", no_motor)) == ["bad_event"]
    far = copy.deepcopy(good)
    far["data"]["x"] = 1000.0
    out = stream.feed("event", far)
    assert rejected(out) == ["position_out_of_range"] and "outside the object" in out[0].reason
    wrong = copy.deepcopy(good)
    wrong["data"]["det_image"] = np.zeros((3, 3), np.float32)
    assert rejected(stream.feed("event", wrong)) == ["bad_event"]
    assert rejected(stream.feed("event", dict(good, seq_num=0))) == ["bad_event"]
    assert len(frames(stream.feed("event", good))) == 1
    assert rejected(stream.feed("bogus", {})) == ["bad_document"]
    assert rejected(stream.feed("event", [1, 2])) == ["bad_document"]


def test_descriptor_without_the_image_key_and_other_streams():
    run = RunDocs(2)
    stream = DocumentStream()
    stream.feed("start", run.start)
    baseline = run.bundle.compose_descriptor(name="baseline", data_keys={
        "x": {"source": "SIM", "dtype": "number", "shape": []}})
    assert stream.feed("descriptor", baseline.descriptor_doc) == []
    ev = baseline.compose_event(data={"x": 1.0}, timestamps={"x": 0}, seq_num=1)
    assert stream.feed("event", ev) == []      # not a frame, not an error
    other = RunDocs(2)
    stream.feed("start", other.start)
    no_image = dict(other.descriptor, data_keys={"x": {"source": "SIM", "dtype": "number", "shape": []}})
    assert rejected(stream.feed("descriptor", no_image)) == ["no_image_key"]


def test_encode_decode_round_trip_and_garbage():
    run = RunDocs(1)
    name, doc = run.event(0)[0]
    back_name, back = decode_document(encode_document(name, doc))
    assert back_name == "event"
    np.testing.assert_array_equal(back["data"]["det_image"], run.frame(0))
    for garbage, code in ((b"\xc1\xc1", "undecodable"), (encode_document("oops", {}), "bad_document"),
                          (b"\x93\x01\x02\x03", "undecodable"), (None, "undecodable")):
        with pytest.raises(DocumentError) as info:
            decode_document(garbage)
        assert info.value.code == code


def test_the_bluesky_kafka_serializer_is_the_one_decoded():
    import msgpack
    import bluesky_kafka  # noqa: F401  (patches msgpack with msgpack-numpy, as the Publisher does)

    run = RunDocs(1)
    value = msgpack.dumps(run.event(0)[0])
    name, doc = decode_document(value)
    assert name == "event" and doc["data"]["det_image"].shape == FRAME
