"""The frame message format: whole, truncated, with trailing junk, garbage, fuzzed."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkmpi.errors import SparkMPIError
from sparkmpi.stream.frames import (
    MAGIC, PREFIX_SIZE, EndOfScan, FrameError, FrameHeader, decode_frame, decode_message,
    encode_end_of_scan, encode_frame, is_end_of_scan,
)

DTYPES = ["uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64", ">u2", ">f8"]


def _frame(shape=(4, 3), dtype="uint16", seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100).astype(dtype)


def _header(**kw):
    base = dict(scan_id="scan-1", index=7, position=(1.5, -2.25), timestamp=1700000000.125)
    base.update(kw)
    return FrameHeader(**base)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5, 3), (128, 128), (2, 3, 4)])
def test_round_trip(dtype, shape):
    array = _frame(shape, dtype)
    data = encode_frame(_header(), array)
    header, out = decode_frame(data)
    assert header.scan_id == "scan-1" and header.index == 7
    assert header.position == (1.5, -2.25) and header.timestamp == 1700000000.125
    assert header.shape == shape and np.dtype(header.dtype) == array.dtype
    assert out.dtype == array.dtype and out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_decode_does_not_copy_payload():
    array = _frame((64, 64))
    data = encode_frame(_header(), array)
    _, out = decode_frame(data)
    assert not out.flags.owndata and not out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))
    # a writable buffer gives a writable view over the same memory
    buf = bytearray(data)
    _, out2 = decode_frame(buf)
    out2[0, 0] = 4242
    assert np.frombuffer(buf, np.uint16, count=1, offset=len(buf) - array.nbytes)[0] == 4242


def test_header_from_mapping_and_extra_keys_round_trip():
    array = _frame()
    data = encode_frame({"scan_id": "s", "index": 0, "extra": {"energy_kev": 8.8}}, array)
    header, _ = decode_frame(data)
    assert header.extra == {"energy_kev": 8.8} and header.position == (0.0, 0.0)


def test_non_contiguous_array_is_encoded_in_c_order():
    array = _frame((6, 8))[:, ::2]
    _, out = decode_frame(encode_frame(_header(), array))
    np.testing.assert_array_equal(out, array)


def test_end_of_scan_round_trip():
    data = encode_end_of_scan("scan-1", 1000, partition=3, timestamp=5.0)
    assert is_end_of_scan(data) and not is_end_of_scan(encode_frame(_header(), _frame()))
    assert decode_message(data) == EndOfScan("scan-1", 1000, 3, 5.0)
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert info.value.code == "not_a_frame"
    with pytest.raises(FrameError) as info:
        decode_message(data + b"x")
    assert info.value.code == "trailing_bytes"


def test_every_truncation_raises_frame_error():
    data = encode_frame(_header(), _frame((3, 5)))
    hlen = struct.unpack_from("<I", data, 6)[0]
    for n in range(len(data)):
        with pytest.raises(FrameError) as info:
            decode_frame(data[:n])
        if n < PREFIX_SIZE + hlen:
            assert info.value.code in ("truncated_header", "bad_magic") or n == 0
        else:
            assert info.value.code == "truncated_payload"
            assert f"needs {3 * 5 * 2} bytes, got {n - PREFIX_SIZE - hlen}" in str(info.value)


def test_trailing_junk_is_rejected_with_counts():
    data = encode_frame(_header(), _frame((3, 5)))
    with pytest.raises(FrameError, match="3 trailing bytes.*needs 30 bytes, got 33") as info:
        decode_frame(data + b"abc")
    assert info.value.code == "trailing_bytes"


def _with_header(obj, payload=b"", kind=0, magic=MAGIC, version=1):
    head = json.dumps(obj).encode()
    return struct.pack("<4sBBI", magic, version, kind, len(head)) + head + payload


GOOD = {"scan": "s", "index": 1, "shape": [2, 2], "dtype": "<u2", "pos": [0, 0], "ts": 0}


@pytest.mark.parametrize("data, code, words", [
    (b"XXXX" + bytes(20), "bad_magic", "bad magic"),
    (b"SM", "truncated_header", "need 10 prefix bytes, got 2"),
    (_with_header(GOOD, bytes(8), version=2), "bad_version", "version 2"),
    (_with_header(GOOD, bytes(8), kind=9), "bad_kind", "kind 9"),
    (struct.pack("<4sBBI", MAGIC, 1, 0, 10**6), "header_too_large", "exceeds"),
    (struct.pack("<4sBBI", MAGIC, 1, 0, 50) + b"{}", "truncated_header", "says 50 bytes, got 2"),
    (_with_header([1, 2]), "bad_header", "JSON object"),
    (struct.pack("<4sBBI", MAGIC, 1, 0, 3) + b"{x}", "bad_header", "not valid UTF-8 JSON"),
    (_with_header({**GOOD, "dtype": "<c8"}, bytes(32)), "bad_dtype", "unsupported dtype '<c8'"),
    (_with_header({**GOOD, "dtype": "object"}, bytes(8)), "bad_dtype", "unsupported dtype"),
    (_with_header({k: v for k, v in GOOD.items() if k != "shape"}), "bad_header", "missing key(s) ['shape']"),
    (_with_header({**GOOD, "shape": [2, 0]}), "bad_header", "integers >= 1"),
    (_with_header({**GOOD, "shape": [2, True]}), "bad_header", "integers >= 1"),
    (_with_header({**GOOD, "index": -1}, bytes(8)), "bad_header", "'index' must be an integer >= 0"),
    (_with_header({**GOOD, "pos": [0]}, bytes(8)), "bad_header", "'pos' must be [x, y]"),
    (_with_header({**GOOD, "ts": "now"}, bytes(8)), "bad_header", "'ts' must be a finite number"),
    (_with_header({**GOOD, "scan": ""}, bytes(8)), "bad_header", "'scan' must be a non-empty string"),
    (_with_header({**GOOD, "shape": [3, 3]}, bytes(8)), "truncated_payload", "needs 18 bytes, got 8"),
    (_with_header({**GOOD, "dtype": "<f4"}, np.array([1, np.nan, 2, 3], "<f4").tobytes()),
     "not_finite", "1 of 4 values are NaN"),
])
def test_each_bad_input_names_its_cause(data, code, words):
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert info.value.code == code
    assert words in str(info.value)
    assert isinstance(info.value, SparkMPIError)


def test_nan_allowed_when_asked():
    data = _with_header({**GOOD, "dtype": "<f4"}, np.array([1, np.nan, 2, 3], "<f4").tobytes())
    _, out = decode_frame(data, check_finite=False)
    assert np.isnan(out[0, 1])


@pytest.mark.parametrize("kwargs, array, words", [
    ({"index": -1}, _frame(), "header.index must be an integer >= 0, got -1"),
    ({"scan_id": ""}, _frame(), "header.scan_id"),
    ({"shape": (9, 9)}, _frame(), "header.shape (9, 9) does not match array shape (4, 3)"),
    ({"dtype": "<f4"}, _frame(), "header.dtype '<f4' does not match"),
    ({"position": (float("nan"), 0)}, _frame(), "header.position"),
    ({}, np.zeros((2, 2), np.complex64), "unsupported dtype complex64"),
    ({}, np.zeros((0, 2), np.uint16), "got shape (0, 2)"),
    ({}, np.zeros((1, 1, 1, 1, 1), np.uint16), "1 to 4 dimensions"),
])
def test_encode_validates_inputs(kwargs, array, words):
    with pytest.raises(ValueError) as info:
        encode_frame(_header(**kwargs), array)
    assert words in str(info.value)


def test_encode_rejects_wrong_types():
    with pytest.raises(TypeError, match="array: expected numpy.ndarray, got list"):
        encode_frame(_header(), [[1, 2]])
    with pytest.raises(ValueError, match="unknown key"):
        encode_frame({"scan_id": "s", "index": 0, "bogus": 1}, _frame())


def test_decode_rejects_non_bytes():
    with pytest.raises(FrameError, match="bytes-like"):
        decode_frame("SMPF text")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_garbage_only_raises_frame_error(data):
    try:
        decode_message(data)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_valid_prefix_then_garbage(tail):
    # garbage after a valid magic/version is the hard case: it reaches the JSON and payload checks
    for kind in (0, 1):
        data = struct.pack("<4sBBI", MAGIC, 1, kind, len(tail) // 2) + tail
        try:
            decode_message(data)
        except FrameError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_frames_decode_or_raise_frame_error(data):
    raw = bytearray(encode_frame(_header(), _frame((3, 4), "float32")))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4))
    for pos, value in flips:
        raw[pos] = value
    cut = data.draw(st.integers(0, len(raw) + 3))
    raw = bytes(raw[:cut]) + bytes(max(0, cut - len(raw)))
    try:
        header, array = decode_frame(raw)
    except FrameError:
        return
    hlen = struct.unpack_from("<I", raw, 6)[0]
    assert array.nbytes == len(raw) - PREFIX_SIZE - hlen  # decoded: the payload is exactly the array
    assert array.shape == header.shape


def test_rank_side_code_imports_neither_the_driver_nor_the_broker_tooling():
    """A rank (a fresh process per batch) imports only what it runs: the package's
    other modules cost ~65 ms per rank per batch."""
    import subprocess
    import sys

    code = ("import sys, sparkmpi.stream as s\n"
            "assert not [m for m in sys.modules if m.startswith('sparkmpi.stream.')], 'package imported modules'\n"
            "import sparkmpi.stream._rank\n"
            "heavy = {'sparkmpi.stream.driver', 'sparkmpi.stream.broker', 'sparkmpi.stream.detector',\n"
            "         'sparkmpi.stream._output', 'confluent_kafka', 'zmq', 'pyspark'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert s.integrate_frames is sparkmpi.stream._rank.integrate_frames\n"
            "assert s.StreamDriver.__module__ == 'sparkmpi.stream.driver'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
