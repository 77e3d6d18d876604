"""The consuming side: Bluesky frames -> the micro-batch driver -> one live reconstruction per scan uid.

:class:`BlueskyPipeline` wires the pieces::

    documents topic --DocumentBridge--> <docs>.frames --StreamDriver (exactly-once outputs)-->
        bluesky_frames (on the ranks: frames kept per scan uid) --on_batch--> refine_scans (one world call:
        a StreamingReconstruction per scan uid on the ranks) --> quality documents (<docs>.quality),
        snapshots (Tiled, the live viewer's folder) --> at the scan's stop: final object, probe, errors.

The reconstruction advances by checkpoints of ``checkpoint_frames`` frames
(:class:`LiveScans`), so what it holds at each checkpoint, and the quality
document published there, do not depend on how the batches were cut.  A
scan is final once its stop document was translated and the driver has
committed every frame written before it; then its remaining frames are folded
in, it gets ``final_iterations`` more iterations, its final results go to
Tiled, and its state leaves the ranks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, SparkMPIError

__all__ = ["bluesky_frames", "refine_scans", "LiveScans", "BlueskyPipeline", "ScanResult"]

log = logging.getLogger("sparkmpi.bluesky.live")
NEW, RECS = "bluesky.new", "bluesky.rec"


def bluesky_frames(comm, frames, state=None) -> dict:
    """MPI body of each batch: keep the rank's frames in its state, per scan uid; report scan, index, position."""
    scans, indices, positions, times = [], [], [], []
    keep = state.setdefault(NEW, {}) if state is not None else {}
    for frame in frames:
        uid = frame.header.scan_id
        array = np.array(frame.array, dtype=np.float32)
        if not np.isfinite(array).all() or (array < 0).any():
            raise InvalidArgument(f"scan {uid}: frame {frame.header.index} has non-finite or negative values")
        keep.setdefault(uid, []).append((int(frame.header.index), array, frame.header.position))
        scans.append(uid)
        indices.append(int(frame.header.index))
        positions.append(frame.header.position)
        times.append(frame.header.timestamp)
    return {"scan": np.asarray(scans, dtype=str), "index": np.asarray(indices, np.int64),
            "positions": np.asarray(positions, np.float64).reshape(-1, 2),
            "event_time": np.asarray(times, np.float64)}


def _take_frames(comm, pending: list, upto: int | None) -> list:
    """The world's pending frames with index <= ``upto`` (all if None), dealt to rank ``index % size``.

    Which rank read a frame depends on how the batches were cut; dealing them by index makes every
    rank hold the same frames, in the same order, whatever the batches were, so a checkpoint's
    reconstruction does not depend on the load.
    """
    take = [f for f in pending if upto is None or f[0] <= upto]
    pending[:] = [f for f in pending if not (upto is None or f[0] <= upto)]
    size = comm.size
    outgoing = [[] for _ in range(size)]
    for f in take:
        outgoing[f[0] % size].append(f)
    mine = [f for got in comm.alltoall(outgoing) for f in got]
    return sorted(mine, key=lambda f: f[0])


def refine_scans(comm, state, jobs: dict):
    """A world call: for each scan uid in ``jobs``, fold its frames in checkpoint by checkpoint and iterate.

    ``jobs[uid]`` = ``{"object_shape", "frame_shape", "probe", "iterations", "checkpoints", "final",
    "final_iterations"}``.  ``checkpoints`` lists frame indices: for each, the frames up to that index
    are folded in and ``iterations`` iterations run; ``final`` then folds the rest in and runs
    ``final_iterations``.  Returns on rank 0 ``{uid: [(checkpoint index or None for the final, object,
    probe, errors) or None (a rank held no frame yet), ...]}``.
    """
    from ..ptycho.streaming import StreamingReconstruction

    new, recs = state.setdefault(NEW, {}), state.setdefault(RECS, {})
    out = {}
    for uid in sorted(jobs):
        job = jobs[uid]
        rec = recs.get(uid)
        if rec is None:
            rec = recs[uid] = StreamingReconstruction(tuple(job["object_shape"]), tuple(job["frame_shape"]),
                                                      probe=job["probe"], comm=comm, algorithm="dm",
                                                      probe_update_start=job["iterations"])
        pending = new.setdefault(uid, [])
        steps = [(c, job["iterations"]) for c in job["checkpoints"]]
        if job.get("final"):
            steps.append((None, job["final_iterations"]))
        got = []
        for upto, iterations in steps:
            frames = _take_frames(comm, pending, upto)
            if frames:
                arrays = np.stack([a for _, a, _ in frames])
                pos = np.rint(np.asarray([p for _, _, p in frames], np.float64)).astype(np.int64)
                h, w = arrays.shape[1:]
                pos[:, 0] = np.clip(pos[:, 0], 0, job["object_shape"][0] - h)
                pos[:, 1] = np.clip(pos[:, 1], 0, job["object_shape"][1] - w)
                rec.add_frames(arrays, pos)
            if min(comm.allgather(rec.n_frames)) == 0:
                got.append(None)
                continue
            result = rec.iterate(int(iterations))
            got.append((upto, result.object.copy(), result.probe.copy(), np.asarray(result.errors))
                       if comm.rank == 0 else None)
        out[uid] = got
        if job.get("final"):
            recs.pop(uid, None)
            new.pop(uid, None)
    return out if comm.rank == 0 else None


def _restore_frames(comm, state, frames: dict) -> int:
    """A restarted pipeline's frames of the scans still open: the ranks' state of those scans starts
    over from them (rank 0 keeps them; :func:`_take_frames` deals them out by index)."""
    new, recs = state.setdefault(NEW, {}), state.setdefault(RECS, {})
    for uid, kept in frames.items():
        recs.pop(uid, None)
        new[uid] = list(kept) if comm.rank == 0 else []
    return comm.rank


def _published_quality(bootstrap: str, topic: str, timeout: float = 10.0) -> dict:
    """``{uid: (last checkpoint published, final published)}`` from the quality topic."""
    from ..stream.offsets import read_offset_range, watermarks

    (low, high), = watermarks(bootstrap, topic, [0], timeout=timeout).values()
    out: dict = {}
    for record in read_offset_range(bootstrap, topic, 0, low, high, timeout=timeout) if high > low else ():
        try:
            doc = json.loads(record.value)
            uid = str(doc["scan"])
        except (ValueError, KeyError, TypeError):
            continue
        last, final = out.get(uid, (0, False))
        if doc.get("final"):
            final = True
        elif isinstance(doc.get("checkpoint"), int):
            last = max(last, doc["checkpoint"])
        out[uid] = (last, final)
    return out


def _warm_engine(comm, state):
    from ..ptycho.streaming import StreamingReconstruction

    rec = StreamingReconstruction((40, 40), (32, 32), comm=comm, algorithm="dm")
    rec.add_frames(np.ones((2, 32, 32), np.float32), np.zeros((2, 2), np.int64))
    rec.iterate(2)
    return comm.rank


@dataclass
class ScanResult:
    """What the pipeline knows about one scan."""

    uid: str
    positions: list = field(default_factory=list)        # (n, 2) arrays, object pixels, per batch
    indices: list = field(default_factory=list)          # frame indices (seq_num - 1), per batch
    event_times: list = field(default_factory=list)
    checkpoint_errors: list = field(default_factory=list)   # the last Fourier error at each checkpoint
    checkpoints: int = 0                                 # checkpoints folded into the reconstruction
    quality: list = field(default_factory=list)
    object: np.ndarray | None = None
    probe: np.ndarray | None = None
    errors: np.ndarray | None = None
    final: bool = False
    exit_status: str | None = None
    closed_at: int | None = None                         # frames-topic offset once its stop was translated
    published: int = 0          # checkpoints a previous run of the pipeline already published (rebuilt silently)
    rebuilt_frames: int = 0     # frames read back from the frames topic when the pipeline restarted

    @property
    def frames(self) -> int:
        return int(sum(len(p) for p in self.positions))

    def _order(self):
        index = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        return index, np.argsort(index, kind="stable")

    def sorted_indices(self) -> np.ndarray:
        index, order = self._order()
        return index[order]

    def all_positions(self) -> np.ndarray:
        """Every frame's position (n, 2), in frame-index order."""
        if not self.positions:
            return np.zeros((0, 2))
        return np.concatenate(self.positions)[self._order()[1]]

    def all_event_times(self) -> np.ndarray:
        if not self.event_times:
            return np.zeros(0)
        return np.concatenate(self.event_times)[self._order()[1]]


class LiveScans:
    """Driver side: after each batch, fold each scan's completed checkpoints in; quality, snapshots, finals.

    The reconstruction advances by **checkpoints**, not by batches: every
    ``checkpoint_frames`` frames of a scan (in frame-index order) are folded in
    and get ``iterations`` iterations, however the batches were cut, and one
    quality document is published per checkpoint.  How many batches a scan
    was cut into depends on how fast the consumer keeps up; what the
    reconstruction (and so the stop rule) sees at the k-th checkpoint does not.
    """

    def __init__(self, world, bridge, *, iterations: int = 5, final_iterations: int = 30,
                 checkpoint_frames: int = 32, quality_producer=None, quality_topic: str | None = None, tiled=None,
                 live_dir=None, truth=None, tiled_retry_every: float = 2.0):
        for name, value in (("iterations", iterations), ("final_iterations", final_iterations),
                            ("checkpoint_frames", checkpoint_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name}: expected an integer >= 1, got {value!r}")
        self.world, self.bridge = world, bridge
        self.iterations, self.final_iterations = iterations, final_iterations
        self.checkpoint_frames = checkpoint_frames
        self.quality_producer, self.quality_topic = quality_producer, quality_topic
        self.tiled, self.live_dir = tiled, Path(live_dir) if live_dir is not None else None
        if isinstance(tiled_retry_every, bool) or not isinstance(tiled_retry_every, (int, float)) \
                or not tiled_retry_every > 0:
            raise InvalidArgument(f"tiled_retry_every: expected seconds > 0, got {tiled_retry_every!r}")
        self.tiled_retry_every = float(tiled_retry_every)
        self.truth = truth or {}          # uid -> (object_true, probe_true), when known
        self.scans: dict[str, ScanResult] = {}
        self.batches = 0
        self.committed = 0
        self.tiled_errors: list[str] = []
        self.tiled_s: list[float] = []    # seconds each call to Tiled took (writes, retries of kept ones)
        self._tiled_retry_at = 0.0
        self.refine_s: list[float] = []

    def scan(self, uid: str) -> ScanResult:
        if uid not in self.scans:
            self.scans[uid] = ScanResult(uid)
        return self.scans[uid]

    def note_closed(self, uid: str, exit_status: str, frames_offset: int) -> None:
        res = self.scan(uid)
        res.exit_status, res.closed_at = exit_status, frames_offset

    def _geometry(self, uid):
        with self.bridge.lock:
            return self.bridge.state.scans.get(uid)

    def _probe0(self, geo):
        from ..ptycho.simulate import make_probe

        h, w = geo.frame_shape
        diameter = float(geo.probe_diameter or 0.375 * min(h, w))
        return make_probe((h, w), kind="aperture", diameter=diameter)

    def on_batch(self, report) -> None:
        """The driver's ``on_batch``: record the batch's frames per scan, fold completed checkpoints in."""
        self.batches += 1
        self.committed = max(self.committed, max((r["end"] for r in report.ranges), default=0))
        touched = set()
        with np.load(report.path) as batch:
            if "result.scan" in batch.files and batch["result.scan"].size:
                scans, index = batch["result.scan"], batch["result.index"]
                pos, times = batch["result.positions"], batch["result.event_time"]
                for uid in np.unique(scans):
                    sel = scans == uid
                    res = self.scan(str(uid))
                    res.positions.append(pos[sel])
                    res.indices.append(index[sel])
                    res.event_times.append(times[sel])
                    touched.add(str(uid))
        self.refine(touched | self._finishing())

    def _finishing(self) -> set:
        return {u for u, r in self.scans.items() if not r.final and r.closed_at is not None
                and self.committed >= r.closed_at}

    def refine(self, uids) -> None:
        jobs, frame_counts = {}, {}
        finishing = self._finishing()
        k = self.checkpoint_frames
        for uid in uids:
            res, geo = self.scan(uid), self._geometry(uid)
            if geo is None or geo.frame_shape is None or res.final:
                continue
            final = uid in finishing
            if res.frames == 0 and final:
                res.final = True
                continue
            index = res.sorted_indices()
            counts = list(range((res.checkpoints + 1) * k, res.frames + 1, k))
            if not counts and not final:
                continue
            frame_counts[uid] = counts + ([res.frames] if final else [])
            jobs[uid] = {"object_shape": geo.object_shape, "frame_shape": geo.frame_shape,
                         "probe": self._probe0(geo), "final": final, "iterations": self.iterations,
                         "final_iterations": self.final_iterations,
                         "checkpoints": [int(index[c - 1]) for c in counts]}
        if not jobs:
            return
        t0 = time.perf_counter()
        out = self.world.call(refine_scans, jobs)[0]
        self.refine_s.append(time.perf_counter() - t0)
        for uid, steps in out.items():
            res = self.scan(uid)
            final = jobs[uid]["final"]
            last = None
            for i, (frames, got) in enumerate(zip(frame_counts[uid], steps)):
                is_final = final and i == len(steps) - 1
                if not is_final:
                    res.checkpoints += 1
                if got is None:
                    continue
                _, res.object, res.probe, res.errors = got
                res.checkpoint_errors.append(float(res.errors[-1]))
                quality = self._quality(uid, res, frames, final=is_final)
                res.quality.append(quality)
                if not is_final and res.checkpoints <= res.published:
                    continue   # rebuilt after a restart: this checkpoint's outputs went out before it
                self._publish_quality(quality)
                last = quality
            if final:
                res.final = True
            if last is not None:
                self._write_results(uid, res, last)

    def _quality(self, uid, res: ScanResult, frames: int, *, final: bool) -> dict:
        """The quality document of the reconstruction of the scan's first ``frames`` frames."""
        from .quality import coverage, measured_nrmse, missing_points, quality_document

        geo = self._geometry(uid)
        used = res.all_positions()[:frames]
        diameter = float(geo.probe_diameter or 0.375 * min(geo.frame_shape))
        planned = geo.planned_positions
        cov = coverage(used, planned, geo.object_shape, geo.frame_shape, diameter) if planned is not None else 0.0
        nrmse = None
        truth = self.truth.get(uid)
        if truth is not None:
            nrmse = measured_nrmse(res.object, truth[0], truth[1], used)
        times = res.all_event_times()[:frames]
        missing = ()
        if planned is not None and len(used):
            # planned points the scan has passed (by the nearest planned index of the last frame) without a frame
            last = used[-1]
            passed = int(np.argmin(((planned - last) ** 2).sum(axis=1))) + 1
            holes = missing_points(used, planned, passed)
            missing = [(geo.origin[0] + r * geo.pixel_size, geo.origin[1] + c * geo.pixel_size) for r, c in holes]
        return quality_document(scan=uid, batch=self.batches, checkpoint=None if final else res.checkpoints,
                                checkpoint_frames=self.checkpoint_frames, frames_used=frames,
                                points_planned=geo.points_planned, coverage_value=cov, errors=res.checkpoint_errors,
                                nrmse=nrmse, last_event_time=float(times.max()) if times.size else None,
                                now=time.time(), missing_positions=missing)

    def _publish_quality(self, quality: dict) -> None:
        if self.quality_producer is None:
            return
        self.quality_producer.produce(self.quality_topic, json.dumps(quality, default=float).encode(),
                                      key=quality["scan"].encode())
        self.quality_producer.flush(5.0)

    def _write_results(self, uid, res: ScanResult, quality: dict) -> None:
        if self.live_dir is not None:
            from ..viz import publish_snapshot

            publish_snapshot(self.live_dir / uid, {"object": res.object, "probe": res.probe, "errors": res.errors},
                             {"frames": res.frames, "scan": uid, "nrmse": quality.get("nrmse")})
        if self.tiled is None:
            return
        geo = self._geometry(uid)
        t0 = time.monotonic()
        try:
            if res.final:
                self.tiled.write_final(uid, res.object, res.probe, res.errors, quality, geo, res.exit_status)
            else:
                self.tiled.write_snapshot(uid, len(res.quality), res.object, quality, geo)
        except SparkMPIError as exc:
            self.tiled_errors.append(str(exc))
            log.warning("%s", exc)
        finally:
            self.tiled_s.append(time.monotonic() - t0)
            self._tiled_retry_at = time.monotonic() + self.tiled_retry_every

    def retry_tiled(self, *, force: bool = False) -> bool:
        """Send the Tiled writes kept while the server was down (at most every ``tiled_retry_every`` s
        unless ``force``); True when none is left.  Called between batches, so a scan that wrote its
        last result while Tiled was down still reaches it once the server is back."""
        if self.tiled is None or not self.tiled.pending:
            return True
        if not force and time.monotonic() < self._tiled_retry_at:
            return False
        t0 = time.monotonic()
        try:
            self.tiled.flush_pending()
        except SparkMPIError as exc:
            log.debug("Tiled still down: %s", exc)
        finally:
            self.tiled_s.append(time.monotonic() - t0)
            self._tiled_retry_at = time.monotonic() + self.tiled_retry_every
        return not self.tiled.pending


class BlueskyPipeline:
    """Bridge + driver + live reconstruction for a documents topic; ``run(until=...)`` drives it.

    Parameters
    ----------
    spark : SparkSession
    bootstrap : str
    docs_topic : str
    out_dir : path
        The driver's outputs (``stream/``) and the live snapshots (``live/<uid>/``).
    ranks, trigger, iterations, final_iterations, checkpoint_frames : see :class:`LiveScans`,
        :class:`StreamDriver` (``iterations`` per checkpoint of ``checkpoint_frames`` frames)
    tiled : TiledResults, optional
    truth : dict, optional
        ``{uid: (object_true, probe_true)}`` for the NRMSE in the quality documents (simulations).
    """

    def __init__(self, spark, bootstrap: str, docs_topic: str, out_dir, *, ranks: int = 2, trigger: float = 0.1,
                 iterations: int = 5, final_iterations: int = 30, checkpoint_frames: int = 32, tiled=None,
                 truth=None, group: str | None = None, world=None, progress=None):
        from confluent_kafka import Producer

        from ..stream.bluesky_bridge import DocumentBridge
        from ..stream.kafka_client import client_config, ensure_topic
        from .scan import quality_topic_for

        self.spark, self.bootstrap, self.docs_topic = spark, bootstrap, docs_topic
        self.out_dir = Path(out_dir)
        self.ranks, self.trigger = ranks, trigger
        self.group = group or f"sparkmpi-bluesky-{docs_topic}"
        self.quality_topic = quality_topic_for(docs_topic)
        ensure_topic(bootstrap, self.quality_topic, 1)
        self._world, self._own_world = world, world is None
        self.progress = progress
        self.bridge = DocumentBridge(bootstrap, docs_topic, on_action=self._on_action)
        self._producer = Producer(client_config(bootstrap, **{"linger.ms": 0, "acks": "all"}))
        self.live_kwargs = dict(iterations=iterations, final_iterations=final_iterations,
                                checkpoint_frames=checkpoint_frames, tiled=tiled,
                                truth=truth, quality_topic=self.quality_topic,
                                live_dir=self.out_dir / "live")
        self.live: LiveScans | None = None
        self.report = None
        self._stop = threading.Event()

    def _on_action(self, action) -> None:
        from ..stream.bluesky_docs import ScanClosed

        if isinstance(action, ScanClosed) and self.live is not None:
            self.live.note_closed(action.uid, action.exit_status, self.bridge.frames_high)

    def start(self) -> "BlueskyPipeline":
        import sparkmpi

        if self._world is None:
            self._world = sparkmpi.World(self.spark, ranks=self.ranks, preload=("sparkmpi.ptycho.streaming",))
        self.live = LiveScans(self._world, self.bridge, quality_producer=self._producer, **self.live_kwargs)
        self._world.call(_warm_engine)   # compile the engine's kernels before the first frame
        self.bridge.start()
        # scans the replay found closed are finished once their frames are committed
        for uid, closed in self.bridge.state.closed.items():
            self.live.note_closed(uid, closed.exit_status, self.bridge.frames_high)
        self.bridge.run_in_thread()
        from ..stream.driver import StreamDriver

        self.driver = StreamDriver(self.spark, self.bootstrap, self.bridge.frames_topic, self.group,
                                   self.out_dir / "stream", ranks=self.ranks, trigger=self.trigger,
                                   process=bluesky_frames, progress=self.progress, world=self._world)
        self.driver.start()   # reconciled: its committed offset is what the rebuild reads up to
        self._rebuild_open_scans()
        return self

    def _rebuild_open_scans(self) -> None:
        """After a restart: every scan not yet final gets its reconstruction back from its frames.

        The frames before the driver's committed offset were processed by the previous run of the
        pipeline, and the driver does not read them again; so each such scan's frames are read back
        from the frames topic (from its first frame, found by :meth:`DocumentBridge.first_frame_offset`),
        handed to the ranks, and folded in again checkpoint by checkpoint.  The checkpoints whose
        quality documents are already in ``<docs>.quality`` are rebuilt silently (no quality document,
        snapshot or Tiled write again); a scan whose final document is there is left final.
        """
        from ..stream.frames import FrameError, decode_message
        from ..stream.offsets import read_offset_range

        committed = self.driver.committed.get((self.bridge.frames_topic, 0))
        if not committed:
            return
        published = _published_quality(self.bootstrap, self.quality_topic)
        with self.bridge.lock:
            uids = sorted(self.bridge.state.scans)
        reopen = []
        for uid in uids:
            last, final = published.get(uid, (0, False))
            res = self.live.scan(uid)
            if final:
                res.final = True
            else:
                res.published = last
                reopen.append(uid)
        if not reopen:
            return
        first = min(self.bridge.first_frame_offset(uid, committed) for uid in reopen)
        kept: dict = {uid: [] for uid in reopen}
        meta: dict = {uid: [] for uid in reopen}
        for record in read_offset_range(self.bootstrap, self.bridge.frames_topic, 0, first, committed,
                                        timeout=self.bridge.timeout):
            try:
                decoded = decode_message(record.value)
            except (FrameError, ValueError):
                continue   # the driver dead-lettered it the first time
            if not isinstance(decoded, tuple):
                continue
            header, array = decoded
            if header.scan_id not in kept:
                continue
            array = np.array(array, dtype=np.float32)
            if not np.isfinite(array).all() or (array < 0).any():
                continue
            kept[header.scan_id].append((int(header.index), array, header.position))
            meta[header.scan_id].append((int(header.index), header.position, header.timestamp))
        for uid in reopen:
            res = self.live.scan(uid)
            if meta[uid]:
                res.indices.append(np.asarray([m[0] for m in meta[uid]], np.int64))
                res.positions.append(np.asarray([m[1] for m in meta[uid]], np.float64).reshape(-1, 2))
                res.event_times.append(np.asarray([m[2] for m in meta[uid]], np.float64))
            res.rebuilt_frames = len(meta[uid])
        self._world.call(_restore_frames, kept)
        self.live.committed = max(self.live.committed, committed)
        log.info("restart: rebuilt %s from %s frames read back from %s [%d, %d)", reopen,
                 [len(meta[u]) for u in reopen], self.bridge.frames_topic, first, committed)
        self.live.refine(set(reopen))

    def live_truth(self, uid: str, object_true, probe_true) -> None:
        """Ground truth of a simulated scan: its quality documents then carry the NRMSE."""
        self.live.truth[uid] = (np.asarray(object_true), np.asarray(probe_true))

    def done(self, uids) -> bool:
        return all(u in self.live.scans and self.live.scans[u].final for u in uids)

    def run(self, until=None, *, idle_timeout: float | None = None, timeout: float = 300.0):
        """Run the driver until ``until()`` (and nothing pending), the bridge fails, or ``timeout`` s."""
        t_end = time.monotonic() + timeout

        def stop():
            if self.bridge.error is not None:
                raise self.bridge.error
            if time.monotonic() > t_end:
                raise TimeoutError(f"the Bluesky pipeline did not finish within {timeout:.0f} s")
            if self.live is not None:
                self.live.committed = max([self.live.committed] + [o for o in self.driver.committed.values()
                                                                   if o is not None])
                # a closed scan whose frames are all committed gets its final refinement between batches
                finishing = self.live._finishing()
                if finishing:
                    self.live.refine(finishing)
                self.live.retry_tiled()
            return self._stop.is_set() or (until is not None and until())

        self.report = self.driver.run(until=stop, idle_timeout=idle_timeout, on_batch=self.live.on_batch)
        return self.report

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.live is not None:
            self.live.retry_tiled(force=True)   # one last try; what is still kept stays in tiled.pending
        self.bridge.close()
        from ..stream.kafka_io import close_client

        producer, self._producer = self._producer, None
        if producer is not None:   # closed, not left to the collector: the pipeline sits in reference cycles
            producer.flush(5.0)
            close_client(producer, wait=True)
        if self.live is not None:
            self.live.quality_producer = None
        if self._world is not None and self._own_world:
            self._world.close("the Bluesky pipeline ended")
            self._world = None
        # librdkafka clients caught in reference cycles (callbacks that point back at their owners)
        # keep their broker sockets until the collector runs
        import gc

        gc.collect()
