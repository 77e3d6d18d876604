"""The Stream V2 codec (pure): round trips, DECTRIS's own messages, and every kind of bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import cbor2
import numpy as np
import pytest

from sparkmpi.errors import InvalidArgument
from sparkmpi.stream.eiger import _compression as comp
from sparkmpi.stream.eiger import stream2 as s2
from sparkmpi.stream.frames import FrameError


def _tickit_data() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("tickit_devices")   # located, not imported (the package pulls in a lot)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "eiger" / "data"


def frame(shape=(48, 40), dtype="uint16", seed=0):
    rng = np.random.default_rng(seed)
    return rng.poisson(4.0, size=shape).astype(dtype)


@pytest.mark.parametrize("compression", [None, "lz4", "bslz4"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
def test_image_round_trip(compression, dtype):
    a = frame(dtype=dtype)
    msg = s2.decode_message(s2.encode_image(5, 12, {"threshold_1": a, "threshold_2": a[::-1].copy()},
                                            compression=compression, series_unique_id="u-5", real_time=0.25,
                                            start_time=1.0, stop_time=1.25))
    assert isinstance(msg, s2.ImageMessage)
    assert (msg.series_id, msg.image_id, msg.series_unique_id) == (5, 12, "u-5")
    assert (msg.real_time, msg.start_time, msg.stop_time) == (0.25, 1.0, 1.25)
    assert msg.data["threshold_1"].compression == compression
    out = msg.decode()
    assert out["threshold_1"].dtype == a.dtype and np.array_equal(out["threshold_1"], a)
    assert np.array_equal(out["threshold_2"], a[::-1])


def test_large_frame_lz4_spans_blocks():
    a = frame((1100, 1024), "uint16", seed=3)  # 2.2 MB: three LZ4 blocks of 1 MiB
    msg = s2.decode_message(s2.encode_image(1, 0, a, compression="lz4"))
    assert np.array_equal(msg.decode()["threshold_1"], a)


def test_start_and_end_round_trip():
    mask = np.zeros((48, 40), np.uint32)
    mask[3, 4] = 1
    raw = s2.encode_start(9, image_shape=(48, 40), image_dtype="uint16", channels=["threshold_1", "threshold_2"],
                          number_of_images=100, series_unique_id="abc",
                          threshold_energy={"threshold_1": 4000.0, "threshold_2": 8000.0},
                          extra={"incident_energy": 8000.0, "pixel_size_x": 7.5e-5, "pixel_mask": mask})
    start = s2.decode_message(raw)
    assert isinstance(start, s2.StartMessage)
    assert (start.series_id, start.channels, start.image_shape, start.image_dtype, start.number_of_images) == \
        (9, ("threshold_1", "threshold_2"), (48, 40), np.dtype("uint16"), 100)
    assert start.threshold_energy == {"threshold_1": 4000.0, "threshold_2": 8000.0}
    assert start.fields["incident_energy"] == 8000.0
    assert np.array_equal(start.fields["pixel_mask"].decode(), mask)
    end = s2.decode_message(s2.encode_end(9, series_unique_id="abc"))
    assert isinstance(end, s2.EndMessage) and (end.series_id, end.series_unique_id) == (9, "abc")


def test_bslz4_blob_matches_a_real_eiger_byte_for_byte():
    data = _tickit_data()
    if data is None:
        pytest.skip("tickit-devices is not installed (it ships a frame from a real Eiger)")
    blob = (data / "frame_sample").read_bytes()
    size, block = struct.unpack(">QI", blob[:12])
    decoded = np.frombuffer(comp.decompress(blob, "bslz4", 2, size), "<u2")
    assert block == comp.BLOCK_BYTES
    assert comp.compress(decoded, "bslz4") == blob


def test_dectris_messages_from_a_real_eiger_decode():
    data = _tickit_data()
    if data is None:
        pytest.skip("tickit-devices is not installed (it ships messages captured from a real Eiger)")
    start = s2.decode_message((data / "stream2" / "start.cbor").read_bytes())
    image = s2.decode_message((data / "stream2" / "image.cbor").read_bytes())
    end = s2.decode_message((data / "stream2" / "end.cbor").read_bytes())
    assert start.image_shape == (4362, 4148) and start.series_id == image.series_id == end.series_id
    assert set(start.threshold_energy) == {"threshold_1", "threshold_2"}
    s2.check_image(image, start)
    arr = image.data["threshold_1"]
    assert (arr.compression, arr.dtype.str, arr.shape) == ("bslz4", "<u2", (4362, 4148))
    assert abs(image.real_time - 215873 / 50000000) < 1e-12
    decoded = image.decode()["threshold_1"]
    assert np.array_equal(decoded, _independent_bslz4((data / "stream2" / "image.cbor").read_bytes()))


def _independent_bslz4(raw: bytes) -> np.ndarray:
    """The reference: plain cbor2 (no tag hook) and the bitshuffle library, not the code under test."""
    import bitshuffle

    msg = cbor2.loads(raw)
    msg = msg.value if isinstance(msg, cbor2.CBORTag) else msg
    md = msg["data"]["threshold_1"]
    assert md.tag == 40
    dims, typed = md.value
    assert typed.tag == 69 and typed.value.tag == 56500
    algorithm, elem, blob = typed.value.value
    assert (algorithm, elem) == ("bslz4", 2)
    block = struct.unpack(">I", blob[8:12])[0] // elem
    return bitshuffle.decompress_lz4(np.frombuffer(blob, np.uint8)[12:], (dims[0] * dims[1],),
                                     np.dtype("<u2"), block).reshape(dims)


def test_column_major_and_big_endian_arrays():
    a = frame((6, 5), ">u2")
    item = cbor2.CBORTag(1040, [[6, 5], cbor2.CBORTag(65, np.asfortranarray(a).tobytes(order="F"))])
    raw = cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 1, "image_id": 0,
                                            "data": {"threshold_1": item}}))
    out = s2.decode_message(raw).decode()["threshold_1"]
    assert np.array_equal(out, a)


# ---------------------------------------------------------------- bad input

def _code(raw) -> str:
    with pytest.raises(FrameError) as info:
        msg = s2.decode_message(raw)
        if isinstance(msg, s2.ImageMessage):
            msg.decode()
    return info.value.code


def test_truncated_message_every_length():
    raw = s2.encode_image(1, 0, frame((8, 8)), compression="bslz4")
    for n in range(len(raw)):
        assert _code(raw[:n]) in ("truncated", "bad_cbor"), n
    assert _code(raw[:len(raw) // 2]) == "truncated"


def test_trailing_junk_is_refused():
    raw = s2.encode_image(1, 0, frame((8, 8)))
    assert _code(raw + b"\x00") == "trailing_bytes"


def _image_with(item) -> bytes:
    return cbor2.dumps({"type": "image", "series_id": 1, "image_id": 0, "data": {"threshold_1": item}})


def test_unknown_compression():
    item = cbor2.CBORTag(40, [[8, 8], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["zip", 2, b"\x00" * 20]))])
    with pytest.raises(FrameError, match="unknown compression 'zip'") as info:
        s2.decode_message(_image_with(item))
    assert info.value.code == "unknown_compression"


def test_unknown_tag():
    item = cbor2.CBORTag(40, [[8, 8], cbor2.CBORTag(999, b"\x00" * 128)])
    with pytest.raises(FrameError, match="unknown CBOR tag 999") as info:
        s2.decode_message(_image_with(item))
    assert info.value.code == "unknown_tag"


def test_corrupt_compressed_data_and_lying_size():
    a = frame((16, 16))
    blob = comp.compress(a, "bslz4")[:-7]   # LZ4 has no checksum: a cut block is what it can detect
    item = cbor2.CBORTag(40, [[16, 16], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, bytes(blob)]))])
    assert _code(_image_with(item)) in ("bad_compressed_data", "size_mismatch")
    other = comp.compress(frame((16, 8)), "bslz4")   # announces 256 bytes for a 512-byte array
    item = cbor2.CBORTag(40, [[16, 16], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, other]))])
    assert _code(_image_with(item)) == "size_mismatch"


def test_element_size_disagreeing_with_the_typed_array():
    item = cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(70, cbor2.CBORTag(56500, ["bslz4", 2, b"\x00" * 20]))])
    assert _code(_image_with(item)) == "dtype_mismatch"


def test_uncompressed_size_mismatch():
    item = cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, b"\x00" * 30)])
    assert _code(_image_with(item)) == "size_mismatch"


@pytest.mark.parametrize("obj, needle", [
    ([1, 2], "CBOR map"),
    ({"type": "frame", "series_id": 1}, "unknown message type"),
    ({"type": "image", "series_id": -1, "image_id": 0, "data": {}}, "'series_id' must be"),
    ({"type": "image", "series_id": 1, "image_id": "0", "data": {}}, "'image_id' must be"),
    ({"type": "image", "series_id": 1, "image_id": 0, "data": {}}, "'data' must map"),
    ({"type": "image", "series_id": 1, "image_id": 0, "data": {"threshold_1": b"x"}}, "not a tag-40 array"),
    ({"type": "image", "series_id": 1, "image_id": 0, "real_time": [1, 0],
      "data": {"threshold_1": cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"x")])}}, "'real_time' must be"),
    ({"type": "start", "series_id": 1, "channels": []}, "'channels' must be"),
    ({"type": "start", "series_id": 1, "image_dtype": "int64"}, "'image_dtype' must be"),
    ({"type": "end"}, "'series_id' must be"),
])
def test_bad_messages_name_what_is_wrong(obj, needle):
    with pytest.raises(FrameError, match=needle):
        s2.decode_message(cbor2.dumps(obj))


def test_check_image_against_the_start_message():
    start = s2.decode_message(s2.encode_start(4, image_shape=(8, 8), image_dtype="uint16"))
    good = s2.decode_message(s2.encode_image(4, 0, frame((8, 8))))
    s2.check_image(good, start)
    cases = [
        (s2.encode_image(5, 0, frame((8, 8))), "unknown_series"),
        (s2.encode_image(4, 0, frame((8, 9))), "shape_mismatch"),
        (s2.encode_image(4, 0, frame((8, 8), "uint32")), "dtype_mismatch"),
        (s2.encode_image(4, 0, {"threshold_9": frame((8, 8))}), "unknown_channel"),
    ]
    for raw, code in cases:
        with pytest.raises(FrameError) as info:
            s2.check_image(s2.decode_message(raw), start)
        assert info.value.code == code
        assert "series" in str(info.value)
    with pytest.raises(FrameError) as info:
        s2.check_image(good, None)
    assert info.value.code == "unknown_series"


def test_encoders_check_their_arguments():
    with pytest.raises(InvalidArgument, match="series_id"):
        s2.encode_image(-1, 0, frame())
    with pytest.raises(InvalidArgument, match="image_id"):
        s2.encode_image(0, -2, frame())
    with pytest.raises(InvalidArgument, match="compression"):
        s2.encode_image(0, 0, frame(), compression="zip")
    with pytest.raises(InvalidArgument, match="image_shape"):
        s2.encode_start(0, image_shape=(4,))
    with pytest.raises(InvalidArgument, match="typed-array tag"):
        s2.encode_image(0, 0, frame().astype(np.complex64))


def test_fuzz_garbage_only_ever_raises_frame_error():
    from hypothesis import given, settings, strategies as hs

    good = s2.encode_image(1, 0, frame((8, 8)), compression="bslz4")

    @settings(max_examples=300, deadline=None)
    @given(hs.binary(max_size=200) | hs.builds(lambda i, b: good[:i] + b + good[i + len(b):],
                                                hs.integers(0, len(good)), hs.binary(min_size=1, max_size=8)))
    def check(data):
        try:
            msg = s2.decode_message(data)
            if isinstance(msg, s2.ImageMessage):
                msg.decode()
        except FrameError:
            pass

    check()
