"""Open a scan's reconstruction from a Tiled server (written by :mod:`sparkmpi.bluesky.tiled`).

``load_tiled_scan(uri, uid)`` returns the viewer's :class:`~.loaders.PtychoResult`:
the final ``object``, ``probe`` and ``errors`` when the scan is finished, else
its latest live snapshot (object only); ``summary`` holds the quality figures.
``sparkmpi view --tiled URI --scan UID`` serves it.
"""

from __future__ import annotations

import numpy as np

from .errors import ResultNotFoundError, UnreadableResultError
from .loaders import PtychoResult, ptycho_from_arrays

__all__ = ["load_tiled_scan", "save_for_viewer"]


def load_tiled_scan(uri: str, uid: str, *, api_key: str | None = None) -> PtychoResult:
    """The reconstruction of scan ``uid`` at the Tiled server ``uri`` (see the module docstring)."""
    try:
        from tiled.client import from_uri

        root = from_uri(uri, api_key=api_key)
    except Exception as exc:  # httpx / tiled errors: no server there
        raise UnreadableResultError(f"cannot reach the Tiled server at {uri}: {type(exc).__name__}: {exc}") from exc
    try:
        import dask

        with dask.config.set(scheduler="synchronous"):   # tiled reads through dask; no thread pool left behind
            return _read_scan(root, uri, uid)
    finally:
        root.context.close()


def _read_scan(root, uri: str, uid: str) -> PtychoResult:
    if uid not in root:
        raise ResultNotFoundError(f"the Tiled server at {uri} has no scan {uid!r} (it has {len(root)} entries)")
    scan = root[uid]
    meta = dict(scan.metadata)
    if meta.get("final"):
        arrays = {key: scan[key].read() for key in ("object", "probe", "errors") if key in scan}
        quality = dict(meta.get("quality") or {})
    else:
        names = sorted(scan["snapshots"]) if "snapshots" in scan else []
        if not names:
            raise ResultNotFoundError(f"scan {uid!r} at {uri} has neither a final result nor a snapshot yet")
        node = scan["snapshots"][names[-1]]
        arrays, quality = {"object": node.read()}, dict(node.metadata)
    result = ptycho_from_arrays(arrays, source=f"scan {uid} at {uri}")
    result.summary.update({"scan": uid, "frames": quality.get("frames_used"), "coverage": quality.get("coverage"),
                           "nrmse": quality.get("nrmse"), "exit_status": meta.get("exit_status"),
                           "final": bool(meta.get("final"))})
    return result


def save_for_viewer(result: PtychoResult, path) -> str:
    """Write ``result`` as a ptychography result NPZ the viewer opens; returns the path."""
    import json

    arrays = {"object": result.object, "errors": result.errors,
              "summary": np.asarray(json.dumps(result.summary, default=str))}
    if result.probe is not None:
        arrays["probe"] = result.probe
    np.savez(path, **arrays)
    return str(path)
