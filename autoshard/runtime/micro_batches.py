"""Micro-batches: a plan is made for one micro-batch of every data-parallel replica
(`micro_batch_size * dp` sequences along dim 0); a step runs `num_micro_batches` of them.

Splitting a mean loss into equal micro-batches and scaling each by 1 / num_micro_batches gives exactly the
gradient of the mean over the global batch (as torch.distributed.pipelining's `scale_grads` assumes). A
model whose loss is a *sum* over the batch would get gradients 1 / num_micro_batches too small: its loss
must be a mean, like `F.cross_entropy`'s default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch.utils._pytree import tree_map_only

from autoshard.errors import InputError
from autoshard.ir.plan import Plan

__all__ = ["first_micro_batch", "micro_batch_rows", "split_micro_batches"]

T = TypeVar("T")


def micro_batch_rows(plan: Plan) -> int:
    """Sequences in one micro-batch of all replicas (0 when the plan does not say)."""
    return plan.training.micro_batch_size * plan.axis_size("dp")


def first_micro_batch(inputs: T, plan: Plan) -> T:
    """The example inputs to capture for `plan` (any nesting of tuples and dicts: positional and keyword
    arguments alike): global-batch tensors (`num_micro_batches` micro-batches) are cut to the first
    micro-batch; inputs already one micro-batch long are kept."""
    t = plan.training
    micro = micro_batch_rows(plan)
    if micro <= 0 or t.num_micro_batches == 1:
        return inputs
    return tree_map_only(
        torch.Tensor, lambda x: x[:micro] if x.ndim and x.shape[0] == micro * t.num_micro_batches else x, inputs
    )


def split_micro_batches(inputs: Sequence[Any], plan: Plan) -> list[tuple[Any, ...]]:
    """The global batch cut into `num_micro_batches` equal pieces along dim 0 (tensor inputs with a
    batch dim; everything else is passed to every piece)."""
    m = plan.training.num_micro_batches
    if m == 1:
        return [tuple(inputs)]
    micro = micro_batch_rows(plan)
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] != micro * m:
            raise InputError(
                f"input {i} has {x.shape[0]} rows; the plan runs {m} micro-batches of {micro} "
                f"(micro_batch_size {plan.training.micro_batch_size} x dp {plan.axis_size('dp')}), so a step "
                f"takes a global batch of {micro * m} along dim 0. Pass that batch, or plan for this one."
            )
    return [
        tuple(x[k * micro : (k + 1) * micro] if isinstance(x, torch.Tensor) and x.ndim else x for x in inputs)
        for k in range(m)
    ]
