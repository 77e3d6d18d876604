"""Simulated beamline hardware for a Bluesky ptychography scan: two motors and an area detector.

The detector is an ophyd :class:`~ophyd.Device` whose frames come from
sparkmpi's ptychography simulator (:mod:`sparkmpi.ptycho.simulate`): at each
trigger it reads the two motors' positions, converts them to object pixels
(:class:`PtychoScene`) and computes the far-field intensity of the probe on
the object there.  Like an area detector it either returns the image inline in
the event (``write_hdf5=False``) or writes it to an HDF5 file and returns a
datum id, with ``resource``/``datum`` documents saying where (``spec``
``"AD_HDF5"``, dataset ``/entry/data/data``, ``datum_kwargs`` ``{"point_number": k}``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument

__all__ = ["PtychoScene", "PtychoDetector", "make_motors", "HDF5_SPEC", "HDF5_DATASET"]

#: HDF5 refuses to open a file twice in one process with other modes: the detector (a RunEngine
#: thread) and the bridge (a reader in the same process, in tests and demos) take turns.
HDF5_LOCK = threading.Lock()

HDF5_SPEC = "AD_HDF5"
HDF5_DATASET = "/entry/data/data"


@dataclass
class PtychoScene:
    """The sample, the beam and how motor units map to object pixels.

    A frame at motor position ``(x, y)`` has its top-left corner at object
    pixel ``row = (y - origin[0]) / pixel_size``, ``col = (x - origin[1]) /
    pixel_size``.
    """

    object_true: np.ndarray      # complex64 (H, W)
    probe_true: np.ndarray       # complex64 (h, w)
    pixel_size: float            # motor units (um) per object pixel
    origin: tuple[float, float]  # (y0, x0) motor units
    probe_diameter: float        # pixels

    @property
    def object_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.object_true.shape)  # type: ignore[return-value]

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.probe_true.shape)  # type: ignore[return-value]

    @classmethod
    def for_scan(cls, x_range: float, y_range: float, *, x_center: float = 0.0, y_center: float = 0.0,
                 pixel_size: float = 0.1, frame_size: int = 64, margin: int = 2) -> "PtychoScene":
        """A scene whose object covers a scan of ``x_range`` by ``y_range`` motor units around the centre."""
        from ..ptycho.simulate import make_object, make_probe

        if not (pixel_size > 0 and x_range > 0 and y_range > 0):
            raise InvalidArgument(f"x_range, y_range, pixel_size: expected > 0, got {x_range!r}, {y_range!r}, "
                                  f"{pixel_size!r}")
        if int(frame_size) < 8:
            raise InvalidArgument(f"frame_size: expected >= 8 pixels, got {frame_size!r}")
        frame_size = int(frame_size)
        origin = (y_center - y_range / 2 - margin * pixel_size, x_center - x_range / 2 - margin * pixel_size)
        shape = (int(np.ceil(y_range / pixel_size)) + frame_size + 2 * margin + 1,
                 int(np.ceil(x_range / pixel_size)) + frame_size + 2 * margin + 1)
        diameter = 0.375 * frame_size
        return cls(make_object(shape), make_probe((frame_size, frame_size), kind="aperture", diameter=diameter),
                   float(pixel_size), (float(origin[0]), float(origin[1])), diameter)

    def pixel_of(self, x: float, y: float) -> tuple[int, int]:
        """Integer top-left (row, col) of the frame at motor position (x, y), clipped into the object."""
        h, w = self.frame_shape
        row = int(round((y - self.origin[0]) / self.pixel_size))
        col = int(round((x - self.origin[1]) / self.pixel_size))
        return (min(max(row, 0), self.object_shape[0] - h), min(max(col, 0), self.object_shape[1] - w))

    def frame_at(self, x: float, y: float) -> np.ndarray:
        """The noise-free far-field intensity (float32 (h, w)) of the frame at motor position (x, y)."""
        from ..ptycho.simulate import far_field

        pos = np.asarray([self.pixel_of(x, y)], dtype=np.int64)
        return far_field(self.probe_true, self.object_true, pos)[0]


def make_motors(x_name: str = "x", y_name: str = "y"):
    """Two ophyd simulated motors (:class:`ophyd.sim.SynAxis`), moving at once."""
    from ophyd.sim import SynAxis

    return SynAxis(name=x_name), SynAxis(name=y_name)


def _device_class():
    from ophyd import Device
    from ophyd.status import DeviceStatus

    class _PtychoDetector(Device):
        """See :func:`PtychoDetector`."""

        def __init__(self, scene: PtychoScene, x_motor, y_motor, *, name: str, exposure: float = 0.0,
                     write_hdf5: bool = False, directory=None, lose_frames=(), **kwargs):
            super().__init__(name=name, **kwargs)
            self.scene, self.x_motor, self.y_motor = scene, x_motor, y_motor
            self.exposure = float(exposure)
            self.write_hdf5 = bool(write_hdf5)
            self.directory = Path(directory) if directory is not None else None
            if self.write_hdf5 and self.directory is None:
                raise InvalidArgument("directory: an HDF5-writing detector needs a folder for its files")
            self._assets: deque = deque()
            self._value = None
            self._timestamp = time.time()
            self._file = None
            self._resource = None
            self._counter = None
            self._timers: list[threading.Timer] = []
            self.frames_taken = 0
            self.lose_frames = frozenset(int(k) for k in lose_frames)

        @property
        def image_key(self) -> str:
            return f"{self.name}_image"

        def describe(self):
            h, w = self.scene.frame_shape
            key = {"source": "SIM:sparkmpi.ptycho", "dtype": "array", "shape": [h, w], "dtype_numpy": "<f4"}
            if self.write_hdf5:
                key["external"] = "FILESTORE:"
            return {self.image_key: key}

        def read(self):
            return {self.image_key: {"value": self._value, "timestamp": self._timestamp}}

        def describe_configuration(self):
            return {}

        def read_configuration(self):
            return {}

        def stage(self):
            if self.write_hdf5:
                import h5py

                self.directory.mkdir(parents=True, exist_ok=True)
                name = f"{uuid.uuid4().hex}.h5"
                h, w = self.scene.frame_shape
                self._file = self.directory / name
                with HDF5_LOCK, h5py.File(self._file, "w") as f:
                    f.create_dataset(HDF5_DATASET, shape=(0, h, w), maxshape=(None, h, w), dtype="<f4",
                                     chunks=(1, h, w))
                self._resource = {"spec": HDF5_SPEC, "root": str(self.directory), "resource_path": name,
                                  "resource_kwargs": {"frame_per_point": 1}, "path_semantics": "posix",
                                  "uid": str(uuid.uuid4())}
                self._counter = itertools.count()
                self._assets.append(("resource", dict(self._resource)))
            return super().stage()

        def unstage(self):
            self._file = None
            for timer in self._timers:
                timer.join()
            self._timers = []
            return super().unstage()

        def trigger(self):
            x = float(self.x_motor.position)
            y = float(self.y_motor.position)
            frame = self.scene.frame_at(x, y)
            self._timestamp = time.time()
            if self.write_hdf5:
                import h5py

                if self.frames_taken in self.lose_frames:
                    # simulated fault: the frame never reaches the file; its datum names a point past
                    # the file's end, as a writer that dropped it would leave it
                    k = (1 << 30) + self.frames_taken
                else:
                    k = next(self._counter)
                    # open per frame: a reader (the bridge, maybe in this process) opens it between frames
                    with HDF5_LOCK, h5py.File(self._file, "a") as f:
                        data = f[HDF5_DATASET]
                        data.resize(k + 1, axis=0)
                        data[k] = frame
                datum_id = f"{self._resource['uid']}/{self.frames_taken}"
                self._assets.append(("datum", {"resource": self._resource["uid"], "datum_id": datum_id,
                                               "datum_kwargs": {"point_number": k}}))
                self._value = datum_id
            else:
                self._value = frame
            self.frames_taken += 1
            status = DeviceStatus(self)
            if self.exposure > 0:
                self._timers = [t for t in self._timers if t.is_alive()]
                timer = threading.Timer(self.exposure, status.set_finished)
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
            else:
                status.set_finished()
            return status

        def collect_asset_docs(self):
            while self._assets:
                yield self._assets.popleft()

    return _PtychoDetector


_CLASS = None


def PtychoDetector(scene: PtychoScene, x_motor, y_motor, *, name: str = "ptycho_det", exposure: float = 0.0,
                   write_hdf5: bool = False, directory=None, lose_frames=()):
    """A simulated ophyd area detector whose frames come from the ptychography simulator.

    Parameters
    ----------
    scene : PtychoScene
        Object, probe and the motor-to-pixel mapping.
    x_motor, y_motor : ophyd movables
        Read at each trigger (``.position``).
    name : str
        Device name; the image's data key is ``f"{name}_image"``.
    exposure : float
        Seconds each trigger takes (paces the scan like a real exposure).
    write_hdf5 : bool
        Write frames to an HDF5 file in ``directory`` (resource/datum
        documents; the event holds the datum id) instead of inline arrays.
    lose_frames : iterable of int
        Simulated fault (HDF5 only): the frames of these triggers (0-based,
        counted over the detector's life) never reach the file; their datums
        name points the file does not hold.
    """
    global _CLASS
    if _CLASS is None:
        _CLASS = _device_class()
    if not isinstance(scene, PtychoScene):
        raise InvalidArgument(f"scene: expected a PtychoScene, got {type(scene).__name__}")
    if not exposure >= 0:
        raise InvalidArgument(f"exposure: expected seconds >= 0, got {exposure!r}")
    lose_frames = tuple(lose_frames)
    if lose_frames and not write_hdf5:
        raise InvalidArgument("lose_frames: frames are lost on the way to the HDF5 file; needs write_hdf5=True")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in lose_frames):
        raise InvalidArgument(f"lose_frames: expected trigger numbers >= 0, got {lose_frames!r}")
    return _CLASS(scene, x_motor, y_motor, name=name, exposure=exposure, write_hdf5=write_hdf5,
                  directory=os.fspath(directory) if directory is not None else None, lose_frames=lose_frames)
