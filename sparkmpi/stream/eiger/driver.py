"""The driver side of a bridged Eiger stream: the Kafka driver with the Eiger reader."""

from __future__ import annotations

import functools

from ..driver import StreamDriver
from ..offsets import OffsetRange
from ...errors import InvalidArgument
from .source import CHANNEL_MODES, _warm_eiger, read_eiger_ranges


class EigerStreamDriver(StreamDriver):
    """The Kafka stream driver over a topic written by ``sparkmpi detector bridge``.

    Takes :class:`~sparkmpi.stream.driver.StreamDriver`'s arguments, plus
    ``channels``: ``"first"`` (each frame is the first threshold) or
    ``"all"`` (each frame is (C, H, W), every threshold).  Frames are
    decompressed in the ranks.
    """

    def __init__(self, *args, channels: str = "first", **kwargs):
        if channels not in CHANNEL_MODES:
            raise InvalidArgument(f"channels: expected one of {CHANNEL_MODES}, got {channels!r}")
        self.channels = channels
        self.check_finite = bool(kwargs.get("check_finite", True))
        super().__init__(*args, **kwargs)

    def _warm_reader(self):
        return functools.partial(_warm_eiger, self.bootstrap, self.read_timeout,
                                 [OffsetRange(self.topic, self.partitions[0], 0, 0)])

    def run_batch(self, source, payloads, batch, ranges):
        # the driver's reader hands out raw records; this one decodes them in the ranks
        reader = functools.partial(read_eiger_ranges, self.bootstrap, self.read_timeout,
                                   self.consumer_config or None, self.channels, self.check_finite)
        return super().run_batch(reader, payloads, batch, ranges)
