"""End to end: a real RunEngine, the real broker, Spark + MPI, a real Tiled server, the feedback loop."""

from __future__ import annotations

import json
import threading
import uuid

import dask
import numpy as np
import pytest


pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_pooled_readers():
    """Readers this process's range reads pooled (the bridge reads its topic back) are closed
    after each test: the pool keeps their broker connections for the next read by design."""
    yield
    from sparkmpi.stream.offsets import _ReaderPool

    _ReaderPool.close_all()


@pytest.fixture(scope="module")
def world(spark):
    """One world of 2 ranks for the module's pipelines (each would start its own): the reconstruction
    state on the ranks is keyed by scan uid, so the tests do not meet there."""
    import sparkmpi

    with sparkmpi.World(spark, ranks=2, preload=("sparkmpi.ptycho.streaming",)) as shared:
        yield shared


@pytest.fixture
def tiled_server(tmp_path):
    """A server per test: one test stops and restarts it (a new process)."""
    from sparkmpi.bluesky.tiled import LocalTiled

    server = LocalTiled(tmp_path / "tiled").start()
    try:
        yield server
    finally:
        server.stop()


def read_topic(bootstrap, topic):
    from sparkmpi.stream.offsets import read_offset_range, watermarks

    (low, high), = watermarks(bootstrap, topic, [0]).values()
    return [json.loads(r.value) for r in read_offset_range(bootstrap, topic, 0, low, high, timeout=10)]


def test_scan_stops_early_and_results_land_in_tiled(spark, broker, world, tiled_server, tmp_path):
    from sparkmpi.bluesky.feedback import ConvergenceRule
    from sparkmpi.bluesky.loop import run_scan_loop
    from sparkmpi.bluesky.scan import ScanSetup
    from sparkmpi.bluesky.tiled import TiledResults
    from sparkmpi.viz.tiled_loader import load_tiled_scan

    topic = f"bs-{uuid.uuid4().hex[:8]}"
    rule = ConvergenceRule(min_coverage=0.4, error_tolerance=10.0, patience=1, min_frames=8)
    results = TiledResults(tiled_server.uri, tiled_server.api_key)
    # the frames of points 2 and 5 never reach the HDF5 file: the feedback asks for them again
    setup = ScanSetup.fermat(64, frame_size=16, exposure=0.08, write_hdf5=True, directory=tmp_path / "h5",
                             lose_frames=(2, 5))
    try:
        out = run_scan_loop(spark, broker.bootstrap, tmp_path / "loop", setup=setup, rule=rule, iterations=3,
                            final_iterations=10, checkpoint_frames=8, docs_topic=topic, tiled=results,
                            timeout=120, world=world)
    finally:
        results.close()
    uid = out["uid"]
    trace = [(q["frames_used"], round(q["coverage"], 3), q["fourier_error_trend"]) for q in out["quality"]]
    assert out["exit_status"] == "success" and out["stopped_early"], trace
    # the reconstruction advanced by checkpoints of 8 frames, whatever the batches were; the rule stopped
    # at the first checkpoint that passed it (coverage >= 0.4, and a trend: from the second checkpoint on)
    checkpoints = [q for q in out["quality"] if not q["final"]]
    assert [q["frames_used"] for q in checkpoints] == [8 * (i + 1) for i in range(len(checkpoints))], trace
    first = next(q for q in checkpoints if q["coverage"] >= 0.4 and q["fourier_error_trend"] is not None)
    assert out["decision"]["frames_used"] == first["frames_used"], trace
    assert out["quality"][-1]["final"] and out["quality"][-1]["frames_used"] == out["points_used"]
    # two frames lost, two extra points measured at their places: they reached the reconstruction
    assert out["dead_letters"] == {"unreadable_datum": 2} and out["extra_points"] == 2
    assert out["points_used"] == out["points_measured"] - 2 < out["points_planned"]
    scene = setup.scene
    for y, x in setup.planned[[2, 5]]:
        pixel = ((y - scene.origin[0]) / scene.pixel_size, (x - scene.origin[1]) / scene.pixel_size)
        assert np.min(np.hypot(*(out["positions"] - pixel).T)) < 0.5, (y, x)
    assert out["quality"][-1]["missing_positions"] == []
    assert out["decision_latency_s"] is not None and 0 < out["decision_latency_s"] < 5
    assert out["tiled_errors"] == []
    quality = read_topic(broker.bootstrap, f"{topic}.quality")
    assert quality == out["quality"] and all(q["scan"] == uid for q in quality)
    assert quality[-1]["frames_used"] == out["points_used"] and quality[-1]["nrmse"] < 0.5
    decisions = read_topic(broker.bootstrap, f"{topic}.decisions")
    assert [d["action"] for d in decisions] == ["extra_points", "stop"] and "converged" in decisions[1]["reason"]
    np.testing.assert_allclose(sorted(map(tuple, decisions[0]["positions"])), sorted(map(tuple, setup.planned[[2, 5]])),
                               atol=1e-6)
    # Tiled, read back with Tiled's own client
    client = tiled_server.client()
    try:
        check_tiled(client, uid, out)
    finally:
        client.context.close()
    # the viewer's loader opens the scan from Tiled
    loaded = load_tiled_scan(tiled_server.uri, uid, api_key=tiled_server.api_key)
    assert loaded.object.shape == out["object"].shape and loaded.summary["frames"] == out["points_used"]
    check_refusals_are_set_aside(tiled_server)


def check_refusals_are_set_aside(server):
    """Writes the server refuses for good (here a name Tiled cannot store, and a wrong API
    key) fail naming the answer, are set aside, and do not hold back the writes after them
    (the first test's server, running already: a server takes about 10 s to start)."""
    from sparkmpi.bluesky.tiled import TiledRefused, TiledResults

    results = TiledResults(server.uri, server.api_key)
    try:
        with pytest.raises(TiledRefused, match=r"snapshot of scan bad/uid .* refused: 404"):
            results.write_snapshot("bad/uid", 0, np.zeros((4, 4)), {"n": 0})
        results.write_snapshot("good-uid", 0, np.ones((4, 4)), {"n": 0})
        assert results.written == 1 and not results.pending
        assert [(op[0], op[1]) for op, _ in results.refused] == [("snapshot", "bad/uid")]
    finally:
        results.close()
    stranger = TiledResults(server.uri, "not-the-key")
    with pytest.raises(TiledRefused, match="did not accept the API key"):
        stranger.write_snapshot("good-uid", 1, np.ones((4, 4)), {"n": 1})
    assert not stranger.pending and len(stranger.refused) == 1
    client = server.client()
    try:
        assert list(client["good-uid"]["snapshots"]) == ["0000"] and "bad" not in client
    finally:
        client.context.close()


def check_tiled(client, uid, out):
    scan = client[uid]
    assert scan.metadata["final"] is True and scan.metadata["exit_status"] == "success"
    assert scan.metadata["start"]["plan_name"] == "spiral_fermat"
    with dask.config.set(scheduler="synchronous"):   # dask's threaded pool would outlive the test
        np.testing.assert_allclose(scan["object"].read(), out["object"], rtol=1e-6)
        np.testing.assert_allclose(scan["errors"].read(), out["errors"])
    snapshots = list(scan["snapshots"])
    assert len(snapshots) >= 1 and scan["snapshots"][snapshots[-1]].metadata["scan"] == uid


def test_two_scans_at_once_then_one_in_a_row_with_hdf5_and_tiled_down(spark, broker, world, tiled_server,
                                                                        tmp_path):
    from sparkmpi.bluesky.live import BlueskyPipeline
    from sparkmpi.bluesky.scan import (ScanSetup, close_publisher, close_run_engine, document_publisher,
                                       make_run_engine)
    from sparkmpi.bluesky.tiled import TiledResults

    topic = f"bs-{uuid.uuid4().hex[:8]}"
    results = TiledResults(tiled_server.uri, tiled_server.api_key)
    pipeline = BlueskyPipeline(spark, broker.bootstrap, topic, tmp_path / "out", iterations=3, final_iterations=5,
                               checkpoint_frames=8, tiled=results, world=world)
    publisher = document_publisher(broker.bootstrap, topic)
    engines = [make_run_engine(), make_run_engine()]
    uids = []
    try:
        pipeline.start()

        def scan(RE, setup):
            RE.subscribe(publisher)
            uids.extend(RE(setup.plan()))

        setups = [ScanSetup.fermat(24, frame_size=16, exposure=0.01),
                  ScanSetup.fermat(30, frame_size=16, exposure=0.01, write_hdf5=True, directory=tmp_path / "h5")]
        threads = [threading.Thread(target=scan, args=(RE, s)) for RE, s in zip(engines, setups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        pipeline.run(until=lambda: pipeline.done(uids), timeout=90)
        assert len(uids) == 2
        tiled_server.stop()                              # Tiled goes down; the next scan still streams
        uids.extend(engines[0](ScanSetup.fermat(20, frame_size=16, exposure=0.0, write_hdf5=True,
                                                directory=tmp_path / "h5b").plan()))
        pipeline.run(until=lambda: pipeline.done(uids), timeout=90)
        live = pipeline.live
        assert live.tiled_errors and f"Tiled at {tiled_server.uri}" in live.tiled_errors[0], live.tiled_errors
        kept = len(results.pending)
        assert kept >= 1 and results.pending[-1][0] == "final"                          # kept, not lost
        # no write stalled the reconstruction (Tiled's client alone retries ~25 s against a dead server)
        assert max(live.tiled_s) < 8, live.tiled_s
        tiled_server.port = int(tiled_server.uri.rsplit(":", 1)[1])
        tiled_server.start()                             # back up: the pipeline sends the kept writes itself
        pipeline.run(until=lambda: not results.pending, timeout=30)
    finally:
        pipeline.close()
        results.close()
        close_publisher(publisher)
        for RE in engines:
            close_run_engine(RE)
    counts = {u: live.scans[u].frames for u in uids}
    assert counts == {uids[0]: 24, uids[1]: 30, uids[2]: 20} or sorted(counts.values()) == [20, 24, 30]
    assert all(live.scans[u].final and live.scans[u].object is not None for u in uids)
    assert not np.allclose(np.abs(live.scans[uids[0]].object[:10, :10]),
                           np.abs(live.scans[uids[2]].object[:10, :10]))   # one reconstruction per scan
    client = tiled_server.client()
    try:
        assert set(uids) <= set(client)
        assert client[uids[2]].metadata["final"] is True
        with dask.config.set(scheduler="synchronous"):
            np.testing.assert_allclose(client[uids[2]]["object"].read(), live.scans[uids[2]].object, rtol=1e-6)
    finally:
        client.context.close()
    assert pipeline.bridge.dead_letters == {}


def test_pipeline_restarted_mid_scan_rebuilds_the_open_scan_from_its_frames(spark, broker, world, tmp_path):
    from bluesky_fixtures import RunDocs, geometry_md, publish
    from sparkmpi.bluesky.live import BlueskyPipeline
    from sparkmpi.stream._output import list_outputs

    topic = f"bs-{uuid.uuid4().hex[:8]}"
    # 1.5 motor units per object pixel: all 16 points of the fixture's line fall inside the object
    done, run = RunDocs(6), RunDocs(16, md=geometry_md(16, pixel_size=1.5, planned=False))
    docs = run.all()                                    # start, descriptor, 16 events, stop
    publish(broker.bootstrap, topic, done.all() + docs[:14])   # a finished scan; 12 events of the next
    options = dict(iterations=2, final_iterations=3, checkpoint_frames=4, world=world)
    first = BlueskyPipeline(spark, broker.bootstrap, topic, tmp_path / "out", **options)
    try:
        first.start()
        first.run(until=lambda: first.done([done.uid]) and first.live.scan(run.uid).frames == 12, timeout=60)
    finally:
        first.close()
    assert first.live.scans[run.uid].checkpoints == 3 and not first.live.scans[run.uid].final
    publish(broker.bootstrap, topic, docs[14:])         # the scan goes on while no pipeline runs
    second = BlueskyPipeline(spark, broker.bootstrap, topic, tmp_path / "out", **options)   # same group, outputs
    try:
        second.start()
        res = second.live.scans[run.uid]
        assert res.rebuilt_frames == 12 and res.published == 3 and second.live.scans[done.uid].final
        second.run(until=lambda: second.done([run.uid]), timeout=60)
    finally:
        second.close()
    # the final reconstruction used every frame of the scan, the 12 before the restart included
    assert res.final and res.frames == 16 and list(res.sorted_indices()) == list(range(16))
    assert res.quality[-1]["final"] and res.quality[-1]["frames_used"] == 16
    # no output twice: each checkpoint's quality document and each scan's final once, each frame in one batch
    quality = [(q["checkpoint"], q["frames_used"]) for q in read_topic(broker.bootstrap, f"{topic}.quality")
               if q["scan"] == run.uid]
    assert quality == [(1, 4), (2, 8), (3, 12), (4, 16), (None, 16)], quality
    finals = [q for q in read_topic(broker.bootstrap, f"{topic}.quality") if q["scan"] == done.uid and q["final"]]
    assert len(finals) == 1
    indices = []
    for _, path in list_outputs(tmp_path / "out" / "stream"):
        with np.load(path) as batch:
            if "result.scan" in batch.files:
                indices += [int(i) for s, i in zip(batch["result.scan"], batch["result.index"]) if s == run.uid]
    assert sorted(indices) == list(range(16))
    assert second.bridge.dead_letters == {}
