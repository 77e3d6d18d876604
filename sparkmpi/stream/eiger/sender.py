"""The project's own Stream V2 detector: a ZeroMQ PUSH socket sending CBOR start, image and end messages.

Like a real Eiger, the sender binds a PUSH socket and sends one message per
start, image and end, frames compressed (``bslz4`` by default, the Eiger's
default; ``lz4``; or None).  Frames come from any frame source of
:mod:`sparkmpi.stream.detector` (:class:`~sparkmpi.stream.detector.SyntheticScan`,
:class:`~sparkmpi.stream.detector.NpzScan` of the ptychography simulator).
A frame's scan position travels in the image message's ``appendix``
(``{"scan_position": [x, y]}``), where a beamline puts its own per-image data.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from ..detector import PublishReport, ZmqPublisher, _Pacer
from ...errors import InvalidArgument
from . import stream2


@dataclass
class SeriesPlan:
    """How to send one series: its id, compression, thresholds, rate."""

    series_id: int = 1
    compression: str | None = "bslz4"
    channels: tuple[str, ...] = ("threshold_1",)
    rate: float | None = None
    send_end: bool = True


class Stream2Sender(ZmqPublisher):
    """A Stream V2 PUSH socket bound to ``endpoint`` (``tcp://127.0.0.1:0`` picks a free port)."""

    def send_message(self, message: bytes, what: str) -> None:
        self._send([message], what)

    def send_series(self, source, plan: SeriesPlan | None = None, *, progress=None) -> PublishReport:
        """Send ``source`` as one series: start, one image per frame, end.

        Every channel of ``plan.channels`` carries the frame (a second
        threshold gets the frame halved, as a higher threshold counts fewer
        photons).
        """
        plan = plan or SeriesPlan()
        if plan.compression not in (None, "lz4", "bslz4"):
            raise InvalidArgument(f"compression: expected 'bslz4', 'lz4' or None, got {plan.compression!r}")
        unique = uuid.uuid4().hex
        shape, dtype = tuple(source.shape), np.dtype(source.dtype)
        self.send_message(stream2.encode_start(
            plan.series_id, image_shape=shape, image_dtype=dtype.name, channels=plan.channels,
            number_of_images=source.count, series_unique_id=unique,
            threshold_energy={c: 4000.0 * (i + 1) for i, c in enumerate(plan.channels)},
            extra={"incident_energy": 8000.0, "pixel_size_x": 7.5e-5, "pixel_size_y": 7.5e-5,
                   "count_time": 0.001, "frame_time": 0.001, "sparkmpi_scan": getattr(source, "scan_id", "")}),
            f"start message of series {plan.series_id}")
        pacer = _Pacer(plan.rate)
        sent = nbytes = 0
        t0 = pacer.start = time.monotonic()
        for i, (index, position, array) in enumerate(source):
            pacer.wait(i)
            arrays = {c: (array if k == 0 else (array // 2).astype(array.dtype)) for k, c in enumerate(plan.channels)}
            message = stream2.encode_image(plan.series_id, int(index), arrays, compression=plan.compression,
                                           series_unique_id=unique, real_time=0.001,
                                           start_time=time.monotonic() - t0, stop_time=time.monotonic() - t0,
                                           extra={"appendix": {"scan_position": [float(position[0]),
                                                                                 float(position[1])],
                                                               "sent_at": time.time()}})
            self.send_message(message, f"image {index} of series {plan.series_id}")
            sent += 1
            nbytes += len(message)
            if progress is not None and sent % 100 == 0:
                print(f"\r{sent}/{source.count} images", end="", file=progress, flush=True)
        if plan.send_end:
            self.send_message(stream2.encode_end(plan.series_id, series_unique_id=unique),
                              f"end message of series {plan.series_id}")
        seconds = max(time.monotonic() - t0, 1e-9)
        if progress is not None:
            print(f"\r{sent}/{source.count} images", file=progress, flush=True)
        return PublishReport(self.endpoint, sent, nbytes, seconds, sent / seconds, nbytes / seconds / 1e6, 1, 1)


def send_series(source, endpoint: str, plan: SeriesPlan | None = None, *, send_timeout: float = 30.0,
                progress=None) -> PublishReport:
    """Bind ``endpoint``, send one series, close."""
    with Stream2Sender(endpoint, send_timeout=send_timeout) as sender:
        return sender.send_series(source, plan, progress=progress)
