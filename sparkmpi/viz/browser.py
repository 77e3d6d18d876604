"""Drive the viewer from Debian's headless chromium: for the browser tests and the doc screenshots.

:class:`ViewerProcess` runs ``sparkmpi view ...`` as a child process and reads
its address; :class:`Browser` starts ``/usr/bin/chromium`` through Playwright
(``executable_path``; Playwright's own browser download is not used) with a
fresh profile directory.  Both always clean up: the viewer is stopped with
:func:`sparkmpi._proc.stop_process`; the browser is closed and its profile removed.

A trame page shows "Loading..." until its websocket has connected and the
server has sent the layout, so :func:`open_app` waits for an element of the
layout (``#viewer-kind``) before anything is captured.
"""

from __future__ import annotations

import io
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .._proc import stop_process, with_parent_death
from .errors import ViewerError
from ..errors import InvalidArgument, InvalidArgumentType

__all__ = ["CHROMIUM", "CHROMIUM_FLAGS", "ViewerProcess", "Browser", "open_app", "element_png",
           "picture_variance", "wait_for_picture", "press_slider", "chromium_pids"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic")


class ViewerProcess:
    """``sparkmpi view ARGS`` in a child process, as a context manager.

    Parameters
    ----------
    args : list of str
        Arguments after ``view`` (a path, or ``--live DIR``, options).
    timeout : float
        Seconds to wait for the address line on stdout.

    Attributes
    ----------
    url : str
        The address the viewer printed.
    seconds_to_address : float
        From process start to the address line.
    """

    def __init__(self, args, timeout: float = 60.0, env: dict | None = None):
        if isinstance(args, (str, bytes)) or not all(isinstance(a, (str, os.PathLike)) for a in args):
            raise InvalidArgumentType(f"args must be a list of str, got {args!r}")
        self.args = [str(a) for a in args]
        self.timeout = float(timeout)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.seconds_to_address = float("nan")
        self.started_at = float("nan")
        self._stderr = tempfile.TemporaryFile()

    def start(self) -> "ViewerProcess":
        cmd = [sys.executable, "-m", "sparkmpi.cli", "view", *self.args]
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(with_parent_death(cmd), stdout=subprocess.PIPE, stderr=self._stderr,
                                     env=self.env)
        deadline = self.started_at + self.timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.perf_counter()
                if left <= 0:
                    self.stop()
                    raise ViewerError(f"viewer {cmd[3:]} printed no address within {self.timeout:.0f} s; "
                                      f"stderr: {self.stderr()[-500:]}")
                if sel.select(timeout=min(left, 0.5)):
                    chunk = os.read(self.proc.stdout.fileno(), 1)
                    if not chunk:
                        rc = self.proc.wait()
                        raise ViewerError(f"viewer {cmd[3:]} exited with code {rc} before printing its "
                                          f"address; stderr: {self.stderr()[-500:]}")
                    line += chunk
        self.seconds_to_address = time.perf_counter() - self.started_at
        self.url = line.decode().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise ViewerError(f"viewer printed {self.url!r}, expected an http:// address")
        return self

    def stderr(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float = 5.0) -> int | None:
        """Terminate the viewer, kill it after ``grace`` seconds; returns its exit code."""
        if self.proc is None:
            return None
        stop_process(self.proc, grace)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> "ViewerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._stderr.close()


def chromium_pids(user_data_dir) -> list[int]:
    """Process ids whose command line names ``user_data_dir`` (to check that none is left)."""
    needle = f"--user-data-dir={user_data_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


class Browser:
    """Headless Debian chromium through Playwright, with a fresh profile; a context manager.

    Parameters
    ----------
    executable : str
        The chromium binary.
    viewport : (int, int)
        Page size in CSS pixels.
    """

    def __init__(self, executable: str = CHROMIUM, viewport=(1280, 860)):
        if len(viewport) != 2 or min(viewport) < 200:
            raise InvalidArgument(f"viewport must be (width, height) of at least 200 px, got {viewport!r}")
        self.executable = executable
        self.viewport = {"width": int(viewport[0]), "height": int(viewport[1])}
        self.user_data_dir = ""
        self._pw = None
        self.context = None

    def __enter__(self) -> "Browser":
        if not os.access(self.executable, os.X_OK):
            raise ViewerError(f"no browser at {self.executable}; install it with 'sh scripts/install-browser.sh' "
                              f"(as root)")
        from playwright.sync_api import sync_playwright

        self.user_data_dir = tempfile.mkdtemp(prefix="sparkmpi-chromium-")
        self._pw = sync_playwright().start()
        try:
            self.context = self._pw.chromium.launch_persistent_context(
                self.user_data_dir, executable_path=self.executable, headless=True,
                args=list(CHROMIUM_FLAGS), viewport=self.viewport)
        except BaseException:
            self.close()
            raise
        return self

    def new_page(self):
        return self.context.new_page()

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = None
        if self._pw is not None:
            self._pw.stop()
            self._pw = None
        if self.user_data_dir:
            shutil.rmtree(self.user_data_dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


def open_app(page, url: str, timeout: float = 30.0) -> float:
    """Load the viewer and wait until its layout arrived over the websocket; returns the seconds taken."""
    t0 = time.perf_counter()
    page.goto(url, timeout=timeout * 1000)
    page.wait_for_selector("#viewer-kind", state="visible", timeout=timeout * 1000)
    return time.perf_counter() - t0


def element_png(page, selector: str) -> bytes:
    """A screenshot (PNG) of the element ``selector`` as it is on screen."""
    return page.locator(selector).first.screenshot()


def picture_variance(png: bytes) -> float:
    """Variance of the grey levels (0-255) of a PNG: about 0 for a blank area."""
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(grey.var())


def wait_for_picture(page, selector: str, timeout: float = 20.0, min_variance: float = 20.0,
                     differs_from: bytes | None = None, interval: float = 0.2) -> bytes:
    """Poll screenshots of ``selector`` until it is not blank (and differs from ``differs_from``).

    Raises
    ------
    TimeoutError
        Naming the selector, the last variance and whether it changed.
    """
    deadline = time.perf_counter() + timeout
    variance, changed = float("nan"), False
    while True:
        png = b""
        if page.locator(selector).first.is_visible():
            png = element_png(page, selector)
            variance = picture_variance(png)
            changed = differs_from is None or _pixels(png) is None or not np.array_equal(
                _pixels(png), _pixels(differs_from))
            if variance >= min_variance and changed:
                return png
        if time.perf_counter() >= deadline:
            raise TimeoutError(f"{selector}: no picture with variance >= {min_variance}"
                               f"{' that differs from the previous one' if differs_from else ''} within "
                               f"{timeout:.0f} s (last variance {variance:.1f}, changed {changed})")
        page.wait_for_timeout(interval * 1000)


def _pixels(png: bytes):
    from PIL import Image

    try:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    except Exception:  # not a PNG
        return None


def press_slider(page, wrapper_selector: str, key: str = "ArrowRight", times: int = 1) -> None:
    """Move the slider inside ``wrapper_selector`` with the keyboard, as a person would."""
    thumb = page.locator(f"{wrapper_selector} [role=slider]").first
    thumb.focus()
    for _ in range(int(times)):
        page.keyboard.press(key)
