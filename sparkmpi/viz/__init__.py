"""Web viewer for sparkmpi's reconstructions (trame + VTK) and the live snapshot contract.

``sparkmpi view PATH`` serves a tomography volume or a ptychography result;
``sparkmpi view --live DIR`` follows the snapshots a streaming reconstruction
publishes with :func:`publish_snapshot`.  The web server and VTK are imported
only when :func:`serve` runs.
"""

from .errors import (
    PortInUseError,
    ResultNotFoundError,
    SnapshotError,
    UnreadableResultError,
    ViewerError,
    WrongKindError,
)
from .loaders import detect_kind, load_ptycho, load_volume
from .snapshots import SnapshotPoller, publish_snapshot, read_latest


def serve(*args, **kwargs):
    """Serve the viewer; see :func:`sparkmpi.viz.app.serve`."""
    from .app import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["serve", "publish_snapshot", "read_latest", "SnapshotPoller", "detect_kind", "load_volume",
           "load_ptycho", "ViewerError", "ResultNotFoundError", "UnreadableResultError", "WrongKindError",
           "PortInUseError", "SnapshotError"]
