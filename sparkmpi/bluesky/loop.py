"""One scan through the whole loop: RunEngine -> Kafka -> sparkmpi -> quality -> feedback -> RunEngine.

:func:`run_scan_loop` is what ``sparkmpi bench bluesky`` and ``sparkmpi demo
--bluesky`` run: the RunEngine (bluesky, ophyd simulated devices) in a thread
of this process, the live pipeline (:class:`~.live.BlueskyPipeline`) in the
calling thread, on a broker and (optionally) a Tiled server the caller gives.
"""

from __future__ import annotations

import logging
import threading
import uuid

import numpy as np

from .feedback import ConvergenceRule

__all__ = ["run_scan_loop"]

log = logging.getLogger("sparkmpi.bluesky.loop")


def run_scan_loop(spark, bootstrap: str, out_dir, *, points: int = 512, frame_size: int = 64,
                  overlap: float = 0.7, exposure: float = 0.02, feedback: bool = True,
                  rule: ConvergenceRule | None = None, ranks: int = 2, trigger: float = 0.1, iterations: int = 5,
                  final_iterations: int = 30, checkpoint_frames: int = 32, tiled=None, write_hdf5: bool = False, docs_topic: str | None = None,
                  timeout: float = 300.0, setup=None, world=None) -> dict:
    """Run one Fermat scan with the live reconstruction (and the feedback agent when ``feedback``).

    Returns a dict: ``uid``, ``points_planned``, ``points_measured`` (events),
    ``points_used`` (frames in the final reconstruction), ``exit_status``,
    ``stopped_early``, ``decision`` (the stop decision, or None),
    ``decision_latency_s`` (the triggering event's time to the stop
    document's), ``object``/``probe``/``errors`` (final), ``positions`` (used,
    object pixels), ``quality`` (the quality documents), ``scene``.
    """
    from .live import BlueskyPipeline
    from .scan import (FeedbackAgent, ScanSetup, close_publisher, close_run_engine, document_publisher,
                       make_run_engine)

    docs_topic = docs_topic or f"bluesky-{uuid.uuid4().hex[:8]}"
    setup = setup or ScanSetup.fermat(points, frame_size=frame_size, overlap=overlap, exposure=exposure,
                                      write_hdf5=write_hdf5, directory=f"{out_dir}/hdf5")
    publisher = document_publisher(bootstrap, docs_topic)
    agent = FeedbackAgent(bootstrap, docs_topic, rule, enabled=feedback)
    RE = make_run_engine()
    docs: dict[str, list] = {}
    RE.subscribe(lambda name, doc: docs.setdefault(name, []).append(doc))
    RE.subscribe(publisher)
    RE.subscribe(agent)
    scene = setup.scene
    pipeline = BlueskyPipeline(spark, bootstrap, docs_topic, out_dir, ranks=ranks, trigger=trigger,
                               iterations=iterations, final_iterations=final_iterations,
                               checkpoint_frames=checkpoint_frames, tiled=tiled, world=world)
    outcome: dict = {}
    try:
        pipeline.start()
        pipeline.driver.start()
        pipeline.driver.warm_up()

        def scan():
            try:
                outcome["uids"] = RE(setup.plan(per_step=agent.per_step))
            except BaseException as exc:  # noqa: BLE001  (reported by the caller's thread)
                outcome["error"] = exc

        thread = threading.Thread(target=scan, name="sparkmpi-runengine", daemon=True)
        start_seen = threading.Event()
        RE.subscribe(lambda name, doc: start_seen.set() if name == "start" else None)
        thread.start()
        start_seen.wait(30)
        uid = docs["start"][0]["uid"] if docs.get("start") else None
        if uid is None:
            thread.join(5)
            raise RuntimeError(f"the RunEngine did not start the scan: {outcome.get('error')!r}")
        pipeline.live_truth(uid, scene.object_true, scene.probe_true)
        pipeline.run(until=lambda: pipeline.done([uid]) or "error" in outcome, timeout=timeout)
        thread.join(30)
        if "error" in outcome:
            raise outcome["error"]
    finally:
        pipeline.close()
        agent.close()
        close_publisher(publisher)
        close_run_engine(RE)
        import gc

        gc.collect()   # the Kafka clients the RunEngine's callbacks held, and their sockets
    stop = docs["stop"][0]
    res = pipeline.live.scans[uid]
    decision = next((d for d in agent.decisions if d.action == "stop" and d.scan == uid), None)
    latency = None
    if decision is not None and decision.trigger_event_time is not None:
        latency = float(stop["time"] - decision.trigger_event_time)
    events = len(docs.get("event", []))
    return {"uid": uid, "points_planned": int(len(setup.planned)), "points_measured": events,
            "points_used": res.frames, "exit_status": stop.get("exit_status"), "stopped_early": decision is not None,
            "decision": None if decision is None else decision.to_json(), "decision_latency_s": latency,
            "object": res.object, "probe": res.probe, "errors": res.errors, "positions": res.all_positions(),
            "quality": res.quality, "scene": scene, "extra_points": agent.extra_measured,
            "dead_letters": dict(pipeline.bridge.dead_letters), "tiled_errors": list(pipeline.live.tiled_errors),
            "refine_p50_s": float(np.median(pipeline.live.refine_s)) if pipeline.live.refine_s else None}
