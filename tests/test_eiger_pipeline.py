"""The Eiger path end to end: the project's Stream V2 sender -> the bridge -> a REAL Kafka broker ->
the micro-batch driver -> MPI ranks that decompress; exact counts, bad input dead-lettered."""

from __future__ import annotations

import threading

import cbor2
import numpy as np
import pytest

from sparkmpi._proc import free_port
from sparkmpi.stream._output import read_outputs
from sparkmpi.stream.detector import SyntheticScan
from sparkmpi.stream.eiger import stream2 as s2
from sparkmpi.stream.eiger.bridge import run_bridge
from sparkmpi.stream.eiger.records import RecordKey, parse_key
from sparkmpi.stream.eiger.sender import SeriesPlan, Stream2Sender
from sparkmpi.stream.eiger.driver import EigerStreamDriver
from sparkmpi.stream.offsets import read_offset_range, watermarks

pytestmark = pytest.mark.slow
SHAPE = (48, 64)

@pytest.fixture(autouse=True)
def _no_pooled_readers():
    """Readers this process's range reads pooled (the bridge reads its topic back) are closed
    after each test: the pool keeps their broker connections for the next read by design."""
    yield
    from sparkmpi.stream.offsets import _ReaderPool

    _ReaderPool.close_all()



class _Bridge(threading.Thread):
    def __init__(self, endpoint, bootstrap, topic, **kw):
        super().__init__(name="test-eiger-bridge", daemon=True)
        self.args, self.kw = (endpoint, bootstrap, topic), kw
        self.report = self.error = None
        self.stop = threading.Event()

    def run(self):
        try:
            self.report = run_bridge(*self.args, progress=None, stop=self.stop, **self.kw)
        except BaseException as exc:  # noqa: BLE001  (re-raised by the test)
            self.error = exc

    def result(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive(), "the bridge did not stop"
        if self.error is not None:
            raise self.error
        return self.report


def _wait_for(bootstrap, topic, count, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        high = sum(h for _, (low, h) in watermarks(bootstrap, topic).items())
        if high >= count:
            return high
        assert time.monotonic() < deadline, f"{topic}: {high} records after {timeout} s, expected {count}"
        time.sleep(0.05)


def test_sender_bridge_driver_ranks_exactly_once(spark, broker, tmp_path):
    n, topic = 24, "eiger-pipe"
    scan = SyntheticScan(n, SHAPE, "uint16", seed=5, scan_id="eiger")
    port = free_port()
    with Stream2Sender(f"tcp://127.0.0.1:{port}", send_timeout=20) as sender:
        bridge = _Bridge(sender.endpoint, broker.bootstrap, topic, series=1, end_timeout=20)
        bridge.start()
        plan = SeriesPlan(series_id=7, compression="bslz4", channels=("threshold_1", "threshold_2"), send_end=False)
        sender.send_series(scan, plan)
        # bad input at the bridge: truncated CBOR, unknown compression, another series, a wrong shape
        good = s2.encode_image(7, 100, np.zeros(SHAPE, np.uint16))
        bad_compression = cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 7, "image_id": 101, "data": {
            "threshold_1": cbor2.CBORTag(40, [list(SHAPE), cbor2.CBORTag(69, cbor2.CBORTag(
                56500, ["zip", 2, b"\x00" * 64]))])}}))
        for raw in (good[:len(good) // 2], bad_compression, s2.encode_image(99, 0, np.zeros(SHAPE, np.uint16)),
                    s2.encode_image(7, 102, np.zeros((8, 8), np.uint16))):
            sender.send_message(raw, "a bad message")
        _wait_for(broker.bootstrap, topic, 1 + n)
        # bad records straight into the topic, for the ranks: a cut compressed frame, a key pointing nowhere
        from confluent_kafka import Producer

        from sparkmpi.stream.eiger._compression import compress

        blob = s2.encode_image(7, 200, np.ones(SHAPE, np.uint16), compression="bslz4")
        cut = cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 7, "image_id": 200, "data": {
            "threshold_1": cbor2.CBORTag(40, [list(SHAPE), cbor2.CBORTag(69, cbor2.CBORTag(
                56500, ["bslz4", 2, compress(np.ones(SHAPE, np.uint16), "bslz4")[:-9]]))])}}))
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        producer.produce(topic, cut, key=RecordKey("image", 7, image_id=200, start_offset=0).encode())
        producer.produce(topic, blob, key=RecordKey("image", 7, image_id=200, start_offset=3).encode())
        producer.produce(topic, blob, key=RecordKey("image", 7, image_id=200, start_offset=10**6).encode())
        assert producer.flush(10) == 0
        sender.send_message(s2.encode_end(7), "end")
        report = bridge.result()
    assert report.images == n and report.dead_letters == 4
    codes = sorted(e["code"] for e in report.events if e["event"] == "dead_letter")
    assert codes == ["shape_mismatch", "truncated", "unknown_compression", "unknown_series"]
    assert report.series == [{"series_id": 7, "images": n, "expected": n, "incomplete": None,
                              "per_partition": [n]}]
    assert sum(h for _, (_, h) in watermarks(broker.bootstrap, topic + ".dlq").items()) == 4

    out = tmp_path / "out"
    driver = EigerStreamDriver(spark, broker.bootstrap, topic, "g", out, ranks=2, trigger=0.2, max_frames=10,
                               progress=None, warm_up=False)
    result = driver.run(until_end_of_scan=True)
    assert (result.frames, result.dead_letters, result.end_markers) == (n, 3, 1)
    summary = read_outputs(out)
    assert summary.lost_and_duplicated(np.arange(n)) == (0, 0)
    expected_sum = sum(frame.astype(np.float64) for _, _, frame in scan)
    total = np.zeros(SHAPE)
    reasons: dict = {}
    import json
    from sparkmpi.stream._output import list_outputs

    for _, path in list_outputs(out):
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            for k, v in meta["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
            if "result.sum_image" in z.files:
                total += z["result.sum_image"]
    assert np.array_equal(total, expected_sum), "the ranks' decoded frames differ from what was sent"
    assert reasons == {"bad_compressed_data": 1, "unknown_series": 2}


def test_lost_connection_and_restarted_series_lose_and_duplicate_nothing(broker):
    topic, port = "eiger-restart", free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    bridge = _Bridge(endpoint, broker.bootstrap, topic, series=2, end_timeout=30)
    bridge.start()
    with Stream2Sender(endpoint, send_timeout=20) as first:
        first.send_series(SyntheticScan(5, (16, 16), "uint16", seed=1), SeriesPlan(series_id=1, send_end=False))
        _wait_for(broker.bootstrap, topic, 6)
    # the detector went away mid-series; it comes back on the same port with a new series
    with Stream2Sender(endpoint, send_timeout=20) as second:
        second.send_series(SyntheticScan(4, (16, 16), "uint16", seed=2), SeriesPlan(series_id=2))
        report = bridge.result()
    events = [e["event"] for e in report.events]
    assert "connection_lost" in events
    lost = next(e for e in report.events if e["event"] == "connection_lost")
    assert lost["series_id"] == 1
    (s1, s2_) = report.series
    assert s1["series_id"] == 1 and s1["images"] == 5 and "restarted as series 2" in s1["incomplete"]
    assert s2_ == {"series_id": 2, "images": 4, "expected": 4, "incomplete": None, "per_partition": [4]}
    (low, high), = watermarks(broker.bootstrap, topic).values()
    keys = [parse_key(r.key) for r in read_offset_range(broker.bootstrap, topic, 0, low, high)]
    images = [(k.series_id, k.image_id) for k in keys if k.kind == "image"]
    assert images == [(1, i) for i in range(5)] + [(2, i) for i in range(4)]
    ends = [k for k in keys if k.kind == "end"]
    assert [(k.series_id, k.images, k.incomplete) for k in ends] == [(1, 5, True), (2, 4, False)]


def test_missing_end_message_times_out_with_the_series_id(broker):
    topic = "eiger-timeout"
    with Stream2Sender("tcp://127.0.0.1:0", send_timeout=20) as sender:
        bridge = _Bridge(sender.endpoint, broker.bootstrap, topic, series=1, end_timeout=1.0)
        bridge.start()
        sender.send_series(SyntheticScan(3, (16, 16), "uint16"), SeriesPlan(series_id=12, send_end=False))
        report = bridge.result()
    (s,) = report.series
    assert s["series_id"] == 12 and s["images"] == 3 and "no end message within 1 s" in s["incomplete"]


def test_a_killed_bridge_is_resumed_without_loss_or_duplicates(broker, tmp_path):
    import signal
    import subprocess
    import sys

    from sparkmpi._proc import stop_process

    topic = "eiger-resume"
    frames = [np.full((16, 16), i, np.uint16) for i in range(10)]
    with Stream2Sender("tcp://127.0.0.1:0", send_timeout=20) as sender:
        cmd = [sys.executable, "-m", "sparkmpi.cli", "detector", "bridge", "--from", sender.endpoint,
               "--topic", topic, "--bootstrap", broker.bootstrap, "-q"]
        first = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=open(tmp_path / "bridge.log", "w"))
        try:
            sender.send_message(s2.encode_start(3, image_shape=(16, 16), number_of_images=10), "start")
            for i in range(6):
                sender.send_message(s2.encode_image(3, i, frames[i]), f"image {i}")
            _wait_for(broker.bootstrap, topic, 7)
            first.send_signal(signal.SIGKILL)   # no end record: the series stays open on the topic
            first.wait(10)
        finally:
            stop_process(first, grace=1)
        bridge = _Bridge(sender.endpoint, broker.bootstrap, topic, series=1, end_timeout=20)
        bridge.start()
        for i in range(4, 10):                  # 4 and 5 again: the detector does not know what was bridged
            sender.send_message(s2.encode_image(3, i, frames[i]), f"image {i}")
        sender.send_message(s2.encode_end(3), "end")
        report = bridge.result()
    assert report.events[0]["event"] == "series_resumed"
    assert report.images == 4 and report.dead_letters == 2
    assert report.series == [{"series_id": 3, "images": 10, "expected": 10, "incomplete": None,
                              "per_partition": [10]}]
    (low, high), = watermarks(broker.bootstrap, topic).values()
    records = read_offset_range(broker.bootstrap, topic, 0, low, high)
    keys = [parse_key(r.key) for r in records]
    assert [k.image_id for k in keys if k.kind == "image"] == list(range(10))
    assert [(k.kind, k.images) for k in keys if k.kind != "image"] == [("start", None), ("end", 10)]
    values = [s2.decode_message(r.value) for r in records if parse_key(r.key).kind == "image"]
    assert all(np.array_equal(m.decode()["threshold_1"], frames[m.image_id]) for m in values)
