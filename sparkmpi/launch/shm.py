"""Removal of the shared-memory files MPICH leaves when ranks are killed.

MPICH's ch4 shared-memory transport names its segments
``/dev/shm/mpich_shm_<world id>_<node id>`` and ``mpich_vci_<...>``, where the
world id is the 32-bit FNV-1a hash of the kvsname (MPICH 5.0, verified with
the PyPI wheel) or, in later sources, of ``"<kvsname>-<init count>"`` with
the count starting at 1.  Ranks that finalise remove them; ranks that are
killed do not.  Knowing the job's kvsname we can compute the exact names and
remove only that job's files.
"""

from __future__ import annotations

import glob
import os

SHM_DIR = "/dev/shm"


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a hash (the ``HASH_FNV`` of MPICH's uthash)."""
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def world_ids(kvsname: str) -> list[int]:
    """MPICH's possible world ids for a job with key space ``kvsname``."""
    return [fnv1a_32(kvsname.encode()), fnv1a_32(f"{kvsname}-1".encode())]


def job_segments(kvsname: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Paths of the shared-memory files of the job ``kvsname`` that exist now."""
    found: list[str] = []
    for wid in world_ids(kvsname):
        for prefix in ("mpich_shm_", "mpich_vci_"):
            found += glob.glob(os.path.join(shm_dir, f"{prefix}{wid:x}_*"))
    return sorted(found)


def remove_job_segments(kvsname: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Remove the job's segments; returns the paths removed."""
    removed = []
    for path in job_segments(kvsname, shm_dir):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass  # another rank of the job on this node got there first
    return removed
