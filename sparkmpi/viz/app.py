"""The web viewer: a trame server with VTK rendering off-screen; ``serve`` blocks until stopped.

Layouts
-------
volume   a 2x2 grid: VTK volume rendering (remote view: the server renders
         through EGL and sends images), and the Z, Y, X slices with one slider
         each; a drawer with the colour map, window level/width and maximum
         opacity of the transfer function.
ptycho   object phase, object amplitude, probe amplitude and the error curve;
         a drawer with the colour map and a contrast clip.
live     the ptycho layout fed by :class:`~sparkmpi.viz.snapshots.SnapshotPoller`
         every ``poll_interval`` seconds, from a task on the server's event
         loop (the file is read in a worker thread).

Element ids (``volume-view``, ``level-slider``, ``slice-z-img``, ...) are part
of the interface: the browser tests find the controls by them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PortInUseError, SnapshotError, ViewerError, WrongKindError
from .images import COLORMAPS, downsample
from .loaders import detect_kind, load_ptycho, load_volume, ptycho_from_arrays
from .models import AXES, PtychoModel, VolumeModel
from .snapshots import SnapshotPoller
from ..errors import InvalidArgument

__all__ = ["serve", "check_port", "DEFAULT_MAX_3D_SIZE"]

DEFAULT_MAX_3D_SIZE = 128
PANEL_HEIGHT = "calc(50vh - 140px)"


def check_port(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` if ``host:port`` cannot be bound (port 0 always can)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidArgument(f"port must be an integer in [0, 65535], got {port!r}")
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"port {port} on {host} is in use; pick another with --port, or leave "
                                     f"it out for a free one") from None
            raise ViewerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _use_egl_without_display() -> None:
    # VTK tries X first and logs a warning when there is no display
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


# ----------------------------------------------------------------- VTK scene
class VolumeScene:
    """VTK volume rendering of a (downsampled) volume with a window/colour-map transfer function."""

    def __init__(self, volume: np.ndarray, spacing: float = 1.0):
        _use_egl_without_display()
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPiecewiseFunction
        from vtkmodules.vtkFiltersModeling import vtkOutlineFilter
        from vtkmodules.vtkInteractionStyle import vtkInteractorStyleTrackballCamera
        from vtkmodules.vtkRenderingCore import (
            vtkActor,
            vtkColorTransferFunction,
            vtkPolyDataMapper,
            vtkRenderer,
            vtkRenderWindow,
            vtkRenderWindowInteractor,
            vtkVolume,
            vtkVolumeProperty,
        )
        from vtkmodules.vtkRenderingVolumeOpenGL2 import vtkSmartVolumeMapper
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL factories)

        nz, ny, nx = volume.shape
        image = vtkImageData()
        image.SetDimensions(nx, ny, nz)
        image.SetSpacing(spacing, spacing, spacing)
        image.GetPointData().SetScalars(numpy_to_vtk(volume.ravel(), deep=True))
        self.color = vtkColorTransferFunction()
        self.opacity = vtkPiecewiseFunction()
        prop = vtkVolumeProperty()
        prop.SetColor(self.color)
        prop.SetScalarOpacity(self.opacity)
        prop.SetInterpolationTypeToLinear()
        mapper = vtkSmartVolumeMapper()
        mapper.SetInputData(image)
        self.volume = vtkVolume()
        self.volume.SetMapper(mapper)
        self.volume.SetProperty(prop)
        outline = vtkOutlineFilter()
        outline.SetInputData(image)
        outline_mapper = vtkPolyDataMapper()
        outline_mapper.SetInputConnection(outline.GetOutputPort())
        outline_actor = vtkActor()
        outline_actor.SetMapper(outline_mapper)
        outline_actor.GetProperty().SetColor(0.8, 0.8, 0.8)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.10, 0.11, 0.14)
        self.renderer.AddVolume(self.volume)
        self.renderer.AddActor(outline_actor)
        self.render_window = vtkRenderWindow()
        self.render_window.SetOffScreenRendering(1)
        self.render_window.AddRenderer(self.renderer)
        self.interactor = vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)
        self.interactor.SetInteractorStyle(vtkInteractorStyleTrackballCamera())
        camera = self.renderer.GetActiveCamera()
        camera.Elevation(25)
        camera.Azimuth(35)
        self.renderer.ResetCamera()

    def set_transfer(self, lo: float, hi: float, cmap: str, max_opacity: float) -> None:
        """Colour ``cmap`` from ``lo`` to ``hi``; opacity 0 below ``lo`` rising to ``max_opacity`` at ``hi``."""
        if cmap not in COLORMAPS:
            raise InvalidArgument(f"cmap must be one of {sorted(COLORMAPS)}, got {cmap!r}")
        if hi <= lo:
            hi = lo + 1e-6
        self.color.RemoveAllPoints()
        for x, r, g, b in COLORMAPS[cmap]:
            self.color.AddRGBPoint(lo + x * (hi - lo), r, g, b)
        self.opacity.RemoveAllPoints()
        self.opacity.AddPoint(lo, 0.0)
        self.opacity.AddPoint(hi, float(max_opacity))


# ---------------------------------------------------------------- UI helpers
def _slider(state_name, label, element_id, **kwargs):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v3

    with html.Div(id=element_id, classes="px-2"):
        with v3.VSlider(v_model=(state_name,), label=label, hide_details=True, density="compact", **kwargs):
            with v3.Template(v_slot_append=True):
                html.Span(f"{{{{ {state_name} }}}}", classes="text-body-2 text-right",
                          style="min-width: 2.6em;")


def _colormap_select(default: str):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v3

    with html.Div(id="colormap-select", classes="px-2 pb-2"):
        v3.VSelect(v_model=("cmap", default), items=("colormaps", list(COLORMAPS)), label="Colour map",
                   hide_details=True, density="compact")


@contextmanager
def _image_panel(title: str, src_state: str, element_id: str, cols: int = 6, height: str = PANEL_HEIGHT):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v3

    with v3.VCol(cols=cols, classes="pa-1"):
        with v3.VCard(classes="fill-height", variant="outlined"):
            v3.VCardTitle(title, classes="text-subtitle-1 py-1")
            with html.Div(style=f"height: {height}; background: #1a1c24;", classes="d-flex"):
                html.Img(id=element_id, src=(src_state, ""), v_show=(src_state,),
                         style="width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;")
                html.Div(f"{{{{ {src_state} ? '' : 'nothing to show yet' }}}}",
                         classes="ma-auto text-grey", v_show=(f"!{src_state}",))
            yield


# ----------------------------------------------------------------- layouts
def _build_volume(server, name: str, volume: np.ndarray, max_3d_size: int) -> None:
    from trame.ui.vuetify3 import SinglePageWithDrawerLayout
    from trame.widgets import html
    from trame.widgets import vtk as vtk_widgets
    from trame.widgets import vuetify3 as v3

    state, ctrl = server.state, server.controller
    model = VolumeModel(volume)
    small, factor = downsample(model.volume, max_3d_size)
    scene = VolumeScene(small, spacing=float(factor))
    nz, ny, nx = model.shape
    state.trame__title = f"sparkmpi view: {name}"
    state.update({"cmap": "grey", "level": 0.55, "width": 0.9, "opacity": 0.35,
                  "slice_z": nz // 2, "slice_y": ny // 2, "slice_x": nx // 2,
                  "slice_z_src": "", "slice_y_src": "", "slice_x_src": ""})

    def refresh_slices(*axes):
        for axis in axes or tuple(AXES):
            state[f"slice_{axis}_src"] = model.slice_url(axis, int(state[f"slice_{axis}"]), float(state.level),
                                                         float(state.width), state.cmap)

    def refresh_transfer():
        lo, hi = model.window(float(state.level), float(state.width))
        scene.set_transfer(lo, hi, state.cmap, float(state.opacity))

    refresh_transfer()
    refresh_slices()
    views = []

    @state.change("cmap", "level", "width", "opacity")
    def _on_transfer(**_):
        refresh_transfer()
        for view in views:
            view.update()

    @state.change("cmap", "level", "width")
    def _on_window(**_):
        refresh_slices()

    for axis in AXES:
        state.change(f"slice_{axis}")(lambda axis=axis, **_: refresh_slices(axis))

    shape_text = f"{nz}x{ny}x{nx}" + (f", 3-D view at 1/{factor}" if factor > 1 else "")
    with SinglePageWithDrawerLayout(server, width=280) as layout:
        layout.title.set_text(f"sparkmpi view: {name}")
        with layout.toolbar:
            v3.VSpacer()
            html.Div(f"tomography volume {shape_text}", id="viewer-kind", classes="text-body-2 mr-4")
        with layout.drawer:
            html.Div("Transfer function", classes="text-subtitle-2 px-3 pt-3")
            _colormap_select("grey")
            _slider("level", "Level", "level-slider", min=0.0, max=1.0, step=0.01)
            _slider("width", "Width", "width-slider", min=0.02, max=2.0, step=0.02)
            _slider("opacity", "Opacity", "opacity-slider", min=0.0, max=1.0, step=0.01)
            html.Div("Level and width are fractions of the 0.5-99.5 percentile range "
                     f"[{model.data_range[0]:.4g}, {model.data_range[1]:.4g}]; they window the slices too.",
                     classes="text-caption px-3 pt-2")
        with layout.content:
            with v3.VContainer(fluid=True, classes="pa-1"):
                with v3.VRow(no_gutters=True):
                    with v3.VCol(cols=6, classes="pa-1"):
                        with v3.VCard(variant="outlined"):
                            v3.VCardTitle("Volume rendering", classes="text-subtitle-1 py-1")
                            with html.Div(style=f"height: calc({PANEL_HEIGHT} + 40px); position: relative;"):
                                view = vtk_widgets.VtkRemoteView(scene.render_window, id="volume-view",
                                                                 interactive_ratio=0.5, interactive_quality=60,
                                                                 still_quality=90)
                                views.append(view)
                                ctrl.view_update = view.update
                    for axis, label in (("z", "Z"), ("y", "Y"), ("x", "X")):
                        n = model.shape[AXES[axis]]
                        with _image_panel(f"{label} slice", f"slice_{axis}_src", f"slice-{axis}-img"):
                            _slider(f"slice_{axis}", f"{label} (0-{n - 1})", f"slice-{axis}-slider",
                                    min=0, max=n - 1, step=1)


def _build_ptycho(server, name: str, result, live_dir: Path | None, poll_interval: float) -> None:
    from trame.app import asynchronous
    from trame.ui.vuetify3 import SinglePageWithDrawerLayout
    from trame.widgets import html
    from trame.widgets import vuetify3 as v3

    state, ctrl = server.state, server.controller
    holder = {"model": PtychoModel(result) if result is not None else None}
    title = f"sparkmpi view: {name}" if live_dir is None else f"sparkmpi view (live): {name}"
    state.trame__title = title
    state.update({"cmap": "grey", "clip": 0.5, "phase_src": "", "amplitude_src": "", "probe_src": "",
                  "errors_src": "", "info": "", "live_status": ""})

    def refresh():
        model = holder["model"]
        if model is None:
            return
        clip, cmap = float(state.clip), state.cmap
        state.phase_src = model.phase_url(clip, cmap)
        state.amplitude_src = model.amplitude_url(clip, cmap)
        state.probe_src = model.probe_url(cmap)
        state.errors_src = model.errors_url()
        state.info = model.info()

    refresh()

    @state.change("cmap", "clip")
    def _on_display(**_):
        refresh()

    if live_dir is not None:
        state.live_status = f"waiting for the first snapshot in {live_dir}"
        poller = SnapshotPoller(live_dir)

        async def poll_forever():
            while True:
                try:
                    snap = await asyncio.to_thread(poller.poll)
                    if snap is not None:
                        model = PtychoModel(ptycho_from_arrays(snap.arrays, source=f"snapshot {snap.path.name}"))
                        meta = " · ".join(f"{k} {v}" for k, v in sorted(snap.meta.items())
                                          if isinstance(v, (int, float, str)))
                        with state:
                            holder["model"] = model
                            refresh()
                            state.live_status = f"snapshot #{snap.sequence}" + (f" · {meta}" if meta else "")
                except (SnapshotError, WrongKindError) as exc:
                    with state:
                        state.live_status = f"bad snapshot: {exc}"
                await asyncio.sleep(poll_interval)

        ctrl.on_server_ready.add(lambda **_: asynchronous.create_task(poll_forever()))

    with SinglePageWithDrawerLayout(server, width=260) as layout:
        layout.title.set_text(title)
        with layout.toolbar:
            v3.VSpacer()
            html.Div("ptychography result" if live_dir is None else "live ptychography", id="viewer-kind",
                     classes="text-body-2 mr-4")
        with layout.drawer:
            html.Div("Display", classes="text-subtitle-2 px-3 pt-3")
            _colormap_select("grey")
            _slider("clip", "Clip %", "contrast-slider", min=0.0, max=20.0, step=0.5)
            html.Div("Phase and amplitude are stretched between the clip and 100 - clip percentiles of the "
                     "central half of the object; the global phase is removed.", classes="text-caption px-3 pt-2")
        tall = "calc(50vh - 120px)"
        with layout.content:
            with v3.VContainer(fluid=True, classes="pa-1"):
                html.Div("{{ info }}", id="info-text", classes="text-body-2 px-2")
                if live_dir is not None:
                    html.Div("{{ live_status }}", id="live-status", classes="text-body-2 px-2 font-weight-bold")
                with v3.VRow(no_gutters=True):
                    with _image_panel("Object phase", "phase_src", "phase-img", height=tall):
                        pass
                    with _image_panel("Object amplitude", "amplitude_src", "amplitude-img", height=tall):
                        pass
                    with _image_panel("Probe amplitude", "probe_src", "probe-img", height=tall):
                        pass
                    with _image_panel("Error per iteration", "errors_src", "errors-img", height=tall):
                        pass


# ------------------------------------------------------------------- serve
def serve(path=None, *, live=None, port: int = 0, host: str = "127.0.0.1",
          max_3d_size: int = DEFAULT_MAX_3D_SIZE, poll_interval: float = 0.5,
          on_ready: Callable[[str, str], None] | None = None) -> None:
    """Serve the viewer for a result file or a live snapshot directory; blocks until stopped.

    Parameters
    ----------
    path : str or Path, optional
        A volume (TIFF, .vti, .npy) or a ptychography result NPZ.
    live : str or Path, optional
        A snapshot directory (see :mod:`sparkmpi.viz.snapshots`); it may not
        exist yet.  Exactly one of ``path`` and ``live`` is given.
    port : int
        0 for a free port.
    host : str
        Address to listen on.
    max_3d_size : int
        Largest axis of the volume rendered in 3-D (block-averaged down to it).
    poll_interval : float
        Seconds between looks at the snapshot directory.
    on_ready : callable(url, kind), optional
        Called once the server listens.

    Raises
    ------
    ResultNotFoundError, UnreadableResultError, WrongKindError, PortInUseError
    """
    if (path is None) == (live is None):
        raise InvalidArgument(f"give exactly one of path and live, got path={path!r}, live={live!r}")
    if not isinstance(host, str) or not host:
        raise InvalidArgument(f"host must be a non-empty string, got {host!r}")
    if not isinstance(max_3d_size, int) or max_3d_size < 16:
        raise InvalidArgument(f"max_3d_size must be an integer >= 16, got {max_3d_size!r}")
    if not (isinstance(poll_interval, (int, float)) and 0.05 <= poll_interval <= 60):
        raise InvalidArgument(f"poll_interval must be between 0.05 and 60 seconds, got {poll_interval!r}")
    if live is not None:
        live = Path(live)
        if live.exists() and not live.is_dir():
            raise WrongKindError(f"live snapshot location '{live}' is a file, expected a directory")
        kind, name = "live", str(live)
    else:
        kind, name = detect_kind(path), Path(path).name
    check_port(host, port)
    data = None
    if kind == "volume":
        data = load_volume(path)
    elif kind == "ptycho":
        data = load_ptycho(path)

    from trame.app import get_server

    server = get_server("sparkmpi-view", client_type="vue3")
    if kind == "volume":
        _build_volume(server, name, data, max_3d_size)
    else:
        _build_ptycho(server, name, data, live, float(poll_interval))

    def ready(**_):
        if on_ready is not None:
            on_ready(f"http://{host}:{server.port}/", kind)

    server.controller.on_server_ready.add(ready)
    argv = sys.argv
    sys.argv = argv[:1]  # trame parses sys.argv for its own options; ours were parsed already
    try:
        server.start(port=port, host=host, open_browser=False, show_connection_info=False,
                     disable_logging=True, timeout=0)
    finally:
        sys.argv = argv
