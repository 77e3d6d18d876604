"""Streaming: detector frames through Kafka (or ZeroMQ) into micro-batches.

Public API (the code lives in the submodules)::

    from sparkmpi.stream import (
        encode_frame, decode_frame,                       # message format (frames)
        start_broker, stop_broker, broker_status,         # local KRaft broker (kafka)
        SyntheticScan, publish_kafka, ZmqReceiver,        # detector simulator (detector)
        plan_batch, read_offset_range, commit_offsets,    # offset ranges (offsets)
        StreamDriver, ZmqStreamDriver, integrate_frames,  # micro-batches -> Spark -> MPI (driver)
        read_outputs,                                     # batch outputs read back (lost/duplicated)
    )

Importing this package imports neither confluent-kafka nor pyzmq; they load
when a function that talks to a broker or a socket is called.
"""

from ._client import check_broker, ensure_topic, topic_partitions
from ._errors import BrokerError, BrokerUnavailable, OffsetError, StreamTimeout
from .detector import (
    NpzScan, PublishReport, SyntheticScan, ZmqDeadLetter, ZmqPublisher, ZmqReceiver, publish_kafka, publish_zmq,
)
from ._output import read_outputs
from .driver import BatchFailed, BatchReport, StreamDriver, StreamReport, ZmqStreamDriver, integrate_frames
from .frames import (
    EndOfScan, FrameError, FrameHeader, decode_frame, decode_message, encode_end_of_scan, encode_frame,
)
from .kafka import (
    DEFAULT_VERSION as KAFKA_VERSION, BrokerInfo, BrokerStatus, LocalBroker, broker_status, fetch_kafka,
    resolve_bootstrap, start_broker, stop_broker,
)
from .offsets import (
    DeadLetter, DeadLetterWriter, EndMarker, Frame, KafkaRecord, OffsetRange, StreamCounters, commit_offsets,
    committed_offsets, decode_record, plan_batch, read_offset_range, watermarks,
)

__all__ = [
    # frames
    "FrameHeader", "EndOfScan", "FrameError", "encode_frame", "decode_frame", "decode_message",
    "encode_end_of_scan",
    # broker
    "KAFKA_VERSION", "BrokerInfo", "BrokerStatus", "LocalBroker", "fetch_kafka", "start_broker", "stop_broker",
    "broker_status", "resolve_bootstrap", "check_broker", "ensure_topic", "topic_partitions",
    "BrokerError", "BrokerUnavailable", "StreamTimeout", "OffsetError",
    # detector
    "SyntheticScan", "NpzScan", "PublishReport", "publish_kafka", "publish_zmq", "ZmqPublisher", "ZmqReceiver",
    "ZmqDeadLetter",
    # offsets
    "OffsetRange", "KafkaRecord", "Frame", "EndMarker", "DeadLetter", "StreamCounters", "plan_batch",
    "read_offset_range", "decode_record", "watermarks", "committed_offsets", "commit_offsets", "DeadLetterWriter",
    # driver
    "StreamDriver", "ZmqStreamDriver", "integrate_frames", "BatchReport", "StreamReport", "BatchFailed",
    "read_outputs",
]
