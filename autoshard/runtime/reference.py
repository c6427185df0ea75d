"""The single-device oracle: what the model itself computes, trained with plain SGD on one device.

Distributed runs are judged against it (the demo prints both, the benchmarks check their losses)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["single_device_losses"]


def single_device_losses(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], *, lr: float) -> list[float]:
    """Loss of each step when a copy of `model` is trained with SGD(lr) on `batches`, one per step."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model(*batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
