"""Roofline time of one operator on one device, and how backward relates to forward.

Roofline: a kernel is limited either by arithmetic or by memory traffic, and with both overlapped its time is
the larger of the two. Each side is scaled by the profile's efficiency because no real kernel reaches the
datasheet peak. Matmuls on large shapes land on the compute side; elementwise ops, norms and softmax do a
few FLOPs per byte and land on the memory side, which is why the capture step prices them by bytes moved.

Backward: capture measures the forward pass only. For a matmul-class op (linear, matmul, conv, attention
products) the backward computes two products of the same size as the forward one: the gradient w.r.t. the
input (dY @ W^T) and w.r.t. the weight (X^T @ dY), so backward FLOPs are 2x forward and, reading dY plus the
saved operands and writing two gradients, its bytes are about 2x too. For an elementwise op the backward
reads the output gradient and the saved input(s) and writes the input gradient(s): between 1x (add) and about
1.7x (mul) the forward bytes; 2x is the round, slightly pessimistic figure, and the FLOPs are negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoshard.cost_model.hardware import HardwareSpec

__all__ = [
    "ELEMENTWISE_BACKWARD",
    "MATMUL_BACKWARD",
    "BackwardFactor",
    "backward_factor",
    "compute_time",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class BackwardFactor:
    """Backward cost as multiples of the forward's FLOPs and bytes moved."""

    flops: float
    bytes_moved: float


#: Gradient w.r.t. input and w.r.t. weight: two forward-sized products.
MATMUL_BACKWARD = BackwardFactor(flops=2.0, bytes_moved=2.0)
#: Read grad-out and saved inputs, write grad-in: ~1-1.7x the forward bytes, rounded up to 2x.
ELEMENTWISE_BACKWARD = BackwardFactor(flops=2.0, bytes_moved=2.0)


def backward_factor(forward_flops: int) -> BackwardFactor:
    """The factor for an op given its forward FLOPs as captured.

    Capture counts FLOPs only for matmul-class ops (torch's flop counter gives elementwise ops zero), so a
    non-zero count identifies a matmul-class op. Today both factors are 2x; the split keeps the reason apart
    should a calibration change one of them.
    """
    return MATMUL_BACKWARD if forward_flops > 0 else ELEMENTWISE_BACKWARD


def compute_time(flops: float, bytes_moved: float, dtype: torch.dtype, hw: HardwareSpec) -> float:
    """Seconds for a kernel doing ``flops`` in ``dtype`` and moving ``bytes_moved`` through device memory.

    ``max(flops / (peak(dtype) * compute_efficiency), bytes_moved / (hbm_bandwidth * memory_efficiency))``.
    An op with no FLOPs never looks up a peak, so integer ops (index gathers, masks) price by bytes alone.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops and bytes_moved must be >= 0, found {flops} and {bytes_moved}")
    compute = flops / (hw.peak_flops_for(dtype) * hw.compute_efficiency) if flops else 0.0
    memory = bytes_moved / (hw.hbm_bandwidth * hw.memory_efficiency)
    return max(compute, memory)
