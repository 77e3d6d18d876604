"""Helpers shared by the ptychography tests: thread 'ranks' with an in-process
Allreduce, and relative differences over a region."""

from __future__ import annotations

import threading

import numpy as np


def rel_in_mask(a, b, mask):
    """``|a - b| / |b|`` over the pixels where ``mask`` is true."""
    return float(np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask]))


class ThreadComm:
    """In-process communicator: ranks are threads; Allreduce (SUM or MAX) through a barrier.

    SUM adds the ranks' buffers in *reverse* rank order, unlike one process, so
    a result that depends on the order of the additions shows up.
    """

    def __init__(self, rank, size, shared):
        self.rank, self.size, self._s = rank, size, shared

    def Allreduce(self, sendbuf, recvbuf, op=None):
        from mpi4py import MPI

        assert sendbuf is MPI.IN_PLACE
        s = self._s
        s["parts"][self.rank] = recvbuf.copy()
        s["barrier"].wait()
        if op == MPI.MAX:
            total = np.maximum.reduce(s["parts"])
        else:
            total = s["parts"][-1].copy()
            for part in s["parts"][-2::-1]:
                total += part
        s["barrier"].wait()
        recvbuf[...] = total

    def allreduce(self, value, op=None):
        buf = np.array([value], dtype=np.float64)
        self.Allreduce(__import__("mpi4py").MPI.IN_PLACE, buf, op=op)
        return float(buf[0])


def run_ranks(edges, fn):
    """Run ``fn(comm, slice)`` on len(edges) - 1 thread 'ranks'; returns their results."""
    size = len(edges) - 1
    shared = {"parts": [None] * size, "barrier": threading.Barrier(size)}
    out = [None] * size

    def rank(r):
        out[r] = fn(ThreadComm(r, size, shared), slice(edges[r], edges[r + 1]))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in out)
    return out
