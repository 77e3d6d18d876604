"""End to end: ``sparkmpi view`` in a child process, looked at through Debian's headless chromium.

Each test starts a real trame/VTK viewer on a small saved result and asserts
on what a person sees: the page title, the controls, pictures that are not
blank, and pictures that change when a slider moves or a snapshot arrives.
Install the browser with ``sh scripts/install-browser.sh`` (``make test`` does).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparkmpi.viz import publish_snapshot
from sparkmpi.viz.browser import (
    CHROMIUM,
    Browser,
    ViewerProcess,
    chromium_pids,
    open_app,
    picture_variance,
    press_slider,
    wait_for_picture,
)
from sparkmpi.viz.browser import _pixels

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} missing: run 'sh scripts/install-browser.sh' as root"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A 48^3 Shepp-Logan volume (TIFF) and a small ptychography reconstruction (NPZ)."""
    from sparkmpi.ptycho.engines import reconstruct
    from sparkmpi.ptycho.output import write_outputs as write_ptycho
    from sparkmpi.ptycho.simulate import simulate
    from sparkmpi.tomo.output import write_volume_tiff
    from sparkmpi.tomo.simulate import make_phantom

    root = tmp_path_factory.mktemp("viewer")
    tif = write_volume_tiff(root / "phantom.tif", make_phantom("shepp-logan", 48))
    data = simulate(48, 32, seed=1)
    rec = reconstruct(data, iterations=20)
    out = write_ptycho(root / "ptycho", rec.object, rec.probe, rec.errors, summary={"algorithm": "dm"})
    return {"tif": tif, "ptycho": out["arrays"], "object": rec.object, "probe": rec.probe,
            "errors": rec.errors}


@pytest.fixture(scope="module")
def browser():
    import leaks

    with Browser() as b:
        profile = b.user_data_dir
        roots = set(chromium_pids(profile))
        assert roots, "chromium did not start with its own profile"
        leaks.ALLOWANCES.process_roots |= roots   # its renderers come and go with the pages
        try:
            yield b
        finally:
            leaks.ALLOWANCES.process_roots -= roots
    assert chromium_pids(profile) == [], "chromium processes left behind"
    assert not os.path.exists(profile)


@pytest.fixture
def page(browser):
    pg = browser.new_page()
    yield pg
    pg.close()


def _stopped(viewer: ViewerProcess) -> None:
    viewer.stop()
    assert viewer.returncode is not None, "viewer still running"


def _controls(page, ids):
    for element_id in ids:
        loc = page.locator(f"#{element_id}")
        assert loc.is_visible(), f"control #{element_id} not visible"
    return True


def test_volume_viewer(results, page):
    # --max-3d-size 32: the 3-D view gets the volume block-averaged by 2, the slices keep all 48
    with ViewerProcess([results["tif"], "--max-3d-size", "32"]) as viewer:
        open_app(page, viewer.url)
        assert page.title() == "sparkmpi view: phantom.tif"
        assert page.locator("#viewer-kind").inner_text().strip() == "tomography volume 48x48x48, 3-D view at 1/2"
        _controls(page, ["colormap-select", "level-slider", "width-slider", "opacity-slider",
                         "slice-z-slider", "slice-y-slider", "slice-x-slider"])
        for element_id in ("level-slider", "width-slider", "opacity-slider", "slice-z-slider"):
            assert page.locator(f"#{element_id} [role=slider]").count() == 1

        volume = wait_for_picture(page, "#volume-view")
        slice_z = wait_for_picture(page, "#slice-z-img")
        for axis in "yx":
            wait_for_picture(page, f"#slice-{axis}-img")

        # a slice slider moves: that slice's picture changes, the others do not need to
        before = page.locator("#slice-z-slider [role=slider]").get_attribute("aria-valuenow")
        press_slider(page, "#slice-z-slider", "ArrowRight", times=8)
        assert page.locator("#slice-z-slider [role=slider]").get_attribute("aria-valuenow") == str(int(before) + 8)
        wait_for_picture(page, "#slice-z-img", differs_from=slice_z)

        # the transfer function's level moves: the volume rendering changes
        press_slider(page, "#level-slider", "ArrowLeft", times=15)
        changed = wait_for_picture(page, "#volume-view", differs_from=volume)
        assert picture_variance(changed) > 20

        # another colour map: the slice turns from grey to colour
        grey = wait_for_picture(page, "#slice-x-img")
        page.locator("#colormap-select .v-field").click()
        page.get_by_role("option", name="viridis").click()
        coloured = wait_for_picture(page, "#slice-x-img", differs_from=grey)
        from io import BytesIO

        from PIL import Image

        rgb = np.asarray(Image.open(BytesIO(coloured)).convert("RGB")).astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 40, "slice still grey after choosing viridis"
    _stopped(viewer)


def test_ptycho_viewer(results, page):
    with ViewerProcess([results["ptycho"]]) as viewer:
        open_app(page, viewer.url)
        assert page.title() == "sparkmpi view: reconstruction.npz"
        assert page.locator("#viewer-kind").inner_text().strip() == "ptychography result"
        _controls(page, ["colormap-select", "contrast-slider"])
        info = page.locator("#info-text").inner_text()
        assert "object 56x56" in info and "20 iterations" in info and "algorithm dm" in info
        for title in ("Object phase", "Object amplitude", "Probe amplitude", "Error per iteration"):
            assert page.get_by_text(title, exact=True).is_visible()
        phase = wait_for_picture(page, "#phase-img")
        for element_id in ("amplitude-img", "probe-img", "errors-img"):
            wait_for_picture(page, f"#{element_id}")
        press_slider(page, "#contrast-slider", "ArrowRight", times=10)
        wait_for_picture(page, "#phase-img", differs_from=phase)
    _stopped(viewer)


def test_live_viewer_follows_snapshots(results, page, tmp_path):
    live = tmp_path / "live"  # the pipeline has not created it yet
    obj, errors = results["object"], results["errors"]
    with ViewerProcess(["--live", live]) as viewer:
        open_app(page, viewer.url)
        assert page.title() == f"sparkmpi view (live): {live}"
        status = page.locator("#live-status")
        assert "waiting for the first snapshot" in status.inner_text()
        assert not page.locator("#phase-img").is_visible()

        half = obj.copy()
        half[:, obj.shape[1] // 2:] = 1.0  # as if only half the scan had arrived
        publish_snapshot(live, {"object": half, "errors": errors[:5]}, {"batch": 1, "frames": 24})
        page.wait_for_function("document.querySelector('#live-status').innerText.includes('snapshot #1')",
                               timeout=15000)
        assert "batch 1" in status.inner_text() and "frames 24" in status.inner_text()
        first = wait_for_picture(page, "#phase-img")
        first_errors = wait_for_picture(page, "#errors-img")
        assert "5 iterations" in page.locator("#info-text").inner_text()

        publish_snapshot(live, {"object": obj, "probe": results["probe"], "errors": errors},
                         {"batch": 2, "frames": 48})
        page.wait_for_function("document.querySelector('#live-status').innerText.includes('snapshot #2')",
                               timeout=15000)
        wait_for_picture(page, "#phase-img", differs_from=first)
        wait_for_picture(page, "#errors-img", differs_from=first_errors)
        wait_for_picture(page, "#probe-img")
        assert "20 iterations" in page.locator("#info-text").inner_text()
        shown = wait_for_picture(page, "#phase-img")

        # Bad input as a person sees it: a truncated snapshot, then one without an object.  The page
        # says what is wrong and keeps the last good pictures; the next good snapshot replaces them.
        good = (live / "snapshot-000002.npz").read_bytes()
        (live / "snapshot-000003.npz").write_bytes(good[: len(good) // 3])
        pointer = dict(json.loads((live / "latest.json").read_text()), sequence=3, file="snapshot-000003.npz")
        (live / "latest.tmp").write_text(json.dumps(pointer))
        os.replace(live / "latest.tmp", live / "latest.json")
        page.wait_for_function("document.querySelector('#live-status').innerText.includes('bad snapshot')",
                               timeout=15000)
        assert "snapshot-000003.npz' is unreadable" in status.inner_text(), status.inner_text()
        assert page.locator("#phase-img").is_visible()
        assert np.array_equal(_pixels(wait_for_picture(page, "#phase-img")), _pixels(shown))
        publish_snapshot(live, {"probe": results["probe"]}, {"batch": 4})
        page.wait_for_function("document.querySelector('#live-status').innerText.includes(\"expected 'object'\")",
                               timeout=15000)
        publish_snapshot(live, {"object": half, "errors": errors}, {"batch": 5})
        page.wait_for_function("document.querySelector('#live-status').innerText.includes('snapshot #5')",
                               timeout=15000)
        wait_for_picture(page, "#phase-img", differs_from=shown)
    _stopped(viewer)
