"""Screenshots of the viewer for the docs, and its time to first image.

    .venv/bin/python scripts/viewer_screenshots.py                # docs/viewer-tomo.png, docs/viewer-ptycho.png
    .venv/bin/python scripts/viewer_screenshots.py --measure 256  # time to first image on a 256^3 volume

The results are made with the project's own simulators and reconstructors
(a Shepp-Logan tilt series reconstructed by FBP; a simulated ptychography
scan reconstructed by DM), served by ``sparkmpi view`` in a child process
and captured by Debian's headless chromium through the same helper the
browser tests use (:mod:`sparkmpi.viz.browser`).

``--measure N`` writes an N^3 float32 TIFF, starts chromium first (as a
person's browser would already be open), then starts the clock, launches
``sparkmpi view``, opens the page as soon as the address is printed, and
stops the clock when the first slice picture and the first volume rendering
are on screen and not blank.  It prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparkmpi.viz.browser import Browser, ViewerProcess, open_app, wait_for_picture  # noqa: E402


def make_tomo(directory: Path, size: int) -> Path:
    from sparkmpi.tomo.algorithms import fbp
    from sparkmpi.tomo.output import write_volume_tiff
    from sparkmpi.tomo.simulate import simulate_tilt_series

    series, _ = simulate_tilt_series(size, 90, phantom="shepp-logan", noise=0.01, seed=0)
    volume = fbp(series.sinograms(), series.angles_deg)
    return write_volume_tiff(directory / "volume.tif", volume)


def make_ptycho(directory: Path) -> Path:
    from sparkmpi.ptycho.engines import reconstruct
    from sparkmpi.ptycho.output import write_outputs
    from sparkmpi.ptycho.simulate import simulate

    data = simulate(256, 64, seed=0)
    result = reconstruct(data, iterations=60)
    files = write_outputs(directory / "ptycho", result.object, result.probe, result.errors,
                          summary={"algorithm": "dm", "iterations": 60})
    return Path(files["arrays"])


def screenshot(browser: Browser, path: Path, out: Path, pictures: list[str]) -> None:
    page = browser.new_page()
    try:
        with ViewerProcess([path]) as viewer:
            open_app(page, viewer.url)
            for selector in pictures:
                wait_for_picture(page, selector, timeout=60)
            page.wait_for_timeout(500)  # let the last image decode
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
    finally:
        page.close()
    print(f"wrote {out}", file=sys.stderr)


def measure(browser: Browser, size: int, runs: int, directory: Path) -> list[dict]:
    from sparkmpi.tomo.output import write_volume_tiff
    from sparkmpi.tomo.simulate import make_phantom

    path = write_volume_tiff(directory / f"phantom{size}.tif", make_phantom("shepp-logan", size))
    rows = []
    for run in range(runs):
        page = browser.new_page()
        try:
            viewer = ViewerProcess([path])
            with viewer:
                t0 = viewer.started_at
                open_app(page, viewer.url)
                t_layout = time.perf_counter() - t0
                wait_for_picture(page, "#slice-z-img", timeout=60, interval=0.05)
                t_slice = time.perf_counter() - t0
                wait_for_picture(page, "#volume-view", timeout=60, interval=0.05)
                t_volume = time.perf_counter() - t0
            rows.append({"run": run + 1, "size": size, "address_s": round(viewer.seconds_to_address, 2),
                         "layout_s": round(t_layout, 2), "first_slice_s": round(t_slice, 2),
                         "first_volume_rendering_s": round(t_volume, 2)})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            page.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="directory for the PNG files")
    parser.add_argument("--size", type=int, default=128, help="volume side for the tomography screenshot")
    parser.add_argument("--measure", type=int, metavar="N", help="measure time to first image on N^3 instead")
    parser.add_argument("--runs", type=int, default=3, help="runs for --measure")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparkmpi-shots-") as tmp, Browser(viewport=(1280, 860)) as browser:
        tmp = Path(tmp)
        if args.measure:
            measure(browser, args.measure, args.runs, tmp)
            return 0
        out = Path(args.out)
        screenshot(browser, make_tomo(tmp, args.size), out / "viewer-tomo.png",
                   ["#volume-view", "#slice-z-img", "#slice-y-img", "#slice-x-img"])
        screenshot(browser, make_ptycho(tmp), out / "viewer-ptycho.png",
                   ["#phase-img", "#amplitude-img", "#probe-img", "#errors-img"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
