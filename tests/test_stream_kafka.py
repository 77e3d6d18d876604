"""End to end against a REAL Kafka broker started by sparkmpi's own tooling.

The session fixture fetches Kafka's jars from Maven Central on first use (then
they are cached in ~/.cache/sparkmpi or $SPARKMPI_KAFKA_HOME; the fetch itself
is tested against a file:// Maven repository, and one test marked ``online``
checks Maven Central), starts a
single-node KRaft broker on a free 127.0.0.1 port with a temporary data
folder, and stops it at the end, checking that no java process is left.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from stream_fixtures import java_processes_using

from sparkmpi.cli import main as cli_main
from sparkmpi.stream.kafka_client import ensure_topic, topic_partitions
from sparkmpi.stream._errors import BrokerError, BrokerUnavailable
from sparkmpi.stream.detector import SyntheticScan, publish_kafka
from sparkmpi.stream.frames import FrameHeader, encode_frame
from sparkmpi._proc import free_port
from sparkmpi.stream.broker import DEFAULT_VERSION, fetch_kafka, start_broker
from sparkmpi.stream.offsets import (
    DeadLetter, DeadLetterWriter, EndMarker, Frame, OffsetError, StreamCounters, commit_offsets,
    committed_offsets, decode_record, plan_batch, read_offset_range, watermarks,
)

pytestmark = pytest.mark.slow


def _drain(bootstrap, topic, group, *, max_messages=None):
    """Plan, read and commit batches until nothing is new; return the decoded items per batch."""
    batches = []
    parts = topic_partitions(bootstrap, topic)
    while True:
        plan = plan_batch(committed_offsets(bootstrap, group, topic, parts), watermarks(bootstrap, topic, parts),
                          max_messages=max_messages)
        if not plan:
            return batches
        items = []
        for r in plan:
            records = read_offset_range(bootstrap, r.topic, r.partition, r.start, r.end, timeout=30)
            assert [rec.offset for rec in records] == list(range(r.start, r.end))
            items.extend(decode_record(rec) for rec in records)
        batches.append((plan, items))
        commit_offsets(bootstrap, group, plan)


def test_publish_then_read_by_offset_ranges_exactly(broker):
    n, parts = 3000, 3
    scan = SyntheticScan(n, (64, 64), "uint16", seed=7, scan_id="exact")
    report = publish_kafka(scan, broker.bootstrap, "frames-exact", partitions=parts)
    assert (report.frames, report.end_markers) == (n, parts)
    marks = watermarks(broker.bootstrap, "frames-exact")
    assert marks == {("frames-exact", p): (0, n // parts + 1) for p in range(parts)}

    batches = _drain(broker.bootstrap, "frames-exact", "g-exact", max_messages=700)
    assert len(batches) == -(-(n + parts) // 700)
    assert all(sum(r.count for r in plan) <= 700 for plan, _ in batches)
    counters = StreamCounters()
    indices = []
    for _, items in batches:
        for item in items:
            counters.add(item)
            if isinstance(item, Frame):
                indices.append(item.header.index)
                assert item.partition == item.header.index % parts
    assert sorted(indices) == list(range(n)), "frames lost or duplicated"
    assert (counters.frames, counters.end_markers, counters.dead_letters) == (n, parts, 0)
    ends = [i for _, items in batches for i in items if isinstance(i, EndMarker)]
    assert {e.marker.frames for e in ends} == {n} and sorted(e.partition for e in ends) == list(range(parts))
    # the frames are the simulator's, bit for bit
    some = {i.header.index: i for _, items in batches for i in items if isinstance(i, Frame)}
    for k in (0, 1234, n - 1):
        np.testing.assert_array_equal(some[k].array, scan.frame(k))
        assert some[k].header.position == scan.position(k)
    # committed offsets are the ends; nothing more to plan; a new group starts from scratch
    assert committed_offsets(broker.bootstrap, "g-exact", "frames-exact", range(parts)) == \
        {("frames-exact", p): n // parts + 1 for p in range(parts)}
    assert _drain(broker.bootstrap, "frames-exact", "g-exact") == []
    fresh = committed_offsets(broker.bootstrap, "g-other", "frames-exact", range(parts))
    assert set(fresh.values()) == {None}


def test_uncommitted_batch_is_read_again(broker):
    """A batch whose offsets were never committed is planned again: the driver's restart path."""
    scan = SyntheticScan(40, (16, 16), seed=1, scan_id="replay")
    publish_kafka(scan, broker.bootstrap, "frames-replay", partitions=2, end_marker=False)
    marks = watermarks(broker.bootstrap, "frames-replay")
    first = plan_batch(committed_offsets(broker.bootstrap, "g-replay", "frames-replay", [0, 1]), marks,
                       max_messages=10)
    # ... "crash" before commit_offsets(...)
    again = plan_batch(committed_offsets(broker.bootstrap, "g-replay", "frames-replay", [0, 1]), marks,
                       max_messages=10)
    assert again == first
    commit_offsets(broker.bootstrap, "g-replay", first)
    after = plan_batch(committed_offsets(broker.bootstrap, "g-replay", "frames-replay", [0, 1]), marks)
    assert [(r.start, r.end) for r in after] == [(5, 20), (5, 20)]


def test_malformed_messages_land_in_dead_letter_topic(broker):
    from confluent_kafka import Producer

    bootstrap = broker.bootstrap
    ensure_topic(bootstrap, "frames-bad", 1)
    array = np.arange(64, dtype=np.uint16).reshape(8, 8)
    good = encode_frame(FrameHeader("bad-scan", 0), array)
    floats = encode_frame(FrameHeader("bad-scan", 5), np.array([[1.0, np.nan]], np.float32))
    sent = [
        (b"0", good),
        (b"1", encode_frame(FrameHeader("bad-scan", 1), array)[:-10]),    # truncated frame
        (b"2", b"JUNK" + good[4:]),                                       # bad header (magic)
        (b"9", encode_frame(FrameHeader("bad-scan", 3), array)),           # key says 9, header says 3
        (b"4", good.replace(b'"<u2"', b'"<c8"')),                          # unsupported dtype
        (b"5", floats),                                                    # NaN in a float frame
        (b"6", encode_frame(FrameHeader("bad-scan", 6), array) + b"xx"),   # wrong size for its shape
    ]
    producer = Producer({"bootstrap.servers": bootstrap, "logger": __import__("logging").getLogger("t")})
    for key, value in sent:
        producer.produce("frames-bad", value, key=key, partition=0)
    assert producer.flush(10) == 0

    records = read_offset_range(bootstrap, "frames-bad", 0, 0, len(sent), timeout=20)
    items = [decode_record(r) for r in records]
    counters = StreamCounters()
    with DeadLetterWriter(bootstrap) as dlq:
        for item in items:
            counters.add(item)
            if isinstance(item, DeadLetter):
                dlq.write(item)
    assert isinstance(items[0], Frame)
    expected = ["truncated_payload", "bad_magic", "key_mismatch", "bad_dtype", "not_finite", "trailing_bytes"]
    assert [i.code for i in items[1:]] == expected
    assert counters.dead_letters == 6 and counters.frames == 1 and dict(counters.reasons) == dict.fromkeys(expected, 1)

    letters = read_offset_range(bootstrap, "frames-bad.dlq", 0, 0, 6, timeout=20)
    assert [r.value for r in letters] == [v for _, v in sent[1:]]
    assert [r.key for r in letters] == [k for k, _ in sent[1:]]
    # the reasons travel as Kafka headers
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "t-dlq", "enable.auto.commit": False,
                         "logger": __import__("logging").getLogger("t")})
    try:
        consumer.assign([TopicPartition("frames-bad.dlq", 0, 0)])
        msgs = []
        deadline = time.monotonic() + 20
        while len(msgs) < 6 and time.monotonic() < deadline:
            msgs.extend(consumer.consume(6 - len(msgs), timeout=1))
    finally:
        consumer.close()
    headers = [dict(m.headers()) for m in msgs]
    assert [h["code"].decode() for h in headers] == expected
    assert "needs 128 bytes, got 118" in headers[0]["reason"].decode()
    assert [int(h["source_offset"]) for h in headers] == [1, 2, 3, 4, 5, 6]
    assert {h["source_topic"] for h in headers} == {b"frames-bad"}


def test_read_outside_the_partition_is_an_offset_error(broker):
    ensure_topic(broker.bootstrap, "frames-empty", 1)
    with pytest.raises(OffsetError, match=r"frames-empty\[0\] holds offsets \[0, 0\).*cannot read \[0, 5\)"):
        read_offset_range(broker.bootstrap, "frames-empty", 0, 0, 5, timeout=10)
    with pytest.raises(ValueError, match="topic 'frames-empty' .* exists with 1 partitions, expected 2"):
        ensure_topic(broker.bootstrap, "frames-empty", 2)


def test_broker_down_fails_fast_with_the_address():
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    calls = [
        lambda: read_offset_range(bootstrap, "frames", 0, 0, 10, timeout=2),
        lambda: watermarks(bootstrap, "frames", timeout=2),
        lambda: commit_offsets(bootstrap, "g", plan_batch({}, {("frames", 0): 3}), timeout=2),
        lambda: publish_kafka(SyntheticScan(3, (8, 8)), bootstrap, "frames", timeout=2),
    ]
    gc.collect()
    gc.disable()   # what a failed call leaves must go by reference counting, not at some later gc
    try:
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(BrokerUnavailable) as info:
                call()
            waited = time.monotonic() - t0
            assert waited < 5, f"took {waited:.1f} s to notice the broker is down"
            message = str(info.value)
            assert f"timed out trying to reach the Kafka broker at {bootstrap} after 2." in message
            assert "Connection refused" in message
            # The error (and its traceback) is still held here: the clients must be gone anyway.
            assert _librdkafka_threads() == [], f"{message}: a Kafka client outlived the failed call"
    finally:
        gc.enable()


def _librdkafka_threads() -> list[str]:
    """Names of this process's librdkafka threads (each live client has a few)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("rdk:"):
            names.append(name)
    return names


def test_port_in_use_is_refused(broker, tmp_path):
    with pytest.raises(BrokerError, match=f"port {broker.port} on 127.0.0.1 is in use"):
        start_broker(tmp_path, broker.port)


def test_a_host_the_broker_cannot_listen_on_is_named(broker, tmp_path):
    with pytest.raises(ValueError, match=r"host: expected an IPv4 address .* got '127.0.0.1:9092'"):
        start_broker(tmp_path, 0, host="127.0.0.1:9092")
    # 192.0.2.0/24 is reserved for documentation: no interface of this machine has it.
    with pytest.raises(BrokerError, match="cannot listen on host '192.0.2.7'"):
        start_broker(tmp_path, 0, host="192.0.2.7", fetch=False)
    assert not (tmp_path / "broker.json").exists()


def test_broker_that_cannot_start_reports_its_log_quickly(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "meta.properties").write_text("version=1\nnode.id=99\ncluster.id=not-a-valid-id\n")
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as info:
        start_broker(tmp_path, 0, timeout=60)
    waited = time.monotonic() - t0
    assert waited < 30
    message = str(info.value)
    assert "the Kafka broker exited with status" in message and "last lines of" in message
    assert java_processes_using(tmp_path) == []
    assert not (tmp_path / "broker.json").exists()


def test_cli_start_status_simulate_stop(tmp_path, capsys, broker):
    data = str(tmp_path / "kd")
    assert cli_main(["kafka", "status", "--data-dir", data]) == 1
    assert "not running: no broker started from" in capsys.readouterr().out
    assert cli_main(["kafka", "start", "--data-dir", data, "--port", "0", "--json"]) == 0
    started = json.loads(capsys.readouterr().out)
    try:
        assert started["bootstrap"].startswith("127.0.0.1:") and Path(started["log_file"]).exists()
        assert cli_main(["kafka", "status", "--data-dir", data]) == 0
        assert f"running at {started['bootstrap']}" in capsys.readouterr().out
        # detector: the default bootstrap is the broker started from --data-dir
        assert cli_main(["detector", "simulate", "--data-dir", data, "--frames", "50", "--frame-shape", "16x24",
                         "--partitions", "2", "--rate", "500", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["frames"] == 50 and report["partitions"] == 2 and report["end_markers"] == 2
        assert report["seconds"] >= 49 / 500
        assert watermarks(started["bootstrap"], "frames") == {("frames", 0): (0, 26), ("frames", 1): (0, 26)}
        # a user's own cluster through --bootstrap
        assert cli_main(["kafka", "status", "--bootstrap", broker.bootstrap]) == 0
        capsys.readouterr()
        assert cli_main(["detector", "simulate", "--frame-shape", "16", "--frames", "2"]) == 2
        assert "--frame-shape" in capsys.readouterr().err
    finally:
        assert cli_main(["kafka", "stop", "--data-dir", data]) == 0
    assert "broker stopped" in capsys.readouterr().out
    assert java_processes_using(Path(data).resolve()) == []
    assert cli_main(["kafka", "status", "--data-dir", data]) == 1


def _file_repository(root: Path) -> str:
    """A Maven repository at ``file://root`` holding everything the fetch needs (Kafka's jars and poms,
    Maven's plugins), linked from Maven's local cache that fetching Kafka once filled."""
    cache = Path.home() / ".m2" / "repository"
    if not (cache / "org" / "apache" / "kafka" / "kafka_2.13" / DEFAULT_VERSION).is_dir():
        primer = root.parent / "primer"
        fetch_kafka(home=primer, progress=None)   # fills Maven's cache (online, once)
        shutil.rmtree(primer)
    for path in cache.rglob("*"):
        if path.is_file() and path.name not in ("_remote.repositories", "resolver-status.properties") \
                and not path.name.endswith(".lastUpdated"):
            target = root / path.relative_to(cache)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return root.as_uri()


def test_fetch_from_a_file_maven_repository_is_verified_and_cached(tmp_path, monkeypatch):
    """The whole fetch path (Maven resolving and copying every jar, verification, the move into place)
    against a file:// repository instead of Maven Central: Maven gets a fresh user home whose settings
    mirror every repository to it, so nothing comes from its own cache or the network."""
    from sparkmpi.stream.broker import MANIFEST, kafka_home, kafka_is_fetched

    url = _file_repository(tmp_path / "repo")
    maven_home = tmp_path / "maven-user"
    (maven_home / ".m2").mkdir(parents=True)
    (maven_home / ".m2" / "settings.xml").write_text(
        "<settings><mirrors><mirror><id>files</id><mirrorOf>*</mirrorOf>"
        f"<url>{url}</url></mirror></mirrors></settings>")
    monkeypatch.setenv("MAVEN_OPTS", f"-Duser.home={maven_home}")
    home = tmp_path / "kafka-home"
    monkeypatch.setenv("SPARKMPI_KAFKA_HOME", str(home))
    assert kafka_home() == home and not kafka_is_fetched(home=home)
    assert fetch_kafka(progress=None) == home
    # Maven resolved everything from the file repository into the fresh home's cache.
    fetched = maven_home / ".m2" / "repository" / "org" / "apache" / "kafka" / "kafka_2.13" / DEFAULT_VERSION
    assert (fetched / f"kafka_2.13-{DEFAULT_VERSION}.jar").is_file()
    assert "files" in (fetched / "_remote.repositories").read_text()
    manifest = json.loads((home / MANIFEST).read_text())
    jars = sorted(p.name for p in (home / "lib").glob("*.jar"))
    assert sorted(manifest["jars"]) == jars and f"kafka_2.13-{DEFAULT_VERSION}.jar" in jars
    assert any(j.startswith("log4j-slf4j-impl-") for j in jars)
    # The jars are the ones the repository held, byte for byte.
    for name, digest in manifest["jars"].items():
        assert hashlib.sha256((home / "lib" / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kafka-home", "maven-user", "repo"]  # no temporary left
    mtime = (home / MANIFEST).stat().st_mtime_ns
    fetch_kafka(progress=None)  # cached: nothing happens
    assert (home / MANIFEST).stat().st_mtime_ns == mtime
    # a damaged jar makes the cache invalid; start_broker(fetch=False) says how to fix it
    (home / "lib" / f"kafka-clients-{DEFAULT_VERSION}.jar").write_bytes(b"not a zip")
    assert not kafka_is_fetched(home=home)
    with pytest.raises(BrokerError, match="run `sparkmpi kafka fetch`"):
        start_broker(tmp_path / "d", 0, fetch=False)
    with pytest.raises(ValueError, match="version: Kafka 4.0 or newer"):
        fetch_kafka("3.9.1")


def test_fetch_from_an_empty_repository_names_the_version(tmp_path, monkeypatch):
    maven_home = tmp_path / "maven-user"
    (maven_home / ".m2").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (maven_home / ".m2" / "settings.xml").write_text(
        "<settings><mirrors><mirror><id>files</id><mirrorOf>*</mirrorOf>"
        f"<url>{(tmp_path / 'empty').as_uri()}</url></mirror></mirrors></settings>")
    monkeypatch.setenv("MAVEN_OPTS", f"-Duser.home={maven_home}")
    home = tmp_path / "kafka-home"
    with pytest.raises(BrokerError, match=f"Maven could not fetch Kafka {DEFAULT_VERSION} \\(exit 1"):
        fetch_kafka(home=home, progress=None)
    assert not home.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "maven-user"]


@pytest.mark.online
def test_maven_central_serves_the_default_kafka_version():
    """The one check that needs the network (CI runs it; ``-m 'not online'`` leaves it out): Maven
    Central has the POM of the Kafka version fetch_kafka asks for, matching its published SHA-1."""
    import urllib.request

    base = (f"https://repo.maven.apache.org/maven2/org/apache/kafka/kafka_2.13/{DEFAULT_VERSION}/"
            f"kafka_2.13-{DEFAULT_VERSION}.pom")
    with urllib.request.urlopen(base, timeout=30) as r:
        pom = r.read()
    with urllib.request.urlopen(base + ".sha1", timeout=30) as r:
        sha1 = r.read().decode().split()[0]
    assert hashlib.sha1(pom).hexdigest() == sha1
    assert f"<version>{DEFAULT_VERSION}</version>".encode() in pom


def test_range_reader_keeps_its_consumer_and_drops_one_that_failed(broker):
    from sparkmpi.stream.offsets import _ReaderPool

    topic = "frames-reuse"
    publish_kafka(SyntheticScan(12, (8, 8)), broker.bootstrap, topic, end_marker=False)
    _ReaderPool.close_all()
    first = read_offset_range(broker.bootstrap, topic, 0, 0, 5, timeout=20)
    idle = [r for readers in _ReaderPool._idle.values() for r in readers]
    assert len(idle) == 1
    consumer = idle[0].consumer
    second = read_offset_range(broker.bootstrap, topic, 0, 5, 12, timeout=20)
    assert [r.offset for r in first + second] == list(range(12))  # exact ranges, no prefetch leaking in
    assert [r.consumer for readers in _ReaderPool._idle.values() for r in readers] == [consumer]
    with pytest.raises(OffsetError):
        read_offset_range(broker.bootstrap, topic, 0, 10, 20, timeout=20)
    # A reader whose call failed is closed, not kept.
    assert not any(_ReaderPool._idle.values())
    assert [r.offset for r in read_offset_range(broker.bootstrap, topic, 0, 3, 4, timeout=20)] == [3]


def test_producer_waits_for_its_producer_id_before_the_scan_clock():
    from sparkmpi.stream.detector import _ProducerIdWatch

    watch = _ProducerIdWatch()
    watch(json.dumps({"eos": {"idemp_state": "WaitTransport", "producer_id": -1}}))
    assert not watch.assigned
    watch(json.dumps({"eos": {"idemp_state": "Assigned", "producer_id": 7}}))
    assert watch.assigned
    watch(json.dumps({"eos": {"idemp_state": "WaitTransport"}}))  # later states do not undo it
    assert watch.assigned
