"""Input checks shared by the simulator, the engines and the streaming class.

Each check raises a :mod:`sparkmpi.ptycho.errors` class whose message names
the argument, the problem, what was expected and what came instead.  The
checks run on NumPy arrays (the engines check before moving data to a GPU).
"""

from __future__ import annotations

import numpy as np

from .errors import (
    FrameMismatchError,
    NegativeIntensityError,
    NonFiniteError,
    PositionOutOfBoundsError,
    ProbeShapeError,
)


def shape2(value, name: str) -> tuple[int, int]:
    """Return ``value`` as a pair of positive ints or raise naming ``name``."""
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise FrameMismatchError(f"{name} must be a pair of positive integers (rows, cols), "
                                 f"got {value!r}") from None
    if len(pair) != 2 or min(pair) <= 0:
        raise FrameMismatchError(f"{name} must be a pair of positive integers (rows, cols), "
                                 f"got {value!r}")
    return pair  # type: ignore[return-value]


def check_intensities(intensities, name: str = "intensities") -> np.ndarray:
    """Check measured far-field intensities: real, 3-D, finite, non-negative.

    Returns the array (unchanged when already float32, otherwise converted).
    """
    arr = np.asarray(intensities)
    if arr.ndim != 3:
        raise FrameMismatchError(f"{name} must be a 3-D array (frames, rows, cols), "
                                 f"got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise FrameMismatchError(f"{name} must hold at least one frame, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise FrameMismatchError(f"{name} must have a real numeric dtype (float32 preferred), "
                                 f"got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            frame = int(np.argwhere(bad)[0][0])
            raise NonFiniteError(f"{name} contains {int(bad.sum())} NaN or infinite values "
                                 f"(first in frame {frame}); expected finite intensities")
    low = arr.min()
    if low < 0:
        frame = int(np.argwhere(arr < 0)[0][0])
        raise NegativeIntensityError(f"{name} contains negative values (minimum {float(low):g}, "
                                     f"first in frame {frame}); expected intensities >= 0")
    return arr.astype(np.float32, copy=False)


def check_positions(positions, n_frames: int, frame_shape, object_shape,
                    name: str = "positions") -> np.ndarray:
    """Check integer top-left offsets ``(N, 2)`` against the frames and object.

    Returns ``positions`` as an ``int64`` array of shape ``(N, 2)``.
    """
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise FrameMismatchError(f"{name} must have shape (N, 2) with (row, col) offsets, "
                                 f"got shape {pos.shape}")
    if pos.shape[0] != n_frames:
        raise FrameMismatchError(f"{name} has {pos.shape[0]} rows but intensities has "
                                 f"{n_frames} frames; expected one position per frame")
    if pos.dtype.kind == "f":
        if not np.isfinite(pos).all():
            raise NonFiniteError(f"{name} contains NaN or infinite values")
        if not np.array_equal(pos, np.round(pos)):
            raise FrameMismatchError(f"{name} must be whole pixel offsets; got non-integer "
                                     f"values such as {pos[pos != np.round(pos)][0]!r}")
    elif pos.dtype.kind not in "iu":
        raise FrameMismatchError(f"{name} must hold integer pixel offsets, got dtype {pos.dtype}")
    pos = pos.astype(np.int64)
    fh, fw = frame_shape
    oh, ow = object_shape
    too_low = (pos < 0).any(axis=1)
    too_high = (pos[:, 0] + fh > oh) | (pos[:, 1] + fw > ow)
    bad = too_low | too_high
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise PositionOutOfBoundsError(
            f"{name}: {int(bad.sum())} frame(s) fall outside the object; frame {j} at "
            f"(row, col)={tuple(int(v) for v in pos[j])} with frame shape {tuple(frame_shape)} "
            f"needs an object of at least ({pos[j, 0] + fh}, {pos[j, 1] + fw}) and offsets "
            f">= 0, object_shape is {tuple(object_shape)}")
    return pos


def check_complex_image(array, shape, name: str) -> np.ndarray:
    """Check a complex 2-D array (probe or object) of the given ``shape``."""
    arr = np.asarray(array)
    if arr.shape != tuple(shape):
        raise ProbeShapeError(f"{name} must have shape {tuple(shape)}, got shape {arr.shape}")
    if arr.dtype.kind not in "fc":
        raise ProbeShapeError(f"{name} must be a complex (or real float) array, "
                              f"got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    if not np.any(arr):
        raise ProbeShapeError(f"{name} is all zeros; expected a non-zero array")
    return arr.astype(np.complex64, copy=False)


def check_frames(intensities, positions, object_shape, probe=None, *,
                 names=("intensities", "positions", "object_shape", "probe")):
    """Run every check for one data set; returns ``(intensities, positions, object_shape)``.

    ``intensities`` come back as float32 ``(N, H, W)``, ``positions`` as int64
    ``(N, 2)`` and ``object_shape`` as a pair of ints.  ``probe``, if given,
    must have shape ``(H, W)``.
    """
    object_shape = shape2(object_shape, names[2])
    arr = check_intensities(intensities, names[0])
    frame_shape = arr.shape[1:]
    if frame_shape[0] > object_shape[0] or frame_shape[1] > object_shape[1]:
        raise FrameMismatchError(f"frames of shape {frame_shape} do not fit in {names[2]}="
                                 f"{object_shape}; expected an object at least as large as a frame")
    pos = check_positions(positions, arr.shape[0], frame_shape, object_shape, names[1])
    if probe is not None:
        check_complex_image(probe, frame_shape, names[3])
    return arr, pos, object_shape


def check_probe(probe, frame_shape, modes: int = 1, name: str = "probe") -> np.ndarray:
    """Check a probe for ``modes`` incoherent modes; returns complex64 (H, W) for one
    mode, else (modes, H, W) (a 2-D guess gets the deterministic extra modes of
    :func:`sparkmpi.ptycho.modes.initial_modes`)."""
    arr = np.asarray(probe)
    if arr.ndim == 3:
        arr = check_complex_image(arr, (arr.shape[0],) + tuple(frame_shape), name)
    else:
        arr = check_complex_image(arr, frame_shape, name)
    from .modes import modes_of

    return modes_of(arr, int(modes), name).astype(np.complex64, copy=False)
