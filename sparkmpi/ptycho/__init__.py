"""Ptychography: simulation, difference-map and RAAR engines, metrics, streaming.

Public API::

    from sparkmpi import ptycho
    data = ptycho.simulate(frames=512, frame_size=128)
    result = ptycho.reconstruct(data, algorithm="dm", iterations=100)
    ptycho.nrmse(result.object, data.object_true, ptycho.illuminated_mask(data))

Distributed through Spark (one MPI rank per partition, ``sparkmpi.run``)::

    from sparkmpi.ptycho.spark import reconstruct_spark
    out = reconstruct_spark(spark, "scan.npz", ranks=2, iterations=100)

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
    reconstruct_partition,
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
from .metrics import illuminated_mask, illumination, nrmse, object_nrmse
from .output import write_outputs
from .simulate import (
    PtychoData,
    fresnel_propagate,
    load,
    make_object,
    make_probe,
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
    "reconstruct",
    "reconstruct_partition",
    "simulate",
    "model_probe",
    "illuminated_mask",
    "illumination",
    "nrmse",
    "object_nrmse",
    "write_outputs",
    "StreamingReconstruction",
    "micro_batches",
]
