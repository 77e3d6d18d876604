"""The micro-batch driver end to end: a REAL Kafka broker, real Spark (local[2]), real MPI jobs.

Every test checks exact counts by reading the outputs back: every produced frame
index appears exactly once.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sparkmpi.cli import main as cli_main
from sparkmpi.stream.kafka_client import ensure_topic
from sparkmpi.stream._errors import BrokerUnavailable
from sparkmpi.stream._output import list_outputs, read_meta, read_outputs
from sparkmpi.stream.detector import SyntheticScan, ZmqPublisher, publish_kafka, publish_zmq
from sparkmpi.stream.driver import BatchFailed, StreamDriver, ZmqStreamDriver
from sparkmpi.stream.frames import FrameHeader, encode_end_of_scan, encode_frame
from sparkmpi._proc import free_port
from sparkmpi.stream.broker import start_broker, stop_broker
from sparkmpi.stream.offsets import committed_offsets, read_offset_range, watermarks

pytestmark = pytest.mark.slow

SHAPE = (32, 32)


@pytest.fixture(params=["world", "jobs"])
def mode(request):
    """Both ways of running the batches: one long-lived world, or one Spark-MPI job each."""
    return request.param


def _driver(spark, bootstrap, topic, out, **kw):
    kw.setdefault("ranks", 2)
    kw.setdefault("trigger", 0.2)
    kw.setdefault("progress", None)
    kw.setdefault("warm_up", False)
    return StreamDriver(spark, bootstrap, topic, kw.pop("group", "g"), out, **kw)


def _assert_exactly_once(out, n):
    summary = read_outputs(out)
    assert summary.lost_and_duplicated(np.arange(n)) == (0, 0), "frames lost or duplicated"
    assert sorted(summary.frame_index.tolist()) == list(range(n))
    return summary


def test_every_frame_exactly_once_through_spark_and_mpi(spark, broker, tmp_path, mode):
    n, topic = 400, f"drv-exact-{mode}"
    scan = SyntheticScan(n, SHAPE, "uint16", seed=11, scan_id="exact")
    publish_kafka(scan, broker.bootstrap, topic, partitions=2)
    lines, progress = tmp_path / "events.jsonl", io.StringIO()
    driver = _driver(spark, broker.bootstrap, topic, tmp_path / "out", max_frames=150, json_lines=lines,
                     progress=progress, expect_shape=SHAPE, expect_dtype="uint16", mode=mode)
    report = driver.run(until_end_of_scan=True)
    assert report.stopped == "end_of_scan"
    assert (report.frames, report.end_markers, report.dead_letters) == (n, 2, 0)
    assert report.batches == -(-(n + 2) // 150)
    summary = _assert_exactly_once(tmp_path / "out", n)
    assert summary.batches == report.batches
    # committed = the end of each partition
    assert committed_offsets(broker.bootstrap, "g", topic, [0, 1]) == {(topic, 0): 201, (topic, 1): 201}
    # the MPI function's results line up with the frames and are right
    total = np.zeros(SHAPE)
    for _, path in list_outputs(tmp_path / "out"):
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            assert sum(r["end"] - r["start"] for r in meta["ranges"]) == meta["messages"]
            idx = z["frame_index"]
            frames = np.stack([scan.frame(i) for i in idx]).astype(np.float64)
            np.testing.assert_allclose(z["result.intensity"], frames.sum(axis=(1, 2)))
            rows = frames.sum(axis=2)
            np.testing.assert_allclose(z["result.centre_of_mass"][:, 0],
                                       rows @ np.arange(SHAPE[0]) / frames.sum(axis=(1, 2)))
            np.testing.assert_allclose(z["result.sum_image"], frames.sum(axis=0))   # Allreduce over the ranks
            assert set(z["frame_partition"].tolist()) <= {0, 1}
            np.testing.assert_array_equal(z["frame_partition"], idx % 2)
            total += z["result.sum_image"]
    np.testing.assert_allclose(total, sum(scan.frame(i).astype(np.float64) for i in range(n)))
    # observability: a JSON line per batch, and progress lines
    events = [json.loads(x) for x in lines.read_text().splitlines()]
    assert [e["event"] for e in events][0] == "started" and events[-1]["event"] == "end"
    batches = [e for e in events if e["event"] == "batch"]
    assert [b["batch"] for b in batches] == list(range(report.batches))
    assert sum(b["frames"] for b in batches) == n and batches[-1]["total_frames"] == n
    for b in batches:
        assert b["bytes"] == b["frames"] * 32 * 32 * 2
        assert 0 < b["latency_p50_s"] <= b["latency_p99_s"] <= b["latency_s"] < 120
        assert b["job_s"] > 0 and b["write_s"] >= 0 and b["commit_s"] > 0 and b["frames_per_s"] > 0
    assert progress.getvalue().count("batch ") >= report.batches
    # nothing new: a second run does nothing and stops at once
    again = _driver(spark, broker.bootstrap, topic, tmp_path / "out", mode=mode).run(until_end_of_scan=True)
    assert (again.batches, again.frames) == (0, 0)


def test_crash_between_write_and_commit_is_not_reprocessed(spark, broker, tmp_path, mode):
    n, topic, out = 240, f"drv-crash-{mode}", tmp_path / "out"
    publish_kafka(SyntheticScan(n, SHAPE, seed=2, scan_id="crash"), broker.bootstrap, topic, partitions=2)

    class Crash(Exception):
        pass

    def crash_after_batch_1(batch, path):
        assert path.exists()          # durable before the hook runs
        if batch == 1:
            raise Crash("driver died between the output write and the commit")

    with pytest.raises(Crash):
        _driver(spark, broker.bootstrap, topic, out, max_frames=100, after_write=crash_after_batch_1,
                mode=mode).run(
            until_end_of_scan=True)
    assert [b for b, _ in list_outputs(out)] == [0, 1]
    # batch 0 committed, batch 1 written but not committed
    committed = committed_offsets(broker.bootstrap, "g", topic, [0, 1])
    assert sum(committed.values()) == 100
    lines = tmp_path / "events.jsonl"
    report = _driver(spark, broker.bootstrap, topic, out, max_frames=100, json_lines=lines, mode=mode).run(
        until_end_of_scan=True)
    assert sum(r["end"] - r["start"] for r in report.reconciled) == 100   # batch 1 committed, not run again
    events = [json.loads(x) for x in lines.read_text().splitlines()]
    assert events[0]["event"] == "reconciled"
    assert [e["batch"] for e in events if e["event"] == "batch"][0] == 2
    _assert_exactly_once(out, n)
    assert sum(committed_offsets(broker.bootstrap, "g", topic, [0, 1]).values()) == n + 2


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _events(path):
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _session_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


#: Where each run of the driver is SIGKILLed: (phase of the driver's test hook, batch), and what is on
#: disk and committed at that moment: (outputs written, batches committed).
KILLS = [("before_write", 1, 1, 1), ("after_write", 2, 3, 2), ("after_commit", 3, 4, 4)]


def test_sigkill_at_each_phase_then_restart_loses_and_repeats_nothing(broker, tmp_path, mode):
    """The driver as a subprocess (its own Spark), SIGKILLed at each phase of a batch in turn (before
    the output is written, between write and commit, after the commit), started again each time."""
    from sparkmpi.stream.driver import TEST_PAUSE_VARIABLE

    n, per_batch, topic, out = 300, 60, f"drv-kill-{mode}", tmp_path / "out"
    lines, log_path = tmp_path / "events.jsonl", tmp_path / "driver.log"
    publish_kafka(SyntheticScan(n, SHAPE, seed=5, scan_id="kill"), broker.bootstrap, topic, partitions=2)
    cmd = [sys.executable, "-m", "sparkmpi.cli", "stream", "run", "--bootstrap", broker.bootstrap, "--topic", topic,
           "--group", "g", "--out", str(out), "--ranks", "2", "--trigger", "0.1", "--max-frames", str(per_batch),
           "--until-end-of-scan", "--json-lines", str(lines), "--quiet", "--mode", mode]
    deadline = time.monotonic() + 250   # every wait of this test together, under the 300 s test timeout
    procs = []

    def start(**env):
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYSPARK_PYTHON=sys.executable,
                                             PYSPARK_DRIVER_PYTHON=sys.executable, **env),
                                    start_new_session=True)
        procs.append(proc)
        return proc

    def wait_for(predicate, what):
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: " + log_path.read_text()[-3000:]
            time.sleep(0.05)

    def committed():
        return sum(v or 0 for v in committed_offsets(broker.bootstrap, "g", topic, [0, 1]).values())

    try:
        for phase, batch, written, done in KILLS:
            proc = start(**{TEST_PAUSE_VARIABLE: f"{phase}:{batch}"})
            marker = f"sparkmpi test hook: paused at {phase} of batch {batch}"
            wait_for(lambda: marker in log_path.read_text() or proc.poll() is not None, f"the pause at {phase}")
            assert proc.poll() is None, f"the driver exited ({proc.returncode}) before {phase} of batch {batch}"
            assert [b for b, _ in list_outputs(out)] == list(range(written)), phase
            assert committed() == done * per_batch, phase
            proc.send_signal(signal.SIGKILL)   # a real SIGKILL: no handler, no clean-up
            assert proc.wait(10) == -signal.SIGKILL
            wait_for(lambda: not _session_alive(proc.pid), "the killed driver's JVM and workers to exit")
        last = start()
        wait_for(lambda: last.poll() is not None, "the last driver to finish")
        assert last.returncode == 0, log_path.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if _session_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
    _assert_exactly_once(out, n)
    assert committed() == n + 2
    events = _events(lines)
    starts = [e for e in events if e["event"] == "started"]
    # Each restart goes on after the last output on disk; the one after the write-then-kill commits it first.
    assert [e["next_batch"] for e in starts] == [0, 1, 3, 4]
    assert {e["mode"] for e in starts} == {mode}
    reconciled = [e for e in events if e["event"] == "reconciled"]
    assert len(reconciled) == 1 and sum(r["end"] - r["start"] for r in reconciled[0]["ranges"]) == per_batch
    # (a batch killed after its commit reports no event: the restart does not run it again)
    assert [e["batch"] for e in events if e["event"] == "batch"] == [0, 1, 4, 5]


def test_bad_messages_go_to_the_dead_letter_topic_and_the_stream_goes_on(spark, broker, tmp_path):
    from confluent_kafka import Producer

    topic = "drv-bad"
    ensure_topic(broker.bootstrap, topic, 1)
    good = {i: np.full(SHAPE, i, np.uint16) for i in range(12)}
    enc = {i: encode_frame(FrameHeader("bad", i, (0.0, 0.0), time.time()), a) for i, a in good.items()}
    bad = [
        (b"100", encode_frame(FrameHeader("bad", 100, (0.0, 0.0), time.time()), good[0])[:-7], "truncated_payload"),
        (b"101", b"XXXX" + enc[1][4:], "bad_magic"),
        (b"102", encode_frame(FrameHeader("bad", 102, (0.0, 0.0), time.time()), np.zeros((16, 16), np.uint16)),
         "wrong_shape"),
        (b"103", encode_frame(FrameHeader("bad", 103, (0.0, 0.0), time.time()), np.zeros(SHAPE, np.uint8)),
         "wrong_dtype"),
        (b"104", enc[2][:12], "truncated_header"),
        (b"999", encode_frame(FrameHeader("bad", 105, (0.0, 0.0), time.time()), good[0]), "key_mismatch"),
    ]
    producer = Producer({"bootstrap.servers": broker.bootstrap, "logger": __import__("logging").getLogger("t")})
    sequence = []
    for i in range(12):
        sequence.append((str(i).encode(), enc[i]))
        if i % 2:   # a bad message after every other good frame
            key, value, _ = bad[(i // 2) % len(bad)]
            sequence.append((key, value))
    for key, value, _ in bad:   # every bad kind at least once, also after the good ones
        sequence.append((key, value))
    sequence.append((b"end", encode_end_of_scan("bad", 12, 0, time.time())))
    for key, value in sequence:
        producer.produce(topic, value, key=key, partition=0)
    assert producer.flush(10) == 0
    n_bad = len(sequence) - 12 - 1

    report = _driver(spark, broker.bootstrap, topic, tmp_path / "out", max_frames=7, expect_shape=SHAPE,
                     expect_dtype="uint16").run(until_end_of_scan=True)
    assert report.stopped == "end_of_scan" and report.frames == 12 and report.dead_letters == n_bad
    _assert_exactly_once(tmp_path / "out", 12)
    reasons = {}
    for _, path in list_outputs(tmp_path / "out"):
        for code, count in read_meta(path)["reasons"].items():
            reasons[code] = reasons.get(code, 0) + count
    assert set(reasons) == {code for _, _, code in bad} and sum(reasons.values()) == n_bad
    # the dead-letter topic holds the original bytes, with the reasons in headers
    letters = read_offset_range(broker.bootstrap, topic + ".dlq", 0, 0, n_bad, timeout=20)
    bad_values = {v for _, v, _ in bad}
    assert len(letters) == n_bad and all(r.value in bad_values for r in letters)
    assert watermarks(broker.bootstrap, topic + ".dlq")[(topic + ".dlq", 0)][1] == n_bad
    assert committed_offsets(broker.bootstrap, "g", topic, [0]) == {(topic, 0): len(sequence)}


def test_broker_down_at_start_is_a_fast_clear_error(spark, tmp_path, capsys):
    bootstrap = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"timed out trying to reach the Kafka broker at {bootstrap} after 2.0 s.*refused"):
        _driver(spark, bootstrap, "frames", tmp_path / "out", start_timeout=2.0).run()
    assert time.monotonic() - t0 < 6
    t0 = time.monotonic()
    assert cli_main(["stream", "run", "--bootstrap", bootstrap, "--group", "g", "--out", str(tmp_path / "o"),
                     "--start-timeout", "2"]) == 1
    assert time.monotonic() - t0 < 6
    assert f"sparkmpi: error: timed out trying to reach the Kafka broker at {bootstrap}" in capsys.readouterr().err
    assert cli_main(["stream", "run", "--bootstrap", bootstrap, "--out", "o"]) == 2   # no --group
    assert "--group is required" in capsys.readouterr().err


def _fail_on_rank_1(comm, frames):
    n = sum(1 for _ in frames)
    if comm.rank == 1:
        raise ValueError(f"bad detector calibration on rank one ({n} frames)")
    return {"n": np.array([n])}


def test_failing_mpi_function_commits_nothing_and_names_the_batch(spark, broker, tmp_path, mode):
    topic, out = f"drv-fail-{mode}", tmp_path / "out"
    publish_kafka(SyntheticScan(50, SHAPE, seed=3), broker.bootstrap, topic, partitions=2)
    lines = tmp_path / "events.jsonl"
    driver = _driver(spark, broker.bootstrap, topic, out, process=_fail_on_rank_1, batch_retries=1, json_lines=lines,
                     mode=mode)
    with pytest.raises(BatchFailed) as info:
        driver.run(until_end_of_scan=True)
    message = str(info.value)
    assert f"batch 0 (offsets {topic}[0] [0, 26), {topic}[1] [0, 26)) failed 2 time(s)" in message
    assert "nothing of it was committed" in message and "bad detector calibration on rank one" in message
    assert info.value.batch == 0 and info.value.attempts == 2
    assert [e["event"] for e in _events(lines)].count("retry") == 1
    # world mode: the failed world was restarted once for the retry, and closed at the end
    assert driver.restarts == (1 if mode == "world" else 0)
    assert driver.world is None
    assert list_outputs(out) == []
    assert committed_offsets(broker.bootstrap, "g", topic, [0, 1]) == {(topic, 0): None, (topic, 1): None}


def test_flaky_mpi_function_is_retried_and_counted_once(spark, broker, tmp_path, mode):
    topic, out, marker = f"drv-flaky-{mode}", tmp_path / "out", tmp_path / "failed-once"
    publish_kafka(SyntheticScan(80, SHAPE, seed=4), broker.bootstrap, topic, partitions=2)

    def flaky(comm, frames, _marker=str(marker)):
        from sparkmpi.stream.driver import integrate_frames

        result = integrate_frames(comm, frames)
        if comm.rank == 0 and not os.path.exists(_marker):
            open(_marker, "w").close()
            os._exit(3)   # the rank dies: in world mode the world is broken and must be restarted
        return result

    driver = _driver(spark, broker.bootstrap, topic, out, process=flaky, max_frames=50, mode=mode)
    report = driver.run(until_end_of_scan=True)
    assert marker.exists()
    assert driver.restarts == (1 if mode == "world" else 0) and len(driver.restart_s) == driver.restarts
    _assert_exactly_once(out, 80)
    assert report.frames == 80


def test_broker_lost_mid_stream_retries_then_fails_clearly_and_restart_is_exact(spark, tmp_path):
    """Stop the broker right after a batch's output is written: the commit is retried with
    backoff, then a clear error; after the broker is back, nothing is lost or repeated."""
    data, out, topic = tmp_path / "kafka", tmp_path / "out", "drv-lost"
    info = start_broker(data, 0, timeout=90, die_with_parent=True)
    try:
        publish_kafka(SyntheticScan(120, SHAPE, seed=6), info.bootstrap, topic, partitions=2)

        def lose_broker(batch, path):
            if batch == 1:
                stop_broker(data, grace=10)

        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable) as err:
            _driver(spark, info.bootstrap, topic, out, max_frames=50, broker_retries=2, retry_backoff=0.2, broker_timeout=2.0,
                    after_write=lose_broker).run(until_end_of_scan=True)
        message = str(err.value)
        assert f"batch 1: committing offsets: the Kafka broker at {info.bootstrap} did not answer after 3 attempt(s)" \
            in message
        assert "offsets are committed up to drv-lost[0]=25, drv-lost[1]=25" in message
        assert time.monotonic() - t0 < 60
        assert [b for b, _ in list_outputs(out)] == [0, 1]
        info = start_broker(data, 0, timeout=90, die_with_parent=True)   # same data, new port
        report = _driver(spark, info.bootstrap, topic, out, max_frames=10).run(max_batches=1)
        assert sum(r["end"] - r["start"] for r in report.reconciled) == 50 and report.batches == 1

        # Lost again, now after batch 3 is planned, as its tasks start reading their ranges.
        class LoseBrokerAtTheRead(StreamDriver):
            def run_batch(self, source, payloads, batch, ranges):
                if batch == 3 and not getattr(self, "_lost", False):
                    self._lost = True
                    stop_broker(data, grace=10)
                return super().run_batch(source, payloads, batch, ranges)

        lines = tmp_path / "lost-read.jsonl"
        driver = LoseBrokerAtTheRead(spark, info.bootstrap, topic, "g", out, ranks=2, trigger=0.2, progress=None,
                                     warm_up=False, max_frames=10, broker_retries=1, retry_backoff=0.2,
                                     broker_timeout=2.0, read_timeout=3.0, json_lines=lines)
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable) as err:
            driver.run(until_end_of_scan=True)
        assert time.monotonic() - t0 < 60
        assert f"batch 3: the Kafka broker at {info.bootstrap} was lost while the tasks read their ranges; " \
               "gave up after 1 retries; offsets are committed up to drv-lost[0]=" in str(err.value)
        assert [e["what"] for e in _events(lines) if e["event"] == "broker_retry"] == ["batch 3"]
        assert [b for b, _ in list_outputs(out)] == [0, 1, 2]   # nothing of batch 3 written
        info = start_broker(data, 0, timeout=90, die_with_parent=True)
        report = _driver(spark, info.bootstrap, topic, out, max_frames=50).run(until_end_of_scan=True)
        assert report.reconciled == []
        _assert_exactly_once(out, 120)
    finally:
        stop_broker(data, grace=10)


def test_zeromq_source_feeds_the_same_loop(spark, tmp_path, mode):
    n = 300
    scan = SyntheticScan(n, SHAPE, "uint16", seed=8, scan_id="zmq")
    with ZmqPublisher("tcp://127.0.0.1:0") as pub:
        errors = []

        def send():
            try:
                publish_zmq(scan, pub, rate=1500)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        driver = ZmqStreamDriver(spark, pub.endpoint, tmp_path / "out", ranks=2, trigger=0.1, max_frames=120,
                                 progress=None, mode=mode)
        report = driver.run()
        thread.join(10)
    assert not errors
    assert report.stopped == "end_of_scan" and report.frames == n
    _assert_exactly_once(tmp_path / "out", n)


def test_bad_frames_through_the_zeromq_driver_become_dead_letters(spark, tmp_path):
    """Malformed messages between good frames on a real ZeroMQ socket: each good frame written exactly
    once, each bad message a line in dead-letters.jsonl with its reason, the stream goes on."""
    from sparkmpi.stream.detector import ZMQ_FRAME

    n = 40
    scan = SyntheticScan(n, SHAPE, "uint16", seed=9, scan_id="zbad")

    def head(index, **changes):
        return json.dumps({"htype": ZMQ_FRAME, "scan": "zbad", "index": index, "shape": list(SHAPE),
                           "dtype": "<u2", "pos": [0, 0], "ts": time.time(), **changes}).encode()

    good_bytes = np.zeros(SHAPE, "<u2").tobytes()
    bad = [([head(900), good_bytes[:-6]], "truncated_payload"),
           ([b"{not json", b""], "bad_header"),
           ([head(901, htype="telemetry")], "bad_kind"),
           ([head(902, dtype="<c8"), b"\0" * 8 * SHAPE[0] * SHAPE[1]], "bad_dtype"),
           ([head(903, shape=[16, 16]), b"\0" * 2 * 256], "wrong_shape"),
           ([head(904)], "bad_header")]                       # a frame message without its data part
    with ZmqPublisher("tcp://127.0.0.1:0") as pub:
        errors = []

        def send():
            try:
                pub.send_series_header("zbad", n, SHAPE, "uint16")
                for i, (index, position, array) in enumerate(scan):
                    pub.send_frame(FrameHeader("zbad", index, position, time.time()), array)
                    if i % 7 == 3:
                        pub._send(bad[(i // 7) % len(bad)][0], "a bad message")
                for parts, _ in bad:
                    pub._send(parts, "a bad message")
                pub.send_end("zbad", n)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        report = ZmqStreamDriver(spark, pub.endpoint, tmp_path / "out", ranks=2, trigger=0.1, max_frames=15,
                                 progress=None, expect_shape=SHAPE, expect_dtype="uint16").run()
        thread.join(10)
    assert not errors and not thread.is_alive()
    sent_bad = [code for i in range(n) if i % 7 == 3 for code in [bad[(i // 7) % len(bad)][1]]] + \
        [code for _, code in bad]
    assert report.stopped == "end_of_scan" and report.frames == n and report.dead_letters == len(sent_bad)
    _assert_exactly_once(tmp_path / "out", n)
    letters = [json.loads(x) for x in (tmp_path / "out" / "dead-letters.jsonl").read_text().splitlines()]
    assert sorted(d["code"] for d in letters) == sorted(sent_bad)
    assert all(d["reason"] for d in letters)
    assert sorted(d["sequence"] for d in letters) == sorted(set(d["sequence"] for d in letters))


def _hang_on_rank_1(comm, frames):
    frames = list(frames)
    if comm.rank == 1:
        import time as _time

        _time.sleep(3600)
    comm.Barrier()
    return {"n": np.array([len(frames)])}


def test_hanging_process_function_times_out_commits_nothing_and_leaves_no_rank(spark, broker, tmp_path):
    """A process function that never returns on one rank: the job timeout aborts the batch (every rank
    killed, checked by the leak check), nothing is written or committed, the error names the batch."""
    topic, out = "drv-hang", tmp_path / "out"
    publish_kafka(SyntheticScan(20, SHAPE, seed=12), broker.bootstrap, topic, partitions=2)
    driver = _driver(spark, broker.bootstrap, topic, out, process=_hang_on_rank_1, batch_retries=0, job_timeout=4)
    t0 = time.monotonic()
    with pytest.raises(BatchFailed) as info:
        driver.run(until_end_of_scan=True)
    assert time.monotonic() - t0 < 30
    message = str(info.value)
    assert "batch 0 (offsets drv-hang[0] [0, 11), drv-hang[1] [0, 11)) failed 1 time(s)" in message
    assert "timed out after 4 s" in message, message
    assert list_outputs(out) == []
    assert committed_offsets(broker.bootstrap, "g", topic, [0, 1]) == {(topic, 0): None, (topic, 1): None}


def _count_with_state(comm, frames, state):
    """Frames seen by this rank since its world started: kept in the rank's state."""
    n = sum(1 for _ in frames)
    state["seen"] = state.get("seen", 0) + n
    state["batches"] = state.get("batches", 0) + 1
    return {"seen": np.array([state["seen"]]), "batches": np.array([state["batches"]])}


def test_process_state_is_kept_across_batches_on_a_world(spark, broker, tmp_path, mode):
    n, topic, out = 200, f"drv-state-{mode}", tmp_path / "out"
    publish_kafka(SyntheticScan(n, SHAPE, seed=9), broker.bootstrap, topic, partitions=2)
    report = _driver(spark, broker.bootstrap, topic, out, process=_count_with_state, max_frames=60,
                     mode=mode).run(until_end_of_scan=True)
    assert report.frames == n and report.batches >= 3
    last = list_outputs(out)[-1][1]
    with np.load(last) as z:
        seen, batches = z["result.seen"], z["result.batches"]
    if mode == "world":   # every rank counted all its frames of every batch
        assert seen.sum() == n and batches.tolist() == [report.batches] * 2
    else:                 # a fresh process per batch: the state starts empty each time
        assert seen.sum() < n and batches.tolist() == [1, 1]


def test_continuous_trigger_starts_the_next_batch_at_once(spark, broker, tmp_path):
    n, topic, out = 300, "drv-continuous", tmp_path / "out"
    ensure_topic(broker.bootstrap, topic, 2)
    driver = _driver(spark, broker.bootstrap, topic, out, trigger=30.0, continuous=True)
    assert driver.trigger == 0.0
    producer = threading.Thread(target=publish_kafka, daemon=True, kwargs=dict(
        source=SyntheticScan(n, SHAPE, seed=10, scan_id="cont"), bootstrap=broker.bootstrap, topic=topic,
        partitions=2, rate=600))
    producer.start()
    report = driver.run(until_end_of_scan=True)
    producer.join(30)
    _assert_exactly_once(out, n)
    # a 30 s trigger would have cut one or two batches; continuous cuts one per gap in the stream
    assert report.batches >= 5 and report.seconds < 25


def test_bad_mode_and_a_world_of_the_wrong_size_are_named(spark, tmp_path):
    with pytest.raises(ValueError, match="mode: expected one of 'world', 'jobs', got 'threads'"):
        _driver(spark, "127.0.0.1:9092", "t", tmp_path, mode="threads")

    class FakeWorld:
        size = 3
        closed = False

    with pytest.raises(ValueError, match="world: it has 3 ranks but ranks=2"):
        _driver(spark, "127.0.0.1:9092", "t", tmp_path, world=FakeWorld())
    with pytest.raises(ValueError, match="only used with mode='world', got mode='jobs'"):
        _driver(spark, "127.0.0.1:9092", "t", tmp_path, world=FakeWorld(), mode="jobs")
