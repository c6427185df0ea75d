"""The hardware cost model: what a sharded plan costs in time and memory on a given cluster.

Hardware profiles are data (``profiles/*.json``, every constant with unit and source); a
:class:`Cluster` maps device-mesh axes onto intra- or inter-node links; collectives are priced with
alpha-beta ring formulas, operators with a roofline, and memory as parameters + gradients + optimizer
state + activations. All quantities are SI: seconds, bytes, bytes/s, FLOP/s.
"""

from autoshard.cost_model.cluster import Cluster, Link
from autoshard.cost_model.collectives import Collective, collective_bytes_per_device, collective_time
from autoshard.cost_model.compute import (
    ELEMENTWISE_BACKWARD,
    MATMUL_BACKWARD,
    BackwardFactor,
    backward_factor,
    compute_time,
)
from autoshard.cost_model.hardware import DTYPE_NAMES, HardwareSpec, known_hardware, load_hardware
from autoshard.cost_model.memory import (
    OPTIMIZERS,
    MemoryBreakdown,
    OptimizerSpec,
    optimizer_state_bytes_per_param,
    training_memory,
)

__all__ = [
    "DTYPE_NAMES",
    "ELEMENTWISE_BACKWARD",
    "MATMUL_BACKWARD",
    "OPTIMIZERS",
    "BackwardFactor",
    "Cluster",
    "Collective",
    "HardwareSpec",
    "Link",
    "MemoryBreakdown",
    "OptimizerSpec",
    "backward_factor",
    "collective_bytes_per_device",
    "collective_time",
    "compute_time",
    "known_hardware",
    "load_hardware",
    "optimizer_state_bytes_per_param",
    "training_memory",
]
