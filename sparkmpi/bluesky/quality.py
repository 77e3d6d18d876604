"""Quality of a live scan: coverage of the planned area, error trend, NRMSE (pure functions).

Coverage: the planned area is the union of the probe footprints (discs of
the probe's diameter) at the plan's points, in object pixels; coverage is the
fraction of it inside the footprints of the frames used so far.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument

__all__ = ["footprint_mask", "coverage", "error_trend", "missing_points", "measured_nrmse", "quality_document"]


def footprint_mask(positions, object_shape, frame_shape, diameter: float) -> np.ndarray:
    """Pixels within ``diameter / 2`` of a frame centre; ``positions`` (n, 2) top-left (row, col) pixels."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if not diameter > 0:
        raise InvalidArgument(f"diameter: expected pixels > 0, got {diameter!r}")
    h, w = int(frame_shape[0]), int(frame_shape[1])
    mask = np.zeros(tuple(int(v) for v in object_shape), dtype=bool)
    r = diameter / 2
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= r * r
    for row, col in np.rint(positions).astype(np.int64):
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + h, mask.shape[0]), min(col + w, mask.shape[1])
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] |= disc[r0 - row:r1 - row, c0 - col:c1 - col]
    return mask


def coverage(used, planned, object_shape, frame_shape, diameter: float) -> float:
    """Fraction of the planned footprint area covered by the used frames' footprints, in [0, 1]."""
    plan = footprint_mask(planned, object_shape, frame_shape, diameter)
    if not plan.any():
        return 0.0
    got = footprint_mask(used, object_shape, frame_shape, diameter)
    return float((got & plan).sum() / plan.sum())


#: Checkpoints averaged on each side of the error trend.  The errors are taken at fixed frame counts
#: (checkpoints, :class:`~sparkmpi.bluesky.live.LiveScans`) after a fixed number of iterations, so one
#: checkpoint against the one before is already a like-for-like comparison.
TREND_WINDOW = 1


def error_trend(errors, window: int = TREND_WINDOW) -> float | None:
    """Relative change of the mean of the last ``window`` Fourier errors against the ``window`` before.

    Negative: falling.  None until ``2 * window`` errors exist.
    """
    errors = [float(e) for e in errors if e is not None and np.isfinite(e)]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidArgument(f"window: expected an integer >= 1, got {window!r}")
    if len(errors) < 2 * window:
        return None
    before = float(np.mean(errors[-2 * window:-window]))
    if before == 0:
        return None
    return (float(np.mean(errors[-window:])) - before) / before


def missing_points(used, planned, passed: int, tolerance: float = 0.5) -> np.ndarray:
    """Planned points among the first ``passed`` with no used frame within ``tolerance`` pixels; (m, 2)."""
    planned = np.asarray(planned, dtype=np.float64).reshape(-1, 2)[:max(int(passed), 0)]
    used = np.asarray(used, dtype=np.float64).reshape(-1, 2)
    if planned.size == 0:
        return planned
    if used.size == 0:
        return planned
    d2 = ((planned[:, None, :] - used[None, :, :]) ** 2).sum(axis=-1).min(axis=1)
    return planned[d2 > tolerance ** 2]


def measured_nrmse(obj, truth, probe, positions, threshold: float = 0.1) -> float:
    """Object NRMSE (through :mod:`sparkmpi.ptycho.metrics`) over the region the given frames illuminate."""
    from ..ptycho import metrics

    positions = np.rint(np.asarray(positions, dtype=np.float64)).astype(np.int64).reshape(-1, 2)
    power = metrics.illumination(probe, positions, truth.shape)
    mask = power > threshold * float(power.max())
    return float(metrics.nrmse(obj, truth, mask))


def quality_document(*, scan: str, batch: int, frames_used: int, points_planned: int | None, coverage_value: float,
                     errors, nrmse: float | None, last_event_time: float | None, now: float,
                     missing_positions=(), checkpoint: int | None = None, checkpoint_frames: int | None = None
                     ) -> dict:
    """The quality document published at a checkpoint (fields in :mod:`sparkmpi.bluesky.feedback`).

    ``errors``: the Fourier error at each checkpoint so far; ``checkpoint`` None: the scan's final
    reconstruction (after its stop), which the stop rule does not read.
    """
    errors = [float(e) for e in errors]
    return {"scan": scan, "batch": int(batch), "checkpoint": None if checkpoint is None else int(checkpoint),
            "checkpoint_frames": None if checkpoint_frames is None else int(checkpoint_frames),
            "final": checkpoint is None, "frames_used": int(frames_used),
            "points_planned": None if points_planned is None else int(points_planned),
            "coverage": float(coverage_value), "fourier_error": errors[-1] if errors else None,
            "fourier_error_trend": error_trend(errors), "nrmse": None if nrmse is None else float(nrmse),
            "last_event_time": last_event_time, "time": float(now),
            "missing_positions": [[float(a), float(b)] for a, b in missing_positions]}
