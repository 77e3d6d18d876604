"""The compressed blobs of DECTRIS detectors: LZ4 and bitshuffle-LZ4 in HDF5 framing.

Both algorithms frame their output the way the HDF5 filters do::

    offset  size  field
    0       8     uncompressed size in bytes, unsigned big-endian
    8       4     block size in bytes, unsigned big-endian
    12      ...   blocks: 4-byte big-endian compressed size, then the block

``bslz4`` bit-shuffles each block (of ``block size / element size``
elements) before LZ4; ``lz4`` compresses the bytes as they are.  This is what
an Eiger sends (``bs16-lz4<`` / ``bs32-lz4<`` in Stream V1, ``bslz4`` and
``lz4`` under tag 56500 in Stream V2).

Decompression goes through DECTRIS's own ``dectris-compression``;
compression (for the project's sender) through ``bitshuffle`` and ``lz4``,
with the framing written here.
"""

from __future__ import annotations

import struct

import numpy as np

from ..frames import FrameError

ALGORITHMS = ("bslz4", "lz4")
_HEADER = struct.Struct(">QI")
HEADER_SIZE = _HEADER.size
#: The block size an Eiger uses (bytes), kept by the project's sender.
BLOCK_BYTES = 8192
LZ4_BLOCK_BYTES = 1 << 20


def check_algorithm(algorithm, where: str = "compression") -> str:
    if algorithm not in ALGORITHMS:
        raise FrameError(f"{where}: unknown compression {algorithm!r:.40}; expected one of {', '.join(ALGORITHMS)}",
                         "unknown_compression")
    return algorithm


def compress(array: np.ndarray, algorithm: str) -> bytes:
    """Compress ``array`` (C order) as ``algorithm`` (``"bslz4"`` or ``"lz4"``), HDF5-framed."""
    check_algorithm(algorithm)
    flat = np.ascontiguousarray(array).reshape(-1)
    if algorithm == "bslz4":
        import bitshuffle

        if BLOCK_BYTES % flat.dtype.itemsize:
            raise FrameError(f"bslz4: element size {flat.dtype.itemsize} does not divide the block size",
                             "bad_dtype")
        body = bitshuffle.compress_lz4(flat, BLOCK_BYTES // flat.dtype.itemsize)
        return _HEADER.pack(flat.nbytes, BLOCK_BYTES) + memoryview(body).cast("B").tobytes()
    import lz4.block

    raw = memoryview(flat).cast("B")
    parts = [_HEADER.pack(raw.nbytes, LZ4_BLOCK_BYTES)]
    for start in range(0, raw.nbytes, LZ4_BLOCK_BYTES):
        block = raw[start:start + LZ4_BLOCK_BYTES]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= block.nbytes:   # the HDF5 framing stores a block that does not shrink as it is
            packed = bytes(block)
        parts.append(struct.pack(">I", len(packed)))
        parts.append(packed)
    return b"".join(parts)


def declared_size(data, where: str = "compressed data") -> int:
    """The uncompressed size the framing header announces."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise FrameError(f"{where}: {view.nbytes} bytes cannot hold the {HEADER_SIZE}-byte framing header",
                         "bad_compressed_data")
    return _HEADER.unpack_from(view)[0]


def decompress(data, algorithm: str, elem_size: int, expected_bytes: int, where: str = "compressed data") -> bytes:
    """Decompress ``data`` and check it holds exactly ``expected_bytes`` bytes.

    The framing header is checked first, so a blob announcing another size
    is refused before any memory is spent on it.
    """
    check_algorithm(algorithm, where)
    size = declared_size(data, where)
    if size != expected_bytes:
        raise FrameError(f"{where}: the {algorithm} header announces {size} bytes, the array needs "
                         f"{expected_bytes}", "size_mismatch")
    from dectris.compression import decompress as _decompress

    try:
        out = _decompress(bytes(data) if not isinstance(data, bytes) else data, algorithm, elem_size=elem_size)
    except Exception as exc:  # noqa: BLE001  (the C library's errors: corrupt input)
        raise FrameError(f"{where}: {algorithm} data do not decompress: {exc}", "bad_compressed_data") from None
    if len(out) != expected_bytes:
        raise FrameError(f"{where}: {algorithm} data decompress to {len(out)} bytes, expected {expected_bytes}",
                         "size_mismatch")
    return out
