"""DECTRIS Eiger detector streams: Stream V2 (CBOR) and V1 (JSON + blobs), a Kafka bridge, a REST client.

The public names, imported lazily (a rank decoding frames imports only the codec):

* codec: :func:`decode_message`, :func:`encode_start`, :func:`encode_image`,
  :func:`encode_end`, :func:`check_image`, :func:`to_stream2`, the message
  classes :class:`StartMessage`, :class:`ImageMessage`, :class:`EndMessage`,
  :class:`EncodedArray`, and :class:`Stream1Decoder` (Stream V1);
* :func:`run_bridge` (``sparkmpi detector bridge``), :class:`EigerStreamDriver`
  (``sparkmpi stream run --eiger``), :class:`Stream2Sender` / :func:`send_series`
  (``sparkmpi detector send``), :class:`SimplonClient` (``sparkmpi detector
  acquire``), :class:`TickitEiger` (``sparkmpi detector eiger-simulator``).

Protocols as read here: docs/stream.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "stream2": ("decode_message", "encode_start", "encode_image", "encode_end", "check_image", "to_stream2",
                "StartMessage", "ImageMessage", "EndMessage", "EncodedArray"),
    "stream1": ("Stream1Decoder",),
    "bridge": ("run_bridge", "BridgeReport"),
    "source": ("decode_eiger_record", "read_eiger_ranges"),
    "driver": ("EigerStreamDriver",),
    "sender": ("Stream2Sender", "SeriesPlan", "send_series"),
    "rest": ("SimplonClient", "SimplonError"),
    "simulator": ("TickitEiger", "SimulatorError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
