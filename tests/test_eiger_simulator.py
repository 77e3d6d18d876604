"""Against Diamond Light Source's Eiger simulator (tickit-devices, run by tickit): driven through its
SIMPLON REST interface, streaming Stream V2 and Stream V1 through the bridge into a REAL Kafka broker;
the frames the ranks' decoder makes must equal the simulator's images, counts exact."""

from __future__ import annotations

import struct
from pathlib import Path

import cbor2
import numpy as np
import pytest

from sparkmpi.stream.eiger import simulator
from sparkmpi.stream.eiger.rest import SimplonError
from sparkmpi.stream.eiger.source import _start_for, decode_eiger_record
from sparkmpi.stream.offsets import DeadLetter, EndMarker, Frame, read_offset_range, watermarks

from test_eiger_pipeline import _Bridge

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(simulator.available() is not None, reason=str(simulator.available()))]

@pytest.fixture(autouse=True)
def _no_pooled_readers():
    """Readers this process's range reads pooled (the bridge reads its topic back) are closed
    after each test: the pool keeps their broker connections for the next read by design."""
    yield
    from sparkmpi.stream.offsets import _ReaderPool

    _ReaderPool.close_all()



def _data_dir() -> Path:
    import importlib.util

    return Path(list(importlib.util.find_spec("tickit_devices").submodule_search_locations)[0]) / "eiger" / "data"


def _bitshuffle_reference(blob: bytes, shape) -> np.ndarray:
    """Independent of the code under test: the bitshuffle library on the HDF5-framed blob."""
    import bitshuffle

    block = struct.unpack(">I", blob[8:12])[0] // 2
    return bitshuffle.decompress_lz4(np.frombuffer(blob, np.uint8)[12:], (shape[0] * shape[1],),
                                     np.dtype("<u2"), block).reshape(shape)


def _v2_reference() -> np.ndarray:
    msg = cbor2.loads((_data_dir() / "stream2" / "image.cbor").read_bytes())
    dims, typed = msg["data"]["threshold_1"].value
    return _bitshuffle_reference(typed.value.value[2], dims)


def _v1_reference() -> np.ndarray:
    return _bitshuffle_reference((_data_dir() / "frame_sample").read_bytes(), (4362, 4148))


@pytest.fixture(scope="module")
def eiger():
    with simulator.TickitEiger() as sim:
        yield sim


def _decoded(bootstrap, topic):
    (low, high), = watermarks(bootstrap, topic).values()
    records = read_offset_range(bootstrap, topic, 0, low, high)
    start_for = lambda p, o: _start_for(bootstrap, 10.0, None, topic, p, o)  # noqa: E731  (the ranks' lookup)
    return [decode_eiger_record(r, start_for) for r in records]


@pytest.mark.parametrize("stream, detail, reference", [("v2", "basic", _v2_reference), ("v1", "all", _v1_reference)])
def test_simulator_streams_decode_to_its_images(eiger, broker, stream, detail, reference):
    topic, n = f"eiger-sim-{stream}", 3
    bridge = _Bridge(eiger.stream_v2 if stream == "v2" else eiger.stream_v1, broker.bootstrap, topic,
                     series=1, end_timeout=30, stream=stream)
    bridge.start()
    eiger.client.configure(nimages=n, ntrigger=1, stream=stream, header_detail=detail, frame_time=0.02)
    eiger.client.acquire(timeout=30)
    report = bridge.result(60)
    (series,) = report.series
    assert (report.images, report.dead_letters, series["images"], series["incomplete"]) == (n, 0, n, None)
    items = [x for x in _decoded(broker.bootstrap, topic) if x is not None]
    frames = [x for x in items if isinstance(x, Frame)]
    assert not [x for x in items if isinstance(x, DeadLetter)]
    assert [f.header.index for f in frames] == list(range(n))
    assert all(f.header.scan_id == f"eiger-{series['series_id']}" for f in frames)
    expected = reference()
    for f in frames:
        assert f.array.shape == (4362, 4148) and f.array.dtype == np.uint16
        assert np.array_equal(f.array, expected), "a decoded frame differs from the simulator's image"
    (end,) = [x for x in items if isinstance(x, EndMarker)]
    assert end.marker.frames == n


def test_rest_client_errors_name_the_request(eiger):
    from sparkmpi._proc import free_port
    from sparkmpi.errors import InvalidArgument
    from sparkmpi.stream.eiger.rest import SimplonClient

    with pytest.raises(SimplonError, match=r"GET http://127\.0\.0\.1:\d+/detector/api/1\.8\.0/config/nope: HTTP 404"):
        eiger.client.get("detector", "config", "nope")
    with pytest.raises(InvalidArgument, match="stream: expected 'v1' or 'v2'"):
        eiger.client.configure(stream="v3")
    with pytest.raises(InvalidArgument, match="nimages"):
        eiger.client.configure(nimages=0)
    eiger.client.configure(nimages=2, ntrigger=1, stream="v2")
    assert (eiger.client.detector_config("nimages"), eiger.client.get("stream", "config", "format")) == (2, "cbor")
    closed = SimplonClient("127.0.0.1", free_port(), timeout=1.0)
    with pytest.raises(SimplonError, match="no answer within 1 s"):
        closed.state()


def test_acquire_command_drives_the_simulator(eiger, broker, capsys):
    import json

    from sparkmpi.cli import main

    topic = "eiger-sim-acquire"
    bridge = _Bridge(eiger.stream_v2, broker.bootstrap, topic, series=1, end_timeout=30)
    bridge.start()
    assert main(["detector", "acquire", "--rest", f"127.0.0.1:{eiger.rest_port}", "--nimages", "2",
                 "--stream", "v2", "--frame-time", "0.02", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["nimages"], out["stream"], out["state"]) == (2, "v2", "idle")
    report = bridge.result(60)
    assert report.images == 2 and report.series[0]["incomplete"] is None
