"""Mixed precision at run time: `precision="bf16-mixed"` runs forward under torch.autocast.

Matmuls then run in bf16 while reductions, norms and the loss stay in fp32 (autocast's op lists); the
parameters, their gradients and the optimizer state stay fp32: they are the master weights. The cost
model prices the same split (cost_model: bf16 compute and activations, fp32 master state).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from autoshard.errors import InputError
from autoshard.ir.plan import PRECISIONS

__all__ = ["autocast"]


def autocast(precision: str, device_type: str) -> ContextManager[Any]:
    """The context forward runs under for `precision` (a null context for fp32)."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise InputError(f"expected precision in {PRECISIONS}, found {precision!r}")
