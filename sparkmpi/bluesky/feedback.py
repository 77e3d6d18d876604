"""The feedback loop's decisions: quality documents in, stop / extra-points decisions out (pure).

The live reconstruction advances by **checkpoints**: every ``checkpoint_frames``
frames of a scan (in frame-index order) are folded in and get a fixed number
of iterations, however the micro-batches were cut
(:class:`~sparkmpi.bluesky.live.LiveScans`).  At each checkpoint it
publishes a **quality document** (:func:`~.quality.quality_document`) to
``<docs>.quality``::

    {"scan": uid, "batch": n, "checkpoint": 10, "checkpoint_frames": 32, "final": false,
     "frames_used": 320, "points_planned": 512,
     "coverage": 0.65,                 # of the planned area, by probe footprints
     "fourier_error": 0.015,
     "fourier_error_trend": -0.10,     # relative change from the previous checkpoint's error
     "nrmse": 0.03 | null,             # over the measured region, when ground truth is known
     "last_event_time": t_event, "time": t_published,
     "missing_positions": [[y, x], ...]}   # planned points already passed whose frames never arrived (motor units)

Every figure in it is a function of the scan's first ``frames_used`` frames
and the iterations spent on them, so the same scan gives the same documents,
and the same decision, whether the consumer kept up or fell behind.

:class:`ConvergenceRule` (thresholds the user sets) reads them and decides:

**stop** the scan when, for ``patience`` checkpoint documents in a row,
``frames_used >= min_frames``, ``coverage >= min_coverage``, the Fourier
error trend is within ``error_tolerance`` (relative, either way), and, if ``max_nrmse`` is set and ground truth is known,
``nrmse <= max_nrmse``.  A Fermat spiral grows outwards, so ``min_coverage``
sets how much of the planned field is measured before a stop is allowed; the
error criterion keeps it from stopping while the measured part is still
settling.  The document of a scan's final reconstruction (``"final": true``,
after its stop) is not read by the rule.

**extra points** when planned points already passed left holes (frames that
never reached the reconstruction: an unreadable file, a rejected event): at
most ``max_extra_points`` of them are asked for again, once each.

Each decision carries its reason and the quality document that caused it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import InvalidArgument

__all__ = ["ConvergenceRule", "Decision", "FeedbackState"]


@dataclass(frozen=True)
class ConvergenceRule:
    """Thresholds of the stop rule (module docstring); defaults are the documented ones.

    ``error_tolerance`` bounds the relative change of the Fourier error from one checkpoint to the
    next (``checkpoint_frames`` frames apart, 32 by default); ``patience`` counts checkpoints.
    """

    min_coverage: float = 0.55
    error_tolerance: float = 0.15
    patience: int = 2
    min_frames: int = 32
    max_nrmse: float | None = None
    max_extra_points: int = 16

    def __post_init__(self):
        if not 0 <= self.min_coverage <= 1:
            raise InvalidArgument(f"min_coverage: expected a fraction in [0, 1], got {self.min_coverage!r}")
        if not self.error_tolerance >= 0:
            raise InvalidArgument(f"error_tolerance: expected >= 0, got {self.error_tolerance!r}")
        for name in ("patience", "min_frames", "max_extra_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "patience" else 0):
                raise InvalidArgument(f"{name}: expected an integer >= {1 if name == 'patience' else 0}, "
                                      f"got {value!r}")
        if self.max_nrmse is not None and not self.max_nrmse > 0:
            raise InvalidArgument(f"max_nrmse: expected > 0 or None, got {self.max_nrmse!r}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """What the agent decided about a scan, and why."""

    scan: str
    action: str            # "stop" or "extra_points"
    reason: str
    batch: int
    frames_used: int
    trigger_event_time: float | None
    decided_at: float
    positions: tuple = ()  # extra points, (y, x) motor units
    checkpoint: int | None = None
    quality: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["positions"] = [list(p) for p in self.positions]
        return out


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class FeedbackState:
    """Applies a :class:`ConvergenceRule` to the quality documents of any number of scans."""

    def __init__(self, rule: ConvergenceRule | None = None):
        self.rule = rule or ConvergenceRule()
        self._streak: dict[str, int] = {}
        self._stopped: set[str] = set()
        self._asked: dict[str, set] = {}
        self.decisions: list[Decision] = []

    def stopped(self, scan: str) -> bool:
        return scan in self._stopped

    def observe(self, quality: dict, now: float) -> list[Decision]:
        """One quality document in; the decisions it causes out (none, a stop, extra points)."""
        if not isinstance(quality, dict) or not isinstance(quality.get("scan"), str):
            raise InvalidArgument(f"quality: expected a quality document with a 'scan' uid, got {quality!r:.120}")
        scan = quality["scan"]
        if scan in self._stopped or quality.get("final"):
            return []
        rule = self.rule
        out = []
        frames = int(quality.get("frames_used") or 0)
        coverage = _finite(quality.get("coverage")) or 0.0
        trend = _finite(quality.get("fourier_error_trend"))
        nrmse = _finite(quality.get("nrmse"))
        failing = []
        if frames < rule.min_frames:
            failing.append(f"frames {frames} < {rule.min_frames}")
        if coverage < rule.min_coverage:
            failing.append(f"coverage {coverage:.2f} < {rule.min_coverage:.2f}")
        if trend is None or abs(trend) > rule.error_tolerance:
            failing.append("no error trend yet" if trend is None else
                           f"Fourier error changed {trend:+.3f} (> {rule.error_tolerance:g})")
        if rule.max_nrmse is not None and nrmse is not None and nrmse > rule.max_nrmse:
            failing.append(f"NRMSE {nrmse:.3f} > {rule.max_nrmse:g}")
        streak = self._streak[scan] = 0 if failing else self._streak.get(scan, 0) + 1
        common = dict(scan=scan, batch=int(quality.get("batch") or 0), checkpoint=quality.get("checkpoint"),
                      frames_used=frames,
                      trigger_event_time=_finite(quality.get("last_event_time")), decided_at=float(now),
                      quality=dict(quality))
        if streak >= rule.patience:
            self._stopped.add(scan)
            reason = (f"converged: {streak} checkpoints in a row with coverage {coverage:.2f} >= "
                      f"{rule.min_coverage:.2f}, Fourier error change {trend:+.4f} within +-{rule.error_tolerance:g}"
                      f", {frames} frames >= {rule.min_frames}"
                      + (f", NRMSE {nrmse:.4f} <= {rule.max_nrmse:g}" if rule.max_nrmse is not None and nrmse
                         is not None else ""))
            out.append(Decision(action="stop", reason=reason, **common))
        missing = quality.get("missing_positions") or []
        asked = self._asked.setdefault(scan, set())
        fresh = []
        for p in missing:
            key = (round(float(p[0]), 6), round(float(p[1]), 6))
            if key not in asked and len(asked) < rule.max_extra_points:
                asked.add(key)
                fresh.append(key)
        if fresh and not self.stopped(scan):
            out.append(Decision(action="extra_points", positions=tuple(fresh),
                                reason=f"{len(fresh)} planned point(s) already passed left holes (their frames "
                                       f"never reached the reconstruction); measuring them again", **common))
        self.decisions.extend(out)
        return out
