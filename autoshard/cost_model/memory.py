"""Per-device training memory: parameters, gradients, optimizer state and activations.

The planner must reject plans that do not fit, so the estimates lean to the safe side. Optimizer state is
priced in fp32 even for bf16/fp16 parameters: mixed-precision training keeps its moments in fp32 because
bf16 moments lose small updates, and a plan that fits with fp32 state also fits with narrower state.
(``torch.optim`` itself keeps state in the parameter's dtype, so for pure-bf16 training this over-counts
the state by 2x.) Parameters wider than fp32 keep state at their own width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from autoshard.errors import InputError
from autoshard.report.table import format_count

__all__ = [
    "OPTIMIZERS",
    "MemoryBreakdown",
    "OptimizerSpec",
    "optimizer_state_bytes_per_param",
    "training_memory",
]

_STATE_MIN_ITEMSIZE = torch.float32.itemsize


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """An optimizer as the memory model sees it: how many parameter-sized state tensors it keeps."""

    name: str
    states_per_param: int
    description: str

    def state_bytes_per_param(self, param_dtype: torch.dtype) -> int:
        """Bytes of state per parameter element: each state in fp32, or in the parameter's dtype if wider."""
        if not isinstance(param_dtype, torch.dtype) or not param_dtype.is_floating_point:
            raise InputError(f"expected a floating-point parameter dtype (e.g. torch.float32), found "
                             f"{param_dtype!r}; optimizers only update floating-point parameters.")
        return self.states_per_param * max(param_dtype.itemsize, _STATE_MIN_ITEMSIZE)


#: The optimizers autoshard can size, by the name users pass.
OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            OptimizerSpec(name="adamw", states_per_param=2, description="exp_avg and exp_avg_sq"),
            OptimizerSpec(name="adam", states_per_param=2, description="exp_avg and exp_avg_sq"),
            OptimizerSpec(name="sgd", states_per_param=0, description="plain SGD keeps no state"),
            OptimizerSpec(name="sgd-momentum", states_per_param=1, description="momentum_buffer"),
        )
    }
)


def optimizer_state_bytes_per_param(optimizer: str, param_dtype: torch.dtype) -> int:
    """Bytes of optimizer state per parameter element: adam/adamw 8, sgd 0, sgd-momentum 4 (fp32 params)."""
    key = optimizer.strip().lower() if isinstance(optimizer, str) else optimizer
    spec = OPTIMIZERS.get(key) if isinstance(key, str) else None
    if spec is None:
        raise InputError(f"expected an optimizer among {sorted(OPTIMIZERS)}, found {optimizer!r}; pass one "
                         "of those names (sgd-momentum is SGD with a momentum buffer).")
    return spec.state_bytes_per_param(param_dtype)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBreakdown:
    """Bytes one device holds during training, by kind."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def fits(self, capacity_bytes: int) -> bool:
        """Whether the total fits in ``capacity_bytes`` (e.g. ``HardwareSpec.hbm_bytes``)."""
        return self.total <= capacity_bytes

    def __str__(self) -> str:
        parts = ("parameters", "gradients", "optimizer_state", "activations")
        body = ", ".join(f"{p.replace('_', ' ')} {format_count(getattr(self, p), 'B')}" for p in parts)
        return f"{format_count(self.total, 'B')} ({body})"


def training_memory(
    *, param_bytes: float, grad_bytes: float, optimizer_bytes: float, activation_bytes: float
) -> MemoryBreakdown:
    """Per-device memory of a training step from its parts, each in bytes on one device.

    Callers pass sizes after sharding: a parameter sharded n ways contributes its bytes / n, a replicated
    one its full bytes. Activations are those saved for backward at their peak.
    """
    parts = {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": optimizer_bytes,
             "activation_bytes": activation_bytes}
    for name, value in parts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, found {value}")
    # Sharded sizes may arrive as fractions (bytes / n); round up, a partial byte still needs a byte.
    return MemoryBreakdown(
        parameters=math.ceil(param_bytes),
        gradients=math.ceil(grad_bytes),
        optimizer_state=math.ceil(optimizer_bytes),
        activations=math.ceil(activation_bytes),
    )
