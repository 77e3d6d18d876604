"""Bluesky documents for the tests, composed with event-model (the RunEngine's own document factory)."""

from __future__ import annotations

import time

import numpy as np

FRAME = (16, 16)
OBJECT = (40, 40)


def geometry_md(points: int = 6, *, pixel_size: float = 0.5, planned=True) -> dict:
    md = {"pixel_size": pixel_size, "origin": [0.0, 0.0], "object_shape": list(OBJECT), "x_motor": "x",
          "y_motor": "y", "image_key": "det_image", "probe_diameter": 6.0}
    if planned:
        md["planned_positions"] = [[pixel_size * 2 * i, pixel_size * 3 * i] for i in range(points)]
    return md


class RunDocs:
    """One run's documents, in the order a RunEngine emits them."""

    def __init__(self, points: int = 6, *, external: bool = False, md: dict | None = None, resource_root="/nowhere"):
        from event_model import compose_run

        self.points = points
        self.bundle = compose_run(metadata={"plan_name": "spiral_fermat",
                                            "ptycho": geometry_md(points) if md is None else md})
        self.start = self.bundle.start_doc
        self.uid = self.start["uid"]
        self.external = external
        key = {"source": "SIM", "dtype": "array", "shape": list(FRAME), "dtype_numpy": "<f4"}
        if external:
            key["external"] = "FILESTORE:"
        keys = {"det_image": key, "x": {"source": "SIM", "dtype": "number", "shape": []},
                "y": {"source": "SIM", "dtype": "number", "shape": []}}
        self.desc_bundle = self.bundle.compose_descriptor(name="primary", data_keys=keys)
        self.descriptor = self.desc_bundle.descriptor_doc
        self.resource = None
        if external:
            self.res_bundle = self.bundle.compose_resource(spec="AD_HDF5", root=str(resource_root),
                                                           resource_path="frames.h5",
                                                           resource_kwargs={"frame_per_point": 1})
            self.resource = self.res_bundle.resource_doc

    def frame(self, i: int) -> np.ndarray:
        return np.full(FRAME, float(i + 1), np.float32)

    def event(self, i: int):
        """``[(name, doc), ...]`` for point i (a datum first when external)."""
        out = []
        if self.external:
            datum = self.res_bundle.compose_datum(datum_kwargs={"point_number": i})
            out.append(("datum", datum))
            image = datum["datum_id"]
        else:
            image = self.frame(i)
        data = {"det_image": image, "x": 1.5 * i, "y": 1.0 * i}
        t = time.time()
        ev = self.desc_bundle.compose_event(data=data, timestamps={k: t for k in data}, seq_num=i + 1,
                                            validate=False)
        out.append(("event", ev))
        return out

    def stop(self, exit_status: str = "success", reason: str = ""):
        if getattr(self, "_stop", None) is None:   # event-model composes one stop per run
            self._stop = self.bundle.compose_stop(exit_status=exit_status, reason=reason)
        return self._stop

    def all(self, exit_status: str = "success"):
        docs = [("start", self.start), ("descriptor", self.descriptor)]
        if self.resource is not None:
            docs.append(("resource", self.resource))
        for i in range(self.points):
            docs += self.event(i)
        docs.append(("stop", self.stop(exit_status)))
        return docs


def publish(bootstrap, topic, docs):
    """Documents as bluesky-kafka's Publisher writes them (msgpack); ``bytes`` items go as they are."""
    from confluent_kafka import Producer

    from sparkmpi.stream.bluesky_docs import encode_document
    from sparkmpi.stream.kafka_client import ensure_topic

    ensure_topic(bootstrap, topic, 1)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for item in docs:
        value = item if isinstance(item, bytes) else encode_document(*item)
        producer.produce(topic, value, key=b"beamline")
    producer.flush(10)
