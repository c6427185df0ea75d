"""The single-device oracle: what the model itself computes, trained on one device.

Distributed runs are judged against it (the demo prints both, the benchmarks check their losses, the
tests compare losses, gradients and parameters)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from autoshard.capture.calls import eager_loss

__all__ = ["SingleDeviceRun", "single_device_losses", "single_device_run"]

Batch = tuple[Any, ...] | Mapping[str, Any]


class SingleDeviceRun(NamedTuple):
    losses: list[float]  # one per step
    first_grads: dict[str, torch.Tensor]  # after the first backward, by parameter name (none for a parameter nothing reads)
    params: dict[str, torch.Tensor]  # the state dict after the last step: parameters under every name
    # (tied weights under each) and persistent buffers (BatchNorm's running statistics)


def single_device_run(
    model: nn.Module, batches: Sequence[Batch], *, lr: float, optimizer: str = "sgd"
) -> SingleDeviceRun:
    """A copy of `model` trained with `optimizer` ("sgd" or "adamw") at `lr`, one step per batch. A
    batch is a tuple of positional arguments or a dict of keyword arguments; the loss is found in the
    model's output as autoshard finds it (capture/calls.py: a scalar, `.loss`, the scalar of a tuple)."""
    model = copy.deepcopy(model)
    from autoshard.runtime.module import optimizer_factory  # the runtime's own choice of class

    opt = optimizer_factory(optimizer, lr)(list(model.parameters()))
    losses: list[float] = []
    first_grads: dict[str, torch.Tensor] = {}
    for step, batch in enumerate(batches):
        opt.zero_grad()
        loss = eager_loss(model(**batch) if isinstance(batch, Mapping) else model(*batch))
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return SingleDeviceRun(losses, first_grads, params)


def single_device_losses(model: nn.Module, batches: Sequence[Batch], *, lr: float) -> list[float]:
    """Loss of each step when a copy of `model` is trained with SGD(lr) on `batches`, one per step."""
    return single_device_run(model, batches, lr=lr).losses
