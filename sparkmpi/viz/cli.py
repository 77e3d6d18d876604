"""``sparkmpi view PATH`` and ``sparkmpi view --live DIR``: a thin layer over :func:`sparkmpi.viz.serve`.

The address goes to stdout as one line (``http://127.0.0.1:PORT/``), notes to
stderr; the command never opens a browser.  Stop it with Ctrl+C.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import UsageError

__all__ = ["register"]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 16, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected an integer >= 16, got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "view", help="web viewer for a reconstruction (volume or ptychography), or live snapshots",
        description="Serve a web viewer on 127.0.0.1 and print its address; open it in a browser.")
    parser.add_argument("path", nargs="?", metavar="PATH",
                        help="a volume (multi-page TIFF, .vti, .npy), a ptychography result NPZ, or an output "
                             "folder holding them (demo-output/)")
    parser.add_argument("--live", metavar="DIR",
                        help="follow the snapshots a running reconstruction publishes into DIR")
    parser.add_argument("--tiled", metavar="URI", help="open a scan from this Tiled server (with --scan UID)")
    parser.add_argument("--scan", metavar="UID", help="the scan's start uid on the Tiled server")
    parser.add_argument("--api-key", default=None, help="the Tiled server's API key")
    parser.add_argument("--port", type=_port, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--max-3d-size", type=_size, default=128,
                        help="largest axis of the volume rendered in 3-D; bigger volumes are block-averaged")
    parser.set_defaults(func=_view)


def _view(args) -> int:
    from .app import serve
    from .loaders import results_in

    if getattr(args, "tiled", None):
        import tempfile

        from .tiled_loader import load_tiled_scan, save_for_viewer

        if not args.scan or args.path or args.live:
            raise UsageError("--tiled URI needs --scan UID, and no PATH or --live")
        args.path = save_for_viewer(load_tiled_scan(args.tiled, args.scan, api_key=args.api_key),
                                    Path(tempfile.mkdtemp(prefix="sparkmpi-tiled-")) / f"{args.scan}.npz")
    if (args.path is None) == (args.live is None):
        raise UsageError("give either PATH or --live DIR (exactly one)")
    t0 = time.perf_counter()
    path = args.path
    if path is not None and Path(path).is_dir():
        if (Path(path) / "latest.json").exists():  # a live snapshot folder
            path, args.live = None, path
        else:
            found = results_in(path)
            path = str(found[0])
            if len(found) > 1:
                print(f"sparkmpi view: '{args.path}' holds {len(found)} results; showing {found[0]} "
                      f"(the others: {', '.join(map(str, found[1:]))})", file=sys.stderr, flush=True)

    def ready(url: str, kind: str) -> None:
        print(url, flush=True)
        what = args.live if args.live is not None else path
        print(f"sparkmpi view: serving {kind} '{what}' at {url} (ready in {time.perf_counter() - t0:.2f} s); "
              f"Ctrl+C stops", file=sys.stderr, flush=True)

    serve(path, live=args.live, port=args.port, host=args.host, max_3d_size=args.max_3d_size,
          on_ready=ready)
    return 0
