"""One rank's reconstruction state and its iteration steps, in two implementations.

:class:`Engine` holds what both share (amplitudes, geometry, FFTs, object,
probe, the iterate and the probe-ramp gauge); its subclasses implement the
steps of one iteration behind the same methods:

* :class:`ExactEngine` -- NumPy only: fused numba kernels or their NumPy
  reference (:mod:`sparkmpi.ptycho._fused`) with quantised, order-independent
  sums, so any split of the frames over ranks gives the same numbers;
* :class:`GenericEngine` -- whole-stack array code over ``xp`` that CuPy runs
  (and NumPy with ``kernels="generic"``), with plain float sums.

:func:`make_engine` picks one.  The algorithms themselves are described in
:mod:`sparkmpi.ptycho.engines`.
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend
from ._fused import finish_update, make_ops, probe_spans
from ._kernels import ExactSums, Fourier, Geometry, ModalFourier, allreduce_sums
from .errors import PtychoInputError
from .modes import mix_waves, orthogonalize_modes

__all__ = ["Engine", "ExactEngine", "GenericEngine", "make_engine"]


class Engine:
    """Buffers and the shared parts of one reconstruction on one rank.

    ``phi_after_step``: a step leaves ``F(P O_j)`` in ``tmp`` (position refinement
    then needs no forward FFT).

    The iterate is kept in Fourier space, ``Psi_j = F psi_j``: the modulus
    projection then needs no transform and the misfit of ``F(P O_j)`` comes
    for free.  Each iteration does one inverse FFT (``psi`` for the overlap
    update) and one forward FFT (of ``P O_j``) of the whole stack.
    Three stack-sized complex64 buffers: ``Psi``, ``work`` and ``tmp``.

    Subclasses implement :meth:`gather_multiply`, :meth:`object_update`,
    :meth:`probe_update`, :meth:`dm_step`, :meth:`raar_step` and
    :meth:`_apply_frame_phase`; each step returns this rank's misfit sum
    ``sum (|F P O_j| - a)^2``.
    """

    def __init__(self, bk: Backend, intensities: np.ndarray, positions: np.ndarray,
                 object_shape, probe, obj, exit_waves, comm, regularization: float,
                 threads: int, pin_ramp: bool = True, centroid=None,
                 probe_support: float | None = None, probe_center: bool = False,
                 probe_power: bool = False, positions_start=None, fft: str = "auto"):
        xp = bk.xp
        self.bk, self.xp, self.comm = bk, xp, comm
        self.reg = float(regularization)
        amp = np.sqrt(intensities, dtype=np.float32)
        amp = np.ascontiguousarray(np.fft.ifftshift(amp, axes=(-2, -1)))
        self.a = xp.asarray(amp)
        del amp
        norm = np.array([float(np.asarray(intensities, dtype=np.float64).sum())])
        allreduce_sums(comm, [norm])
        self.norm = max(float(norm[0]), np.finfo(np.float64).tiny)
        frame_shape = tuple(intensities.shape[1:])
        self.frame_shape, self.object_shape = frame_shape, tuple(object_shape)
        self.threads = threads
        self.geom = None
        self._make_geometry(positions)
        # refined positions (fractional), where they started, and what the engine uses
        self.positions = np.asarray(positions, dtype=np.float64).copy()
        self.positions_start = (self.positions.copy() if positions_start is None
                                else np.asarray(positions_start, dtype=np.float64).copy())
        self.fourier = Fourier(bk, self.a, workers=threads, fft=fft)
        self.P = xp.asarray(probe, dtype=xp.complex64)
        # incoherent probe modes: P (M, H, W) and the waves (N, M, H, W) when M > 1
        self.modes = int(self.P.shape[0]) if self.P.ndim == 3 else 1
        self.wave_shape = tuple(self.a.shape)
        if self.modes > 1:
            self.wave_shape = (self.a.shape[0], self.modes) + frame_shape
            self.fourier = ModalFourier(self.fourier)
        self.O = xp.asarray(obj, dtype=xp.complex64)
        self._den = None
        self.pin_ramp = pin_ramp
        self._centroid0 = None
        if pin_ramp:
            self._centroid0 = centroid or self._spectrum_centroid(self.P)
        self._support = None
        if probe_support is not None:
            self._support = xp.asarray(probe_support_mask(frame_shape, probe_support))
        self.probe_center = bool(probe_center)
        self._power_target = None
        if probe_power:   # the largest measured frame power, all ranks
            from ._kernels import allreduce_max

            frame_power = np.asarray(intensities, dtype=np.float64).sum(axis=(1, 2)).max()
            self._power_target = float(allreduce_max(comm, [float(frame_power)])[0])
        self._setup(probe, obj, frame_shape, tuple(object_shape), threads)
        self.work = xp.empty(self.wave_shape, dtype=xp.complex64)
        self.tmp = xp.empty(self.wave_shape, dtype=xp.complex64)
        if exit_waves is None:
            self.Psi = xp.empty(self.wave_shape, dtype=xp.complex64)
            self.gather_multiply(self.O, self.P, self.Psi)
        else:
            self.Psi = xp.array(exit_waves, dtype=xp.complex64, copy=True)
        self.fourier.forward(self.Psi)

    def _make_geometry(self, positions) -> None:
        """Geometry for whole-pixel ``positions``; collective (the comb's Allreduce)."""
        if self.geom is not None:
            self.geom.close()
        self.geom = Geometry(self.bk, positions, self.frame_shape, self.object_shape,
                             threads=self.threads)
        # The scan's comb summed over ranks (integer counts: exact): the object
        # denominator sum_j shift(|P|^2) is then computed whole, and identically, on
        # every rank, with no Allreduce.
        comb = np.asarray(self.geom._comb, dtype=np.float64).copy()
        count = np.array([float(len(positions))])
        allreduce_sums(self.comm, [comb, count])
        self.geom.set_comb(comb)
        self.n_total = int(count[0])
        self._den = None

    def set_positions(self, positions) -> None:
        """Use new whole-pixel ``positions`` (this rank's frames); collective: every rank calls it."""
        self._make_geometry(np.asarray(positions, dtype=np.int64))
        self._positions_changed()

    def _positions_changed(self) -> None:
        """Called after :meth:`set_positions` rebuilt the geometry."""

    def refine_positions(self, max_step: float, max_shift: float, have_phi: bool = False) -> int:
        """One position-refinement step for this rank's frames (:mod:`sparkmpi.ptycho.positions`).

        Collective: every rank calls it in the same iteration.  ``have_phi``:
        ``tmp`` already holds ``F(P O_j)`` for the current object and probe.
        Returns the number of frames, over all ranks, whose whole pixel changed.
        """
        from .positions import GAIN, HYSTERESIS, clamp_positions, quantise, solve_steps

        xp = self.xp
        steps = solve_steps(self._refinement_sums(have_phi))
        move = quantise(np.clip(GAIN * steps, -max_step, max_step))
        # the mean move over every frame of every rank is a translation of the object: off
        total = np.concatenate([move.sum(axis=0), [float(len(move))]])
        allreduce_sums(self.comm, [total])
        mean = quantise(total[:2] / max(total[2], 1.0))
        self.positions = quantise(clamp_positions(self.positions + move - mean,
                                                  self.positions_start, self.frame_shape,
                                                  self.object_shape, max_shift))
        # A frame changes whole pixel only once its position is past the half pixel by
        # HYSTERESIS: a frame at its true pixel then does not flip on the step's noise.
        current = self.geom.positions
        away = np.abs(self.positions - current) > 0.5 + HYSTERESIS
        whole = np.where(away, np.rint(self.positions).astype(np.int64), current)
        moved = np.flatnonzero(np.any(whole != current, axis=1))
        changed = np.array([float(len(moved))])
        allreduce_sums(self.comm, [changed])
        if changed[0] > 0:
            if len(moved):   # a moved frame's iterate restarts from F(P O_j) at its new place
                waves = self._exit_waves_at(whole[moved])
                self.fourier.forward(waves)
                self._reset_waves(moved, waves)
            self.set_positions(whole)
        return int(changed[0])

    def _exit_waves_at(self, positions):
        """``P O_j`` at other whole-pixel ``positions`` (M, 2): a new (M, H, W) array."""
        waves = self.xp.empty((len(positions),) + self.frame_shape, dtype=self.xp.complex64)
        self.geom.gather_at(self.O, positions, out=waves)
        waves *= self.P
        return waves

    def _refinement_sums(self, have_phi: bool) -> np.ndarray:
        """This rank's (N, 5) sums of the refinement step's 2x2 systems
        (:func:`sparkmpi.ptycho.positions.position_sums`): ``chi_j = Pi_F(P O_j) - P O_j``
        and the object's gradient, whole-stack array code (the CPU engine pipelines it)."""
        xp = self.xp
        tmp = self.tmp
        frames = xp.ascontiguousarray(self.geom.gather(self.O))
        if not have_phi:
            xp.multiply(frames, self.P, out=tmp)
            self.fourier.forward(tmp)
        self.fourier.project(tmp)          # Pi_F(F P O_j)
        self.fourier.inverse(tmp)
        frames *= self.P
        tmp -= frames                      # chi_j = Pi_F(P O_j) - P O_j
        del frames
        obj = self.O
        grad_y = 0.5 * (xp.roll(obj, -1, axis=0) - xp.roll(obj, 1, axis=0))
        grad_x = 0.5 * (xp.roll(obj, -1, axis=1) - xp.roll(obj, 1, axis=1))
        # the object denominator sum_k shift(|P|^2) from the global comb: the same on every
        # rank, so each frame's overlap weight is too
        den = self.geom.scatter_probe_power(self.P)
        return self._position_sums(tmp, grad_y, grad_x, den)

    def _position_sums(self, chi, grad_y, grad_x, den) -> np.ndarray:
        """:func:`sparkmpi.ptycho.positions.position_sums` for this rank's frames, given
        the object's gradient planes and denominator ``den`` (real, object-shaped);
        whole-stack array code (the CPU engine fuses it)."""
        from .positions import position_sums

        xp = self.xp
        den_frames = self.geom.gather(den.astype(xp.complex64)).real   # gather is complex
        return position_sums(self.P, self.geom.gather(grad_y), self.geom.gather(grad_x), chi,
                             xp, den=den_frames)

    # ---- what the implementations provide
    def _setup(self, probe, obj, frame_shape, object_shape, threads) -> None:
        """Implementation state, made before the first exit waves are computed."""

    def gather_multiply(self, obj, probe, out):
        """``out = probe * O_j`` for every frame (the overlap-constrained exit waves)."""
        raise NotImplementedError

    def object_update(self, src, scratch) -> None:
        """``O <- (sum_j shift(src_j P*) + d O) / (sum_j shift(|P|^2) + d)``."""
        raise NotImplementedError

    def probe_update(self, src, scratch) -> None:
        """``P <- (sum_j src_j O_j* + d P) / (sum_j |O_j|^2 + d)``."""
        raise NotImplementedError

    def dm_step(self, beta: float, update_probe: bool):
        """``Psi <- Psi + beta (Pi_F(2 Pi_O Psi - Psi) - Pi_O Psi)``; returns the misfit."""
        raise NotImplementedError

    def raar_step(self, beta: float, update_probe: bool):
        """``Psi <- beta Pi_O(2 Pi_F Psi - Psi) + (1 - 2 beta) Pi_F Psi + beta Psi``; the misfit."""
        raise NotImplementedError

    def _apply_frame_phase(self, phase) -> None:
        """Multiply each frame of ``Psi`` by ``phase[j]`` (now or in the next pass over it)."""
        raise NotImplementedError

    def _probe_changed(self) -> None:
        """Called after every probe update."""

    # ---- shared
    def step(self, algorithm: str):
        """The step method of ``algorithm`` ("dm" or "raar")."""
        return self.dm_step if algorithm == "dm" else self.raar_step

    def close(self) -> None:
        self.geom.close()
        self.fourier.close()

    def exit_waves(self):
        """Real-space exit waves ``psi`` (a new backend array)."""
        psi = self.Psi.copy()
        return self.fourier.inverse(psi)

    def _set_probe(self, pnum, pden) -> None:
        xp = self.xp
        d = self.reg * float(pden.max())
        pnum += d * self.P
        pnum /= pden + d
        self.P = pnum.astype(xp.complex64, copy=False)
        self._constrain_probe()
        if self.pin_ramp:
            self._pin_probe_spectrum()
        self._probe_changed()
        self._den = None

    def _constrain_probe(self) -> None:
        """The real-space probe constraints, in order: support, centring, power.

        Each is computed from the probe alone (the same on every rank), and
        the centring and power steps change the object (and the exit waves)
        by the matching gauge, so the data are explained as before.
        """
        xp = self.xp
        if self._support is not None:
            self.P *= self._support
        if self.probe_center:
            offset = probe_offset(self.P, xp)
            if max(abs(offset[0]), abs(offset[1])) >= 1.0:
                self._move_probe(int(round(offset[0])), int(round(offset[1])))
        if self._power_target is not None:
            power = float(xp.sum(self.P.real ** 2 + self.P.imag ** 2, dtype=xp.float64))
            if power > 0:
                factor = np.float32(np.sqrt(self._power_target / power))
                self.P *= factor
                self.O /= factor

    def _move_probe(self, dy: int, dx: int) -> None:
        """``P(r) <- P(r + n)``, ``O(x) <- O(x + n)``, ``psi_j(r) <- psi_j(r + n)``, ``n = (dy, dx)``.

        ``P(r + n) O(r + n + r_j) = psi_j(r + n)``: the exit waves move by the
        same whole pixels, which in Fourier space is a phase ramp the same
        for every frame, and the measured moduli do not change.  The object
        rolls circularly; its edges are unlit by a support smaller than the
        frame.
        """
        xp = self.xp
        self.P = xp.roll(self.P, (-dy, -dx), axis=(-2, -1))
        self.O = xp.roll(self.O, (-dy, -dx), axis=(0, 1))
        h, w = self.P.shape[-2:]
        ramp = (np.exp(2j * np.pi * np.fft.fftfreq(h) * dy)[:, None]
                * np.exp(2j * np.pi * np.fft.fftfreq(w) * dx)[None, :]).astype(np.complex64)
        self._apply_wave_ramp(xp.asarray(ramp))

    def _apply_wave_ramp(self, ramp) -> None:
        """Multiply every frame of ``Psi`` by ``ramp`` (H, W), now."""
        self.Psi *= ramp

    def _reset_waves(self, index, waves) -> None:
        """``Psi[index] = waves`` (Fourier-space waves of the current object and probe)."""
        self.Psi[self.xp.asarray(index)] = waves

    def _spectrum_centroid(self, probe):
        """Circular centroid (rows, cols) of ``|F P|^2`` (summed over modes), frequency pixels."""
        xp = self.xp
        power = xp.abs(xp.fft.fft2(probe)) ** 2
        if power.ndim == 3:
            power = power.sum(axis=0)
        out = []
        for axis, n in ((0, probe.shape[-2]), (1, probe.shape[-1])):
            profile = power.sum(axis=1 - axis)
            phase = xp.exp(2j * np.pi * xp.arange(n) / n)
            out.append(float(xp.angle(xp.sum(profile * phase))) * n / (2 * np.pi))
        return out

    def _pin_probe_spectrum(self):
        """Remove the linear phase ramp the probe picked up in this update.

        ``P e^{-i q r}`` with ``O e^{i q r}`` explains the data as well as
        ``P, O`` (each frame only gains a constant phase), so refining the
        probe lets a phase ramp drift into the object.  A ramp on ``P`` is a
        shift of ``|F P|^2``: the shift from the initial probe's spectrum
        centroid is undone here (sub-pixel, by multiplying with the opposite
        ramp), and the object and the exit waves get the matching change
        (``O e^{iqr}``, ``Psi_j e^{i q r_j}``) at once: changing the probe
        alone leaves the iterate inconsistent, and the difference map then
        spends its iterations undoing the ramp (docs/ptycho.md).
        """
        xp = self.xp
        cy, cx = self._spectrum_centroid(self.P)
        h, w = self.P.shape[-2:]
        dy = (cy - self._centroid0[0] + h / 2) % h - h / 2
        dx = (cx - self._centroid0[1] + w / 2) % w - w / 2
        qy, qx = 2 * np.pi * dy / h, 2 * np.pi * dx / w

        def ramp(shape, sign):   # e^{sign i (qy y + qx x)} as an outer product of 1-D factors
            ey = xp.exp(sign * 1j * qy * xp.arange(shape[0])).astype(xp.complex64)
            ex = xp.exp(sign * 1j * qx * xp.arange(shape[1])).astype(xp.complex64)
            return ey[:, None] * ex[None, :]

        self.P = self.P * ramp((h, w), -1)
        # The same gauge change for the object and the exit waves, so the state stays
        # consistent: P(r) e^{-iqr} O(r + r_j) e^{iq(r + r_j)} = P O_j e^{i q r_j}.
        self.O = self.O * ramp(self.O.shape, 1)
        pos = self.geom.positions
        phase = np.exp(1j * (qy * pos[:, 0] + qx * pos[:, 1])).astype(np.complex64)
        self._apply_frame_phase(phase)

    def _overlap(self, src, update_probe: bool):
        """Overlap projection of real-space waves ``src``; leaves ``F(P O_j)`` in ``tmp``."""
        self.object_update(src, self.tmp)
        if update_probe:
            self.probe_update(src, self.tmp)
        self.gather_multiply(self.O, self.P, self.tmp)
        return self.fourier.forward(self.tmp)


class ExactEngine(Engine):
    """CPU steps with fused kernels (numba) or their NumPy reference and quantised sums.

    The sums over frames (object and probe numerators and denominators) are
    exact in any order (:class:`~sparkmpi.ptycho._kernels.ExactSums`), so
    any split over ranks gives bit-for-bit the numbers of one process.

    Parameters
    ----------
    *args, **kwargs
        As for :class:`Engine`.
    kernels : {"auto", "numba", "numpy"}
    """

    def __init__(self, *args, kernels: str = "auto", **kwargs):
        self.kernels = kernels
        self.ops = None
        self._frame_phase = None   # per-frame phase of a pending gauge change of Psi
        self._work_is_psi = False   # True when work holds a copy of Psi (DM)
        #: whether the next step stores ``F(P O_j)`` in ``tmp`` (the pipeline needs no
        #: stack for it otherwise); the reconstruction loop sets it per iteration
        self.keep_phi = True
        self._phi_in_tmp = False
        self._transforms = None
        self._raar_pre_due = None   # in a pipelined RAAR step: beta, until raar_pre is done
        #: False runs the whole-stack steps (the pipeline's reference in the tests)
        self.pipeline = True
        super().__init__(*args, **kwargs)

    @property
    def phi_after_step(self) -> bool:
        """Whether the last step left ``F(P O_j)`` in ``tmp``."""
        return self._phi_in_tmp

    @property
    def pipelined(self) -> bool:
        """Steps run chunk by chunk (:meth:`_pipeline_step`): with the numba kernels."""
        return self.pipeline and self.ops is not None and self.ops.name == "numba"

    def _setup(self, probe, obj, frame_shape, object_shape, threads) -> None:
        self.ops = make_ops(self.kernels, self.geom.positions, frame_shape, object_shape, threads)
        # the probe numerator is summed only where the support keeps the probe
        self._numerator_spans = (None if self._support is None
                                 else probe_spans(np.asarray(self._support)))
        pmax = float(np.abs(probe).max())
        omax = float(np.abs(obj).max())
        cover = self.geom.coverage()
        self.obj_sums = ExactSums(self.comm, [(object_shape, True), (object_shape, False)],
                                  [cover, cover], [pmax * pmax * omax, pmax * pmax])
        self.probe_sums = ExactSums(self.comm, [(frame_shape, True), (frame_shape, False)],
                                    [self.n_total, self.n_total],
                                    [pmax * omax * omax, omax * omax])

    def close(self) -> None:
        super().close()
        if self.ops is not None:
            self.ops.close()

    def _position_sums(self, chi, grad_y, grad_x, den) -> np.ndarray:
        return self.ops.position_sums(chi, self.P, grad_y, grad_x, den)

    def _exit_waves_at(self, positions):
        if not self.pipelined:
            return super()._exit_waves_at(positions)
        waves = np.empty((len(positions),) + self.frame_shape, dtype=np.complex64)
        return self.ops.gather_mul_at(self.O, self.P, positions, waves)

    def _refinement_sums(self, have_phi: bool) -> np.ndarray:
        if not (self.pipelined and have_phi):
            return super()._refinement_sums(have_phi)
        if self._transforms is None:
            self._transforms = self.fourier.chunk_transforms(self.threads)
        den = self.geom.scatter_probe_power(self.P)   # as in the whole-stack sums
        return self.ops.refinement_sums(self.tmp, self.a, self._transforms, self.O, self.P, den)

    def _positions_changed(self) -> None:
        self.ops.close()
        self.ops = make_ops(self.kernels, self.geom.positions, self.frame_shape,
                            self.object_shape, self.threads)
        cover = float(max(1, self.geom.coverage()))
        self.obj_sums.covers = [cover, cover]

    def gather_multiply(self, obj, probe, out):
        return self.ops.gather_mul(obj, probe, out)

    def object_update(self, src, scratch) -> None:
        self._update_object(lambda scale, acc, s_den, dacc: self.ops.scatter_object(
            src, self.P, scale, acc, s_den, dacc))

    def _update_object(self, scatter) -> None:
        """The object from ``scatter(scale, acc, s_den, dacc)`` (quantised sums of this
        rank's frames, as :meth:`FusedOps.scatter_object`); ``scatter`` may be called
        twice (:meth:`ExactSums.reduce`)."""
        # numerator and (after a probe change) denominator in one pass and one Allreduce
        acc, dacc = self.obj_sums.views
        need_den = self._den is None
        inv_num, inv_den = self.obj_sums.reduce(
            lambda sc: scatter(sc[0], acc, sc[1] if need_den else 0.0, dacc), totals=False)
        if need_den:
            self._den = dacc * inv_den
        d = float(self.reg * float(self._den.max()))
        self.O = finish_update(acc[0], acc[1], inv_num, self._den, d, self.O,
                               use_numba=self.ops.name == "numba")

    def probe_update(self, src, scratch) -> None:
        views = self.probe_sums.views
        pnum, pden = self.probe_sums.reduce(
            lambda sc: self.ops.probe_sums(src, self.O, sc[0], sc[1], views[0], views[1],
                                           self._numerator_spans))
        self._set_probe(pnum, pden)

    def _apply_frame_phase(self, phase) -> None:
        self._frame_phase = phase   # applied by the next fused pass over Psi

    def _apply_wave_ramp(self, ramp) -> None:
        if self._raar_pre_due is not None:
            # in a pipelined RAAR step: the whole-stack step ramps beta Psi + (1 - 2 beta)
            # Pi_F Psi, so that part of the update is done first, here (tmp: scratch)
            self.ops.raar_pre(self.Psi, self.a, self._raar_pre_due, self.tmp)
            self._raar_pre_due = None
        super()._apply_wave_ramp(ramp)
        self._work_is_psi = False

    def _reset_waves(self, index, waves) -> None:
        # a pending gauge phase (applied to all of Psi by the next pass) is not due on
        # waves made from the current object and probe: divide it out beforehand
        self.Psi[index] = waves
        if self._frame_phase is not None:
            self.Psi[index] /= self._frame_phase[index][:, None, None]
        self._work_is_psi = False

    def _take_phase(self):
        phase, self._frame_phase = self._frame_phase, None
        return phase

    def dm_step(self, beta: float, update_probe: bool):
        if self.pipelined:
            return self._pipeline_step("dm", beta, update_probe)
        Psi, work = self.Psi, self.work
        if not self._work_is_psi:
            work[...] = Psi
        self.fourier.inverse(work)                               # psi
        Phi = self._overlap(work, update_probe)                  # F Pi_O psi
        # misfit, Psi += beta (Pi_F(2 Phi - Psi) - Phi), work <- Psi: one pass
        err = self.ops.dm_update(Psi, Phi, self.a, beta, work, self._take_phase())
        self._work_is_psi = True
        self._phi_in_tmp = True
        return err

    def raar_step(self, beta: float, update_probe: bool):
        if self.pipelined:
            return self._pipeline_step("raar", beta, update_probe)
        Psi, work = self.Psi, self.work
        self._work_is_psi = False
        self.ops.raar_pre(Psi, self.a, beta, work)              # work = 2 Pi_F Psi - Psi, ...
        self.fourier.inverse(work)                               # z
        Phi = self._overlap(work, update_probe)                  # F Pi_O z
        self._phi_in_tmp = True
        return self.ops.raar_post(Psi, Phi, self.a, beta,        # misfit; Psi += beta Phi
                                  self._take_phase())

    def _pipeline_step(self, kind: str, beta: float, update_probe: bool):
        """One DM or RAAR step in two passes over the frames, chunk by chunk.

        The same arithmetic as the whole-stack steps (the same bits), with the
        stack-sized intermediates (the real-space waves, ``F(P O_j)``) kept to a
        chunk of :data:`~sparkmpi.ptycho._fft.CHUNK` frames in the core's cache:

        1. per chunk: the real-space waves (``F^-1 Psi``, or RAAR's
           ``F^-1 (2 Pi_F Psi - Psi)``), scatter-added into the object sums (and
           written to ``work`` only when the probe is updated: its sums need them
           with the new object); ``Psi`` is read only, so the exact sums' rare
           second call recomputes them; then the Allreduce and the object;
        2. the probe from ``work``, when updated;
        3. per chunk: ``F(P O_j)`` with the new object and probe, and the step's
           update of ``Psi`` with the misfit (``F(P O_j)`` copied to ``tmp`` only
           when :attr:`keep_phi`).
        """
        if self._transforms is None:
            self._transforms = self.fourier.chunk_transforms(self.threads)
        self._work_is_psi = False
        store = self.work if update_probe else None
        self._update_object(lambda scale, acc, s_den, dacc: self.ops.inverse_scatter(
            kind, self.Psi, self.a, beta, self._transforms, self.P, scale, acc, s_den, dacc,
            store, self._numerator_spans))
        if update_probe:
            if kind == "raar":   # a probe move ramps Psi: see _apply_wave_ramp
                self._raar_pre_due = beta
            try:
                self.probe_update(self.work, self.tmp)
            finally:
                pre = self._raar_pre_due is not None or kind == "dm"
                self._raar_pre_due = None
        else:
            pre = True
        keep = self.tmp if self.keep_phi else None
        err = self.ops.forward_update(kind, self.O, self.P, self.Psi, self.a, beta,
                                      self._transforms, self._take_phase(), keep, pre)
        self._phi_in_tmp = keep is not None
        return err


class GenericEngine(Engine):
    """Whole-stack steps over ``xp`` (NumPy or CuPy) with plain float sums.

    Partial sums are float64 or complex128, so a distributed result matches
    one process to rounding, not bit for bit.
    """

    phi_after_step = False   # the steps reuse tmp

    def _setup(self, probe, obj, frame_shape, object_shape, threads) -> None:
        if self.modes > 1:   # the first exit waves are made from these modes
            self.P = orthogonalize_modes(self.P, self.xp)[0]
        self._conjP = self.xp.conj(self.P)

    def _probe_changed(self) -> None:
        if self.modes > 1:
            # The modes and each frame's waves get the same unitary mixing: the modelled
            # intensities, and so the iterate's fit to the data, do not change.
            self.P, mixing = orthogonalize_modes(self.P, self.xp)
            mix_waves(self.Psi, mixing, self.xp)
        self._conjP = self.xp.conj(self.P)

    def gather_multiply(self, obj, probe, out):
        if self.modes > 1:   # out[j, m] = P_m O_j
            frames = self.geom.gather(obj)
            self.xp.multiply(frames[:, None], probe[None], out=out)
            return out
        return self.geom.gather_multiply(obj, probe, out=out)

    def object_update(self, src, scratch) -> None:
        xp = self.xp
        if self._den is None:   # global comb: the same on every rank, no Allreduce
            self._den = self.geom.scatter_probe_power(self.P)   # sum_m |P_m|^2 with modes
        den = self._den
        d = float(self.reg * float(den.max()))
        if self.modes > 1:   # sum_m psi_jm conj(P_m) per frame, then the scatter
            frames = src[:, 0] * self._conjP[0]
            for m in range(1, self.modes):
                frames += src[:, m] * self._conjP[m]
            num = self.geom.scatter(frames)
            del frames
        elif self.bk.name == "cupy":   # fused product and scatter
            num = self.geom.scatter_conj_mul(src, self.P)
        else:
            xp.multiply(src, self._conjP, out=scratch)
            num = self.geom.scatter(scratch)
        allreduce_sums(self.comm, [num], self.bk)   # complex128: see Geometry.scatter
        num += d * self.O
        num /= den + np.float32(d)
        self.O = num.astype(xp.complex64)

    def probe_update(self, src, scratch) -> None:
        xp = self.xp
        frames = self.geom.gather(self.O)
        xp.conj(frames, out=frames)
        if self.modes > 1:   # each mode from its own exit waves, one denominator
            pnum = xp.empty((self.modes,) + self.frame_shape, dtype=xp.complex128)
            for m in range(self.modes):
                xp.multiply(src[:, m], frames, out=scratch[:, m])
                pnum[m] = scratch[:, m].sum(axis=0, dtype=xp.complex128)
        else:
            xp.multiply(src, frames, out=scratch)
            # float64 accumulation: partial sums over ranks then match one process closely
            pnum = scratch.sum(axis=0, dtype=xp.complex128)
        pden = (frames.real ** 2 + frames.imag ** 2).sum(axis=0, dtype=xp.float64)
        del frames
        allreduce_sums(self.comm, [pnum, pden], self.bk)
        self._set_probe(pnum, pden)

    def _apply_frame_phase(self, phase) -> None:
        self.Psi *= self.xp.asarray(phase).reshape((-1,) + (1,) * (self.Psi.ndim - 1))

    def dm_step(self, beta: float, update_probe: bool):
        Psi, work = self.Psi, self.work
        work[...] = Psi
        self.fourier.inverse(work)                               # psi
        Phi = self._overlap(work, update_probe)                  # F Pi_O psi
        err = self.fourier.misfit(Phi)
        if beta != 1.0:
            Phi *= np.float32(beta)
        Psi -= Phi                                               # Psi - beta Phi
        if beta != 1.0:
            Phi *= np.float32((2.0 - beta) / beta)
        Phi -= Psi                                               # 2 Phi - Psi
        self.fourier.project(Phi, scale=beta)                    # beta Pi_F(2 Phi - Psi)
        Psi += Phi
        return err

    def raar_step(self, beta: float, update_probe: bool):
        xp = self.xp
        Psi, work, tmp = self.Psi, self.work, self.tmp
        tmp[...] = Psi
        self.fourier.project(tmp)                                # Y = Pi_F Psi
        xp.multiply(tmp, np.float32(2.0), out=work)
        work -= Psi                                              # Z = 2 Y - Psi
        Psi *= np.float32(beta)
        tmp *= np.float32(1.0 - 2.0 * beta)
        Psi += tmp                                               # beta Psi + (1 - 2 beta) Y
        self.fourier.inverse(work)                               # z
        Phi = self._overlap(work, update_probe)                  # F Pi_O z
        err = self.fourier.misfit(Phi)
        Phi *= np.float32(beta)
        Psi += Phi
        return err


def probe_support_mask(frame_shape, fraction: float) -> np.ndarray:
    """Float32 0/1 disc centred at ``(H // 2, W // 2)`` (where probes are centred),
    diameter ``fraction * min(H, W)``."""
    h, w = frame_shape
    y = np.arange(h) - h // 2
    x = np.arange(w) - w // 2
    radius = 0.5 * float(fraction) * min(h, w)
    return ((y[:, None] ** 2 + x[None, :] ** 2) <= radius * radius).astype(np.float32)


def probe_offset(probe, xp=np) -> tuple:
    """Intensity centroid of ``probe`` (summed over modes when (M, H, W)) minus the frame
    centre ``(H // 2, W // 2)``, pixels."""
    power = probe.real.astype(xp.float64) ** 2 + probe.imag.astype(xp.float64) ** 2
    if power.ndim == 3:
        power = power.sum(axis=0)
    total = float(power.sum())
    if total <= 0:
        return (0.0, 0.0)
    h, w = power.shape
    cy = float((power.sum(axis=1) * xp.arange(h)).sum()) / total
    cx = float((power.sum(axis=0) * xp.arange(w)).sum()) / total
    return (cy - h // 2, cx - w // 2)


def make_engine(bk: Backend, *args, kernels: str = "auto", **kwargs) -> Engine:
    """:class:`ExactEngine` on NumPy unless ``kernels="generic"`` or the probe has modes
    (M, H, W) with ``kernels="auto"``, else :class:`GenericEngine`.

    ``args`` and ``kwargs`` as for :class:`Engine` (after ``bk``).
    """
    probe = args[3] if len(args) > 3 else kwargs.get("probe")
    modes = int(np.shape(probe)[0]) if np.ndim(probe) == 3 else 1
    if modes > 1 and kernels in ("numba", "numpy"):
        raise PtychoInputError(f"a probe with {modes} modes needs kernels='auto' or 'generic' "
                               f"(the fused exact kernels, kernels={kernels!r}, are single-mode)")
    if bk.name == "numpy" and kernels != "generic" and modes == 1:
        return ExactEngine(bk, *args, kernels=kernels, **kwargs)
    return GenericEngine(bk, *args, **kwargs)
