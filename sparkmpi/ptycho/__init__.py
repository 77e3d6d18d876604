"""Ptychography: simulation, difference-map and RAAR engines, metrics, streaming.

Public API::

    from sparkmpi import ptycho
    data = ptycho.simulate(frames=512, frame_size=128)
    result = ptycho.reconstruct(data, algorithm="dm", iterations=100)
    ptycho.object_quality(result.object, data).nrmse   # translation, ramp, scale removed

Distributed through Spark (one MPI rank per partition, ``sparkmpi.run``)::

    from sparkmpi.ptycho.spark import reconstruct_mpi
    out = reconstruct_mpi(spark, "scan.npz", ranks=2, iterations=100)

One rank's share, under ``mpiexec`` or inside a ``sparkmpi.run`` task::

    result = ptycho.reconstruct_rank(comm, intensities, positions, object_shape)

Importing this package needs NumPy and SciPy only (no pyspark, no mpi4py);
numba, when installed, provides the fused CPU kernels.
"""

from .engines import (
    ALGORITHMS,
    ReconstructionState,
    Result,
    allreduce_sums,
    initial_probe,
    reconstruct,
    reconstruct_frames,
    reconstruct_rank,
)
from .errors import (
    DataFormatError,
    FrameMismatchError,
    NegativeIntensityError,
    NonFiniteError,
    PositionOutOfBoundsError,
    ProbeShapeError,
    PtychoInputError,
)
from .metrics import (
    Registration,
    illuminated_mask,
    illumination,
    nrmse,
    object_nrmse,
    object_quality,
    probe_quality,
    register,
    registered_nrmse,
)
from .files import read_scan, write_cxi
from .modes import initial_modes, mode_powers, orthogonalize_modes
from .options import Options
from .output import write_outputs
from .simulate import (
    PtychoData,
    fresnel_propagate,
    load,
    make_object,
    make_probe,
    make_probe_modes,
    model_probe,
    simulate,
)
from .streaming import StreamingReconstruction, micro_batches

__all__ = [
    "ALGORITHMS",
    "DataFormatError",
    "FrameMismatchError",
    "NegativeIntensityError",
    "NonFiniteError",
    "Options",
    "PositionOutOfBoundsError",
    "ProbeShapeError",
    "PtychoData",
    "PtychoInputError",
    "ReconstructionState",
    "Result",
    "allreduce_sums",
    "fresnel_propagate",
    "initial_probe",
    "load",
    "make_object",
    "make_probe",
    "make_probe_modes",
    "initial_modes",
    "mode_powers",
    "orthogonalize_modes",
    "reconstruct",
    "reconstruct_frames",
    "reconstruct_rank",
    "simulate",
    "model_probe",
    "illuminated_mask",
    "illumination",
    "nrmse",
    "object_nrmse",
    "object_quality",
    "probe_quality",
    "register",
    "registered_nrmse",
    "Registration",
    "write_outputs",
    "read_scan",
    "write_cxi",
    "StreamingReconstruction",
    "micro_batches",
]
