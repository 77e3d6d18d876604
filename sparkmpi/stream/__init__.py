"""Streaming: detector frames through Kafka (or ZeroMQ) into micro-batches.

Public API (the code lives in the submodules)::

    from sparkmpi.stream import (
        encode_frame, decode_frame,                       # message format (frames)
        start_broker, stop_broker, broker_status,         # local KRaft broker (broker)
        SyntheticScan, publish_kafka, ZmqReceiver,        # detector simulator (detector)
        plan_batch, read_offset_range, commit_offsets,    # offset ranges (offsets)
        StreamDriver, ZmqStreamDriver, integrate_frames,  # micro-batches -> Spark -> MPI (driver)
        read_outputs,                                     # batch outputs read back (lost/duplicated)
    )

Importing this package imports none of its submodules, nor confluent-kafka
or pyzmq; each loads when one of its names is first used.
"""

import importlib

# Each public name and the submodule that defines it.  Names load on first use
# (PEP 562), so a rank process that unpickles a function from one submodule
# does not pay for importing the others (BENCHMARKS.md, streaming: rank-side imports).
_EXPORTS = {
    "kafka_client": ("check_broker", "ensure_topic", "topic_partitions"),
    "_errors": ("BrokerError", "BrokerUnavailable", "OffsetError", "StreamTimeout"),
    "detector": ("NpzScan", "PublishReport", "SyntheticScan", "ZmqDeadLetter", "ZmqPublisher", "ZmqReceiver",
                 "publish_kafka", "publish_zmq"),
    "_output": ("read_outputs",),
    "driver": ("BatchFailed", "BatchReport", "StreamDriver", "StreamReport", "ZmqStreamDriver"),
    "_rank": ("integrate_frames",),
    "frames": ("EndOfScan", "FrameError", "FrameHeader", "decode_frame", "decode_message", "encode_end_of_scan",
               "encode_frame"),
    "broker": ("BrokerInfo", "BrokerStatus", "LocalBroker", "broker_status", "fetch_kafka", "resolve_bootstrap",
               "start_broker", "stop_broker"),
    "offsets": ("DeadLetter", "DeadLetterWriter", "EndMarker", "Frame", "KafkaRecord", "OffsetRange",
                "StreamCounters", "commit_offsets", "committed_offsets", "decode_record", "plan_batch",
                "read_offset_range", "watermarks"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE["KAFKA_VERSION"] = "broker"


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"),
                    "DEFAULT_VERSION" if name == "KAFKA_VERSION" else name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


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
