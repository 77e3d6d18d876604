"""Ranks' output written to the caller's stdout and stderr as whole lines.

One helper for a world's ranks (always ``[rank] ``-prefixed) and for
``sparkmpi exec`` / :func:`~sparkmpi.run_program` (prefixed with
``--prefix-rank``, as ``mpiexec -prepend-rank``): a rank's partial line is
held until its newline (or the rank's end), so lines of ranks never mix.
"""

from __future__ import annotations

import sys


class LineEcho:
    """Whole lines of each rank's ``stream`` (1: stdout, 2: stderr) to ``out`` / ``err``.

    Without ``out`` / ``err``, the process's ``sys.stdout`` / ``sys.stderr``
    at the time of writing (a notebook's or pytest's replacement included):
    the bytes as they came when it has a binary ``buffer``, else decoded.
    """

    def __init__(self, prefix_rank: bool = True, out=None, err=None):
        self.prefix_rank = prefix_rank
        self.targets = {1: out, 2: err}
        self.partial: dict[tuple[int, int], bytes] = {}

    def write(self, rank: int, stream: int, data: bytes) -> None:
        text = self.partial.pop((rank, stream), b"") + data
        *lines, rest = text.split(b"\n")
        if rest:
            self.partial[(rank, stream)] = rest
        if lines:
            self._emit(rank, stream, lines)

    def flush(self, rank: int) -> None:
        """Write what is left of ``rank``'s partial lines (it has ended)."""
        for stream in (1, 2):
            rest = self.partial.pop((rank, stream), b"")
            if rest:
                self._emit(rank, stream, [rest])

    def _emit(self, rank: int, stream: int, lines) -> None:
        prefix = f"[{rank}] ".encode() if self.prefix_rank else b""
        data = b"".join(prefix + line + b"\n" for line in lines)
        target = self.targets[stream]
        if target is None:
            text_target = sys.stdout if stream == 1 else sys.stderr
            target = getattr(text_target, "buffer", None)
            if target is None:
                text_target.write(data.decode("utf-8", "replace"))
                text_target.flush()
                return
            text_target.flush()  # what was printed before goes first
        target.write(data)
        target.flush()
