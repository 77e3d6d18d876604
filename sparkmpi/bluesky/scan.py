"""The scan side: a RunEngine running a Fermat spiral over two motors, documents to Kafka, feedback back.

::

    from bluesky import RunEngine
    from sparkmpi.bluesky.scan import ScanSetup, document_publisher, FeedbackAgent

    setup = ScanSetup.fermat(points=512, frame_size=64)          # scene, motors, detector, plan arguments
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(document_publisher(bootstrap, "bluesky.documents"))
    agent = FeedbackAgent(bootstrap, "bluesky.documents")        # reads <docs>.quality, writes <docs>.decisions
    RE.subscribe(agent)
    RE(setup.plan(per_step=agent.per_step))

Documents go to Kafka with bluesky-kafka's ``Publisher`` (msgpack, NumPy
arrays inline, key = the beamline name so one partition keeps their order).

The feedback agent is a RunEngine callback plus the plan's ``per_step``: at
every point it reads the quality documents that arrived (non-blocking), runs
them through :class:`~.feedback.FeedbackState`, publishes each decision to
``<docs>.decisions`` and logs it; after a stop decision the remaining points
of the spiral are passed over without moving or triggering, so the run ends
at once with exit status ``success`` and the points it measured; extra
points are measured before the next planned one.  (bluesky-adaptive 1.0's
agents drive their own optimisation plans through the queue server; ending
a ``spiral_fermat`` early from a quality stream is a per-step check, so the
agent is this callback; see the README.)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument
from .devices import PtychoDetector, PtychoScene, make_motors
from .feedback import ConvergenceRule, Decision, FeedbackState

__all__ = ["make_run_engine", "close_run_engine", "ScanSetup", "fermat_points", "dr_for_points", "scan_metadata", "document_publisher", "FeedbackAgent",
           "quality_topic_for", "decisions_topic_for"]

log = logging.getLogger("sparkmpi.bluesky.feedback")


def make_run_engine(md: dict | None = None):
    """A RunEngine for any thread (no SIGINT handler); close it with :func:`close_run_engine`."""
    from bluesky import RunEngine

    return RunEngine(dict(md or {}), context_managers=[])


def close_run_engine(RE) -> None:
    """Stop the RunEngine's event-loop thread (bluesky starts one per RunEngine and never stops it)."""
    dispatcher = getattr(RE, "dispatcher", None)
    if dispatcher is not None:   # let go of the callbacks (publishers hold Kafka clients)
        dispatcher.unsubscribe_all()
    loop = RE.loop
    thread = getattr(RE, "_th", None)
    if loop.is_running():
        import asyncio

        try:   # the loop's default executor (ophyd status callbacks run there) has threads of its own
            asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(timeout=5)
        except Exception as exc:  # a loop already stopping: nothing to wait for
            log.debug("RunEngine executor shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout=5)
    if not loop.is_running():
        loop.close()


def quality_topic_for(docs_topic: str) -> str:
    return f"{docs_topic}.quality"


def decisions_topic_for(docs_topic: str) -> str:
    return f"{docs_topic}.decisions"


def fermat_points(x_range: float, y_range: float, dr: float, factor: float = 1.0, x_start=0.0,
                  y_start=0.0) -> np.ndarray:
    """The points of ``bluesky.plans.spiral_fermat`` with these arguments, in order, as (n, 2) ``[y, x]``."""
    from bluesky.plan_patterns import spiral_fermat

    class _Axis:   # a cycler key: the pattern only needs something hashable with a name
        def __init__(self, name):
            self.name = name

    x, y = _Axis("x"), _Axis("y")
    points = list(spiral_fermat(x, y, x_start, y_start, x_range, y_range, dr, factor))
    return np.asarray([[p[y], p[x]] for p in points], dtype=np.float64).reshape(-1, 2)


def dr_for_points(points: int, x_range: float, y_range: float, factor: float = 1.0) -> float:
    """The ``dr`` that gives ``spiral_fermat`` about ``points`` points over the range (bisection)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise InvalidArgument(f"points: expected an integer >= 2, got {points!r}")
    # the count goes as (range / dr)^2: start from that guess, bisect in a bracket around it
    guess = math.sqrt(x_range * y_range / (math.pi * 0.8 * points)) * factor
    lo, hi = guess / 2, guess * 2
    for _ in range(24):
        mid = math.sqrt(lo * hi)
        n = len(fermat_points(x_range, y_range, mid, factor))
        if n == points:
            return mid
        if n > points:
            lo = mid
        else:
            hi = mid
    return hi


def scan_metadata(scene: PtychoScene, planned: np.ndarray, *, x_motor: str, y_motor: str, image_key: str) -> dict:
    """The start document's ``ptycho`` geometry (read by :class:`sparkmpi.stream.bluesky_docs.DocumentStream`)."""
    return {"pixel_size": scene.pixel_size, "origin": list(scene.origin), "object_shape": list(scene.object_shape),
            "x_motor": x_motor, "y_motor": y_motor, "image_key": image_key, "probe_diameter": scene.probe_diameter,
            "units": "um", "planned_positions": np.asarray(planned, np.float64).tolist()}


@dataclass
class ScanSetup:
    """Everything one Fermat scan needs: the scene, two motors, the detector and the plan's arguments."""

    scene: PtychoScene
    x_motor: object
    y_motor: object
    detector: object
    x_range: float
    y_range: float
    dr: float
    factor: float = 1.0
    md: dict = field(default_factory=dict)

    @classmethod
    def fermat(cls, points: int = 512, *, frame_size: int = 64, overlap: float = 0.7, pixel_size: float = 0.1,
               exposure: float = 0.0, write_hdf5: bool = False, directory=None, lose_frames=(),
               detector_name: str = "ptycho_det",
               md: dict | None = None) -> "ScanSetup":
        """A square Fermat scan of about ``points`` points whose neighbour step is ``(1 - overlap)`` probe diameters."""
        if not 0 <= overlap < 1:
            raise InvalidArgument(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
        diameter = 0.375 * int(frame_size)
        step = max(diameter * (1 - overlap), 1.0) * pixel_size          # motor units between neighbours
        side = step * math.sqrt(points)                                   # a square holding `points` steps^2
        scene = PtychoScene.for_scan(side, side, pixel_size=pixel_size, frame_size=frame_size)
        x, y = make_motors()
        det = PtychoDetector(scene, x, y, name=detector_name, exposure=exposure, write_hdf5=write_hdf5,
                             directory=directory, lose_frames=lose_frames)
        return cls(scene, x, y, det, side, side, dr_for_points(points, side, side), 1.0, dict(md or {}))

    @property
    def planned(self) -> np.ndarray:
        return fermat_points(self.x_range, self.y_range, self.dr, self.factor)

    def plan(self, per_step=None, md: dict | None = None):
        """``bluesky.plans.spiral_fermat`` over the two motors, with the geometry in the start document."""
        from bluesky.plans import spiral_fermat

        meta = dict(self.md, **(md or {}))
        meta["ptycho"] = scan_metadata(self.scene, self.planned, x_motor=self.x_motor.name,
                                       y_motor=self.y_motor.name, image_key=self.detector.image_key)
        return spiral_fermat([self.detector], self.x_motor, self.y_motor, 0.0, 0.0, self.x_range, self.y_range,
                             self.dr, self.factor, per_step=per_step, md=meta)


def document_publisher(bootstrap: str, topic: str, *, key: str = "sparkmpi-beamline", timeout: float = 10.0):
    """bluesky-kafka's ``Publisher`` for ``topic`` (created with one partition), idempotent, flushed at each stop."""
    from bluesky_kafka import Publisher

    from ..stream.kafka_client import ensure_topic

    ensure_topic(bootstrap, topic, 1, timeout=timeout)
    return Publisher(topic=topic, bootstrap_servers=bootstrap, key=key, flush_on_stop_doc=True,
                     producer_config={"enable.idempotence": True, "linger.ms": 1,
                                      "message.max.bytes": 64 * 1024 * 1024})


def close_publisher(publisher, timeout: float = 10.0) -> None:
    """Flush bluesky-kafka's Publisher and close its Kafka producer (bluesky-kafka never does)."""
    from ..stream.kafka_io import close_client

    publisher.flush()
    producer = getattr(publisher, "_producer", None)
    if producer is not None:
        publisher._producer = None
        close_client(producer, wait=True)


class FeedbackAgent:
    """The RunEngine side of the loop: quality documents in, decisions out (module docstring).

    Subscribe it to the RunEngine (it follows the current run's uid) and pass
    :meth:`per_step` to the plan.
    """

    def __init__(self, bootstrap: str, docs_topic: str, rule: ConvergenceRule | None = None, *,
                 enabled: bool = True, timeout: float = 10.0):
        from confluent_kafka import Consumer, Producer, TopicPartition

        from ..stream.kafka_client import ErrorTrap, client_config, ensure_topic

        self.state = FeedbackState(rule)
        self.enabled = bool(enabled)
        self.quality_topic = quality_topic_for(docs_topic)
        self.decisions_topic = decisions_topic_for(docs_topic)
        ensure_topic(bootstrap, self.quality_topic, 1, timeout=timeout)
        ensure_topic(bootstrap, self.decisions_topic, 1, timeout=timeout)
        self._trap = ErrorTrap()
        self._consumer = Consumer(client_config(bootstrap, self._trap, **{
            "group.id": "sparkmpi-feedback-agent", "enable.auto.commit": False, "fetch.wait.max.ms": 10,
            "isolation.level": "read_committed"}))
        _, high = self._consumer.get_watermark_offsets(TopicPartition(self.quality_topic, 0), timeout=timeout)
        self._consumer.assign([TopicPartition(self.quality_topic, 0, high)])   # only what comes from now on
        self._producer = Producer(client_config(bootstrap, self._trap, **{"linger.ms": 0, "acks": "all"}))
        self.timeout = timeout
        self.run_uid: str | None = None
        self.quality: list[dict] = []
        self.decisions: list[Decision] = []
        self._extra: list[tuple[float, float]] = []
        self.points_skipped = 0
        self.extra_measured = 0

    # -- RunEngine callback: which run is current ----------------------------------
    def __call__(self, name, doc):
        if name == "start":
            self.run_uid = doc["uid"]
            self._extra = []
        elif name == "stop" and doc.get("run_start") == self.run_uid:
            self.poll()
            self.run_uid = None

    # -- quality documents in, decisions out --------------------------------------
    def poll(self) -> list[Decision]:
        """Read the quality documents that have arrived (no wait); decide; publish the decisions."""
        out = []
        if self._consumer is None:   # closed
            return out
        for msg in self._consumer.consume(num_messages=1000, timeout=0):
            if msg.error() is not None:
                continue
            try:
                quality = json.loads(msg.value())
            except ValueError:
                log.warning("feedback: a quality message that is not JSON at offset %s", msg.offset())
                continue
            self.quality.append(quality)
            if not self.enabled:
                continue
            for decision in self.state.observe(quality, time.time()):
                self._publish(decision)
                out.append(decision)
                if decision.action == "extra_points" and decision.scan == self.run_uid:
                    self._extra.extend(decision.positions)
        return out

    def _publish(self, decision: Decision) -> None:
        self.decisions.append(decision)
        log.info("feedback decision for scan %s: %s (%s)", decision.scan, decision.action, decision.reason)
        self._producer.produce(self.decisions_topic, json.dumps(decision.to_json(), default=float).encode(),
                               key=decision.scan.encode())
        self._producer.poll(0)

    def stop_requested(self, uid: str | None = None) -> bool:
        uid = uid or self.run_uid
        return uid is not None and self.state.stopped(uid)

    # -- the plan's per_step ---------------------------------------------------------
    def per_step(self, detectors, step, pos_cache, take_reading=None):
        """``one_nd_step`` unless the run was told to stop; extra points first when asked for."""
        from bluesky.plan_stubs import one_nd_step

        self.poll()
        if self.stop_requested():
            self.points_skipped += 1
            return
        motors = list(step.keys())
        while self._extra:
            y, x = self._extra.pop(0)
            by_name = {m.name: m for m in motors}
            extra = {m: (x if m is by_name.get(self._x_name(motors)) else y) for m in motors}
            self.extra_measured += 1
            yield from one_nd_step(detectors, extra, pos_cache)
        yield from one_nd_step(detectors, step, pos_cache)

    @staticmethod
    def _x_name(motors) -> str:
        return motors[0].name   # spiral_fermat's cycler lists the x motor first

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout)

    def close(self) -> None:
        from ..stream.kafka_io import close_client

        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(self.timeout)
            close_client(producer, wait=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            close_client(consumer, wait=True)
