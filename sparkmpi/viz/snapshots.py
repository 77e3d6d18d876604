"""Live snapshots: how a running reconstruction shows its progress to the viewer.

Contract
--------
One writer (the reconstruction) and any number of readers (viewers) share a
directory ``DIR``:

``DIR/snapshot-NNNNNN.npz``
    One snapshot: the writer's arrays under their own names, plus
    ``__meta__``, a 0-d string holding the ``meta`` dict as JSON.  For a
    ptychographic reconstruction the viewer uses ``object`` (complex
    (Hy, Wx), required), ``probe`` (complex (H, W), optional) and ``errors``
    (float (iterations,), optional); other arrays are kept but not shown.
``DIR/latest.json``
    The pointer to the newest snapshot: ``{"format": "sparkmpi-snapshot",
    "version": 1, "sequence": N, "file": "snapshot-NNNNNN.npz", "time":
    <unix seconds>, "keys": [...], "meta": {...}}``.

:func:`publish_snapshot` writes the NPZ under a temporary name and moves it
into place with :func:`os.replace`, then does the same for ``latest.json``;
so a reader sees either the previous complete snapshot or the new complete
one, never half a file, and never waits for the writer (there are no locks).
Only the newest ``keep`` snapshot files are kept.  A reader that follows a
pointer to a file removed in between simply tries again at its next poll
(:class:`SnapshotPoller`).
"""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SnapshotError

__all__ = ["LATEST_NAME", "publish_snapshot", "read_latest", "load_snapshot", "Snapshot", "SnapshotPoller"]

FORMAT_NAME = "sparkmpi-snapshot"
FORMAT_VERSION = 1
LATEST_NAME = "latest.json"
META_KEY = "__meta__"
_FILE_RE = re.compile(r"snapshot-(\d{6,})\.npz")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _snapshot_name(sequence: int) -> str:
    return f"snapshot-{sequence:06d}.npz"


def _check_dir(directory, name: str = "directory") -> Path:
    if not isinstance(directory, (str, os.PathLike)) or str(directory) == "":
        raise SnapshotError(f"{name} must be a non-empty str or path, got {directory!r}")
    return Path(directory)


def _check_arrays(arrays) -> dict[str, np.ndarray]:
    if not isinstance(arrays, dict) or not arrays:
        raise SnapshotError(f"arrays must be a non-empty dict of name -> array, got {type(arrays).__name__} "
                            f"{'(empty)' if isinstance(arrays, dict) else ''}".rstrip())
    out = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key == META_KEY:
            raise SnapshotError(f"arrays keys must be identifiers other than {META_KEY!r}, got {key!r}")
        try:
            arr = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise SnapshotError(f"arrays[{key!r}] is not convertible to an array ({exc})") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise SnapshotError(f"arrays[{key!r}] must hold numbers, got dtype {arr.dtype}")
        out[key] = arr
    return out


def _check_meta(meta) -> str:
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise SnapshotError(f"meta must be a dict (JSON-serialisable), got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"meta must be JSON-serialisable (no NaN), got {meta!r}: {exc}") from exc


def _existing_sequences(directory: Path) -> list[int]:
    seqs = []
    for entry in os.scandir(directory):
        match = _FILE_RE.fullmatch(entry.name)
        if match:
            seqs.append(int(match.group(1)))
    return sorted(seqs)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_snapshot(directory, arrays: dict, meta: dict | None = None, *, keep: int = 3) -> Path:
    """Publish one snapshot of a running reconstruction for live viewers.

    Parameters
    ----------
    directory : str or path
        The snapshot directory (created if missing).  One writer per directory.
    arrays : dict of str -> array_like
        Numeric arrays, stored under their names (identifiers).  The viewer
        shows ``object`` (complex, (Hy, Wx)), ``probe`` and ``errors``.
    meta : dict, optional
        JSON-serialisable figures shown next to the images (e.g. ``frames``,
        ``iteration``, ``batch``).
    keep : int
        Snapshot files kept (the newest); at least 1.

    Returns
    -------
    Path
        The snapshot file written.

    Raises
    ------
    SnapshotError
        A bad argument (named in the message).
    """
    directory = _check_dir(directory)
    checked = _check_arrays(arrays)
    meta_json = _check_meta(meta)
    if not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or keep < 1:
        raise SnapshotError(f"keep must be an integer >= 1, got {keep!r}")
    directory.mkdir(parents=True, exist_ok=True)
    existing = _existing_sequences(directory)
    try:
        previous = read_latest(directory)
    except SnapshotError:
        previous = None  # a damaged pointer is overwritten below
    last = max([existing[-1] if existing else 0, previous["sequence"] if previous else 0])
    sequence = last + 1
    name = _snapshot_name(sequence)
    path = directory / name
    _write_atomic(path, lambda fh: np.savez(fh, **checked, **{META_KEY: np.asarray(meta_json)}))
    pointer = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "sequence": sequence, "file": name,
               "time": time.time(), "keys": sorted(checked), "meta": json.loads(meta_json)}
    _write_atomic(directory / LATEST_NAME,
                  lambda fh: fh.write(json.dumps(pointer, sort_keys=True).encode("utf-8")))
    for old in existing:
        if old <= sequence - keep:
            (directory / _snapshot_name(old)).unlink(missing_ok=True)
    return path


def read_latest(directory) -> dict | None:
    """Read ``latest.json``: the pointer dict, or None when nothing was published yet.

    Raises
    ------
    SnapshotError
        The pointer exists but is not a valid sparkmpi snapshot pointer.
    """
    directory = _check_dir(directory)
    try:
        raw = (directory / LATEST_NAME).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        pointer = json.loads(raw)
    except ValueError as exc:
        raise SnapshotError(f"'{directory / LATEST_NAME}' is not JSON ({exc})") from exc
    if not (isinstance(pointer, dict) and pointer.get("format") == FORMAT_NAME
            and isinstance(pointer.get("sequence"), int) and isinstance(pointer.get("file"), str)
            and _FILE_RE.fullmatch(pointer["file"])):
        raise SnapshotError(f"'{directory / LATEST_NAME}' is not a {FORMAT_NAME} pointer: {pointer!r:.200}")
    return pointer


@dataclass
class Snapshot:
    """One snapshot read back: its number, arrays, meta and file."""

    sequence: int
    arrays: dict
    meta: dict
    path: Path
    time: float


def load_snapshot(directory, pointer: dict) -> Snapshot | None:
    """Load the snapshot a pointer names; None if its file is gone (superseded meanwhile)."""
    directory = _check_dir(directory)
    path = directory / pointer["file"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SnapshotError(f"snapshot '{path}' is unreadable ({type(exc).__name__}: {exc})") from exc
    arrays.pop(META_KEY, None)
    meta = pointer.get("meta") if isinstance(pointer.get("meta"), dict) else {}
    return Snapshot(int(pointer["sequence"]), arrays, meta, path, float(pointer.get("time", 0.0)))


class SnapshotPoller:
    """Hand out each new snapshot of a directory once; never blocks and never locks.

    Call :meth:`poll` as often as you like: it stats ``latest.json`` and only
    reads when it changed.  The directory may not exist yet.
    """

    def __init__(self, directory):
        self.directory = _check_dir(directory)
        self.sequence = 0
        self._stamp = None

    def poll(self) -> Snapshot | None:
        """The newest snapshot if it is newer than the last one returned, else None."""
        try:
            st = os.stat(self.directory / LATEST_NAME)
        except (FileNotFoundError, NotADirectoryError):
            return None
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self._stamp:
            return None
        pointer = read_latest(self.directory)
        if pointer is None or pointer["sequence"] <= self.sequence:
            self._stamp = stamp
            return None
        snap = load_snapshot(self.directory, pointer)
        if snap is None:
            return None  # superseded while we looked; the next poll sees the newer pointer
        self.sequence = snap.sequence
        self._stamp = stamp
        return snap
