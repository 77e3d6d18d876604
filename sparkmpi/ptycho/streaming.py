"""Streaming reconstruction: frames arrive in micro-batches while the scan runs.

:class:`StreamingReconstruction` holds a running object, probe and one exit
wave per frame received so far.  :meth:`~StreamingReconstruction.add_frames`
appends a micro-batch (their exit waves start as ``P O_j`` under the current
estimate, so earlier work is kept) and :meth:`~StreamingReconstruction.iterate`
runs ``k`` iterations of the chosen engine over all frames so far.  A usable
image therefore exists after the first batch, and it sharpens as the scan
covers more of the object.

Under MPI, give ``comm``: each rank adds its own frames, sums are combined as
in :func:`sparkmpi.ptycho.reconstruct_rank`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ._validate import check_frames, check_probe, shape2
from .engines import ReconstructionState, Result, initial_probe, reconstruct_frames
from .errors import FrameMismatchError, PtychoInputError
from .options import Options


class StreamingReconstruction:
    """A reconstruction that accepts new frames between rounds of iterations.

    Parameters
    ----------
    object_shape : (int, int)
        Shape of the whole object (the full scan's extent), pixels.
    frame_shape : (int, int)
        Shape ``(H, W)`` of each diffraction pattern.
    probe : ndarray (H, W), optional
        Initial probe; default :func:`initial_probe` of the first batch.
    comm : mpi4py-like communicator, optional
    options : Options, optional
        The algorithm and its settings; ``iterations`` comes with each
        :meth:`iterate` instead.
    **settings
        Fields of :class:`~sparkmpi.ptycho.Options` that replace those of
        ``options`` (``algorithm``, ``backend``, ``probe_update_start``
        (counted over all rounds), ``beta``, ``regularization``, ``threads``,
        ``kernels``, ``refine_probe``, ``pin_probe_ramp``).

    Attributes
    ----------
    history : list of dict
        One entry per :meth:`iterate`: ``frames`` (received so far, this
        rank), ``iteration`` (total) and ``fourier_error``.
    """

    def __init__(self, object_shape, frame_shape, *, probe=None, comm=None,
                 options: Options | None = None, **settings):
        self.object_shape = shape2(object_shape, "object_shape")
        self.frame_shape = shape2(frame_shape, "frame_shape")
        if "iterations" in settings:
            raise PtychoInputError("iterations is given to iterate(), not to "
                                   "StreamingReconstruction()")
        self.options = Options.of(options, **settings)
        if probe is not None:   # (H, W), or (M, H, W) incoherent modes
            probe = check_probe(probe, self.frame_shape, self.options.probe_modes)
        self.comm = comm
        self._probe0 = probe
        self._intensities: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []   # exit waves of frames not yet iterated
        self._state: ReconstructionState | None = None
        self._result: Result | None = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ frames
    @property
    def n_frames(self) -> int:
        return int(sum(len(a) for a in self._intensities))

    def add_frames(self, intensities, positions) -> int:
        """Append a micro-batch of frames; returns the number of frames held.

        Parameters
        ----------
        intensities : ndarray, shape (n, H, W)
            Zero frequency at the frame centre.
        positions : ndarray, int, shape (n, 2)
            Top-left offsets in the whole object.

        Raises
        ------
        PtychoInputError
            On the same bad inputs as :func:`sparkmpi.ptycho.reconstruct`, or
            frames of another shape than ``frame_shape``.
        """
        arr, pos, _ = check_frames(intensities, positions, self.object_shape)
        if arr.shape[1:] != self.frame_shape:
            raise FrameMismatchError(f"intensities frames have shape {arr.shape[1:]}, expected "
                                     f"frame_shape {self.frame_shape}")
        if self._probe0 is None:
            self._probe0 = check_probe(initial_probe(arr, self.comm), self.frame_shape,
                                       self.options.probe_modes)
        probe, obj = self._current_probe_object()
        from numpy.lib.stride_tricks import sliding_window_view

        frames = sliding_window_view(obj, self.frame_shape)[pos[:, 0], pos[:, 1]]
        if probe.ndim == 3:   # modes: one wave per frame and mode, (n, M, H, W)
            frames = frames[:, None]
        waves = probe[None] * frames
        self._intensities.append(np.array(arr, dtype=np.float32))
        self._positions.append(pos)
        self._pending.append(waves.astype(np.complex64))
        return self.n_frames

    def _current_probe_object(self):
        if self._result is None:
            return self._probe0, np.ones(self.object_shape, np.complex64)
        probe = self._result.probe_modes if self.options.probe_modes > 1 else self._result.probe
        return probe, self._result.object

    # ------------------------------------------------------------------ iterations
    def iterate(self, iterations: int, callback: Callable[[int, float], object] | None = None
                ) -> Result:
        """Run ``iterations`` engine iterations over every frame received so far."""
        if not self._intensities:
            raise PtychoInputError("no frames yet: call add_frames() before iterate()")
        intensities = np.concatenate(self._intensities)
        positions = np.concatenate(self._positions)
        if len(self._intensities) > 1:   # keep the list short: one block of frames
            self._intensities = [intensities]
            self._positions = [positions]
        state = None
        probe, obj = self._current_probe_object()
        if self._state is not None:
            old = self._state.exit_waves
            if self._pending:
                old = np.asarray(old.get() if hasattr(old, "get") else old)
                old = np.concatenate([old] + self._pending)
            state = ReconstructionState(self.options.algorithm, self._state.iteration,
                                        self._state.object, self._state.probe, old,
                                        list(self._state.errors), self._state.backend,
                                        self._state.probe_centroid)
        elif self._pending:
            state = ReconstructionState(self.options.algorithm, 0, obj, probe,
                                        np.concatenate(self._pending), [], "numpy")
        self._pending = []
        result = reconstruct_frames(intensities, positions, self.object_shape,
                                    Options.of(self.options, iterations=iterations), state=state,
                                    comm=self.comm, callback=callback)
        self._state = result.state
        self._result = result
        self.history.append({"frames": self.n_frames, "iteration": result.state.iteration,
                             "fourier_error": result.fourier_error})
        return result

    def consume(self, batches: Iterable, iterations_per_batch: int,
                on_batch: Callable[["StreamingReconstruction", Result], object] | None = None
                ) -> Result | None:
        """Add each ``(intensities, positions)`` batch, then iterate; returns the last result.

        ``on_batch(self, result)`` is called after each batch's iterations
        (e.g. to record quality against frames received).
        """
        result = None
        for batch in batches:
            intensities, positions = batch
            self.add_frames(intensities, positions)
            result = self.iterate(iterations_per_batch)
            if on_batch is not None:
                on_batch(self, result)
        return result

    # ------------------------------------------------------------------ results
    @property
    def object(self) -> np.ndarray:
        if self._result is None:
            raise PtychoInputError("no reconstruction yet: call iterate() first")
        return self._result.object

    @property
    def probe(self) -> np.ndarray:
        if self._result is None:
            raise PtychoInputError("no reconstruction yet: call iterate() first")
        return self._result.probe

    @property
    def result(self) -> Result | None:
        return self._result


def micro_batches(data, batch_size: int):
    """Split a :class:`PtychoData` into ``(intensities, positions)`` batches in scan order.

    An in-process stand-in for a detector stream (tests, demos).
    """
    if int(batch_size) <= 0:
        raise PtychoInputError(f"batch_size must be > 0, got {batch_size!r}")
    for start in range(0, data.n_frames, int(batch_size)):
        stop = start + int(batch_size)
        yield data.intensities[start:stop], data.positions[start:stop]
