"""The Stream V1 decoder (pure): header detail levels, encodings, part by part, bad parts and resync."""

from __future__ import annotations

import json

import lz4.block
import numpy as np
import pytest

from sparkmpi.stream.eiger import _compression as comp
from sparkmpi.stream.eiger import stream2 as s2
from sparkmpi.stream.eiger.stream1 import Stream1Decoder
from sparkmpi.stream.frames import FrameError


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def header(series=3, detail="basic", x=20, y=12):
    parts = [j({"htype": "dheader-1.0", "series": series, "header_detail": detail})]
    if detail != "none":
        parts.append(j({"x_pixels_in_detector": x, "y_pixels_in_detector": y, "bit_depth_image": 16,
                        "nimages": 2, "ntrigger": 1}))
    if detail == "all":
        for htype, dtype in (("flatfield-1.0", "float32"), ("dpixelmask-1.0", "uint32"),
                             ("dcountrate_table-1.0", "float32")):
            shape = [x, y] if htype != "dcountrate_table-1.0" else [2, 1000]
            parts += [j({"htype": htype, "shape": shape, "type": dtype}),
                      np.ones((shape[1], shape[0]), dtype).tobytes()]
    return parts


def image(frame, array, encoding="bs16-lz4<", series=3):
    if encoding == "bs16-lz4<":
        blob = comp.compress(array, "bslz4")
    elif encoding == "lz4<":
        blob = lz4.block.compress(array.tobytes(), store_size=False)
    else:
        blob = array.tobytes()
    y, x = array.shape
    return [j({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": "h"}),
            j({"htype": "dimage_d-1.0", "shape": [x, y], "type": "uint16", "encoding": encoding, "size": len(blob)}),
            blob, j({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 2_000_000, "real_time": 1_000_000})]


def end(series=3):
    return [j({"htype": "dseries_end-1.0", "series": series})]


def frame(seed=0, shape=(12, 20)):
    return np.random.default_rng(seed).poisson(5, shape).astype(np.uint16)


def feed_all(parts, decoder=None):
    decoder = decoder or Stream1Decoder()
    return [m for p in parts for m in decoder.feed(p)]


@pytest.mark.parametrize("detail", ["none", "basic", "all"])
@pytest.mark.parametrize("encoding", ["bs16-lz4<", "lz4<", "<"])
def test_a_series_at_every_detail_and_encoding(detail, encoding):
    a, b = frame(1), frame(2)
    msgs = feed_all(header(detail=detail) + image(0, a, encoding) + image(1, b, encoding) + end())
    start, im0, im1, fin = msgs
    assert isinstance(start, s2.StartMessage) and start.series_id == 3
    assert start.image_shape == (None if detail == "none" else (12, 20))
    if detail == "all":
        assert start.fields["dpixelmask-1.0"].shape == (12, 20)
        assert np.all(start.fields["flatfield-1.0"].decode() == 1)
    for msg, arr, i in ((im0, a, 0), (im1, b, 1)):
        s2.check_image(msg, start)
        assert msg.image_id == i and msg.real_time == 1e-3 and msg.stop_time == 2e-3
        assert np.array_equal(msg.decode()["threshold_1"], arr)
        # written as Stream V2 without recompressing, it decodes the same
        again = s2.decode_message(s2.to_stream2(msg))
        assert again.data["threshold_1"].data == msg.data["threshold_1"].data
        assert np.array_equal(again.decode()["threshold_1"], arr)
    assert isinstance(fin, s2.EndMessage) and fin.series_id == 3
    v2_start = s2.decode_message(s2.to_stream2(start))
    assert (v2_start.series_id, v2_start.image_shape) == (3, start.image_shape)


def test_bad_parts_are_errors_and_the_decoder_resyncs():
    a = frame(3)
    good = image(0, a)
    cases = [
        ([b"\x00\x01 not json"], "bad_header"),
        ([j({"htype": "dimage-9"})], "bad_kind"),
        ([good[0], j({"htype": "dimage_d-1.0", "shape": [20, 12], "type": "int64", "encoding": "<"}), good[2]],
         "bad_dtype"),
        ([good[0], j({"htype": "dimage_d-1.0", "shape": [20, 12], "type": "uint16", "encoding": "zip<"}),
          b"xx"], "unknown_compression"),
        ([good[0], good[1], good[2][:-1]], "size_mismatch"),
        ([good[0], j({"htype": "dimage_d-1.0", "shape": [20, 12], "type": "uint32", "encoding": "bs16-lz4<"}),
          good[2]], "dtype_mismatch"),
        ([good[0], good[1], good[2], j({"htype": "dimage-1.0"})], "bad_kind"),
    ]
    for parts, code in cases:
        decoder = Stream1Decoder()
        out = feed_all(header() + parts, decoder)
        errors = [m for m in out if isinstance(m, FrameError)]
        assert [e.code for e in errors] == [code], (code, out)
        # the next complete image decodes
        (msg,) = feed_all(image(5, a), decoder)
        assert msg.image_id == 5 and np.array_equal(msg.decode()["threshold_1"], a)


def test_a_cut_compressed_blob_fails_in_decode():
    a = frame(4)
    parts = image(0, a)
    parts[2] = parts[2][:-6]
    desc = json.loads(parts[1])
    desc["size"] = len(parts[2])
    parts[1] = j(desc)
    (msg,) = feed_all(parts)
    with pytest.raises(FrameError) as info:
        msg.decode()
    assert info.value.code in ("bad_compressed_data", "size_mismatch")


def test_image_shape_disagreeing_with_the_header_config():
    start, msg = feed_all(header(x=20, y=12) + image(0, frame(0, (12, 21))))
    with pytest.raises(FrameError) as info:
        s2.check_image(msg, start)
    assert info.value.code == "shape_mismatch"
