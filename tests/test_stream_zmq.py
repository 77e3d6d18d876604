"""ZeroMQ PUSH publisher / PULL receiver over a real TCP socket on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zmq

from sparkmpi.stream.detector import (
    NpzScan, SyntheticScan, ZmqDeadLetter, ZmqPublisher, ZmqReceiver, publish_zmq,
)
from sparkmpi.stream.frames import FrameError
from sparkmpi.stream._errors import StreamTimeout


def _run_publisher(target, *args, **kwargs):
    errors = []

    def body():
        try:
            target(*args, **kwargs)
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


def test_round_trip_over_tcp():
    scan = SyntheticScan(200, (32, 48), "uint16", seed=3, scan_id="zscan")
    with ZmqPublisher("tcp://127.0.0.1:0") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        with ZmqReceiver(pub.endpoint, timeout=10) as rx:
            thread, errors = _run_publisher(publish_zmq, scan, pub, rate=2000)
            got = list(rx)
            thread.join(10)
    assert not thread.is_alive() and not errors
    assert rx.series == {"htype": "sparkmpi-series-1", "scan": "zscan", "frames": 200, "shape": [32, 48],
                         "dtype": "<u2"}
    assert rx.end["frames"] == 200
    assert [h.index for h, _ in got] == list(range(200))
    for header, array in got[:: 37]:
        assert header.scan_id == "zscan" and header.position == scan.position(header.index)
        np.testing.assert_array_equal(array, scan.frame(header.index))
    assert len({a.tobytes() for _, a in got[:16]}) == 16  # frames differ


def test_malformed_messages_become_dead_letters_or_raise():
    with ZmqPublisher("tcp://127.0.0.1:0") as pub:
        with ZmqReceiver(pub.endpoint, timeout=5, on_error="yield") as rx:
            good = {"htype": "sparkmpi-frame-1", "scan": "s", "index": 0, "shape": [2, 2], "dtype": "<u2",
                    "pos": [0, 0], "ts": 0}
            pub.socket.send_multipart([json.dumps(good).encode(), np.zeros((2, 2), "<u2").tobytes()])
            pub.socket.send_multipart([json.dumps({**good, "index": 1}).encode(), b"\0" * 5])
            pub.socket.send_multipart([b"not json", b""])
            pub.socket.send_multipart([json.dumps({**good, "htype": "other"}).encode()])
            pub.socket.send_multipart([json.dumps({**good, "dtype": "<c8"}).encode(), b"\0" * 32])
            pub.send_end("s", 1)
            items = list(rx)
    assert isinstance(items[0], tuple) and items[0][0].index == 0
    letters = items[1:]
    assert all(isinstance(i, ZmqDeadLetter) for i in letters)
    assert [d.code for d in letters] == ["truncated_payload", "bad_header", "bad_kind", "bad_dtype"]
    assert "needs 8 bytes, got 5" in letters[0].reason
    assert letters[0].parts[1] == b"\0" * 5

    with ZmqPublisher("tcp://127.0.0.1:0") as pub, ZmqReceiver(pub.endpoint, timeout=5) as rx:
        pub.socket.send_multipart([b"[1, 2]"])
        with pytest.raises(FrameError, match="unknown htype None"):
            list(rx)


def test_receiver_times_out_naming_the_endpoint():
    ctx = zmq.Context()
    try:
        with ZmqReceiver("tcp://127.0.0.1:9", timeout=0.3, context=ctx) as rx:
            with pytest.raises(StreamTimeout, match=r"no ZeroMQ message from tcp://127.0.0.1:9 within 0.3 s"):
                list(rx)
    finally:
        ctx.term()


def test_publisher_without_receiver_times_out():
    with ZmqPublisher("tcp://127.0.0.1:0", send_timeout=0.2, hwm=1) as pub:
        pub.socket.setsockopt(zmq.LINGER, 0)
        with pytest.raises(StreamTimeout, match=r"no ZeroMQ receiver took the series header at tcp://127.0.0.1:\d+"):
            publish_zmq(SyntheticScan(3, (8, 8)), pub)


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scan.npz"
    np.savez(path, intensities=rng.random((5, 6, 7)) * 1000, positions=rng.random((5, 2)))
    scan = NpzScan(path, dtype="uint16")
    assert (scan.count, scan.shape, scan.dtype, scan.scan_id) == (5, (6, 7), np.dtype("uint16"), "scan")
    items = list(scan)
    assert items[2][0] == 2 and items[2][2].dtype == np.uint16
    np.save(tmp_path / "bad.npy", np.zeros(3))
    np.savez(tmp_path / "bad.npz", intensities=np.zeros((5, 6, 7)))
    with pytest.raises(ValueError, match=r"missing array\(s\) \['positions'\]"):
        NpzScan(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", intensities=np.zeros((5, 6, 7)), positions=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"'positions' must be \(5, 2\), got \(4, 2\)"):
        NpzScan(tmp_path / "bad2.npz")


def test_synthetic_scan_is_seeded_and_validates():
    a, b = SyntheticScan(10, (16, 16), seed=1), SyntheticScan(10, (16, 16), seed=1)
    np.testing.assert_array_equal(a.frame(7), b.frame(7))
    assert not np.array_equal(a.frame(7), SyntheticScan(10, (16, 16), seed=2).frame(7))
    # the spot moves: the brightest pixel is in a different place at the start and the end
    assert np.unravel_index(a.frame(0).argmax(), (16, 16)) != np.unravel_index(a.frame(9).argmax(), (16, 16))
    with pytest.raises(ValueError, match="frames: expected an integer >= 1, got 0"):
        SyntheticScan(0)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        SyntheticScan(3, dtype="complex64")
