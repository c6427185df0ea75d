"""Capture: a user's nn.Module and example inputs -> GraphIR, via torch.export on meta/fake tensors."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from autoshard.capture.build import build_graph_ir
from autoshard.capture.export import export_model
from autoshard.capture.inputs import model_device, normalize_inputs
from autoshard.hints import record_module_names, step_hints
from autoshard.ir.graph import GraphIR

__all__ = ["capture"]


def capture(model: nn.Module, example_inputs: Any) -> GraphIR:
    """Capture `model` called on `example_inputs` as a GraphIR with shapes, costs and parameter identities.

    Works on a model built on the meta device (no parameter memory: a 175B model captures in seconds).
    `example_inputs` is a tensor or a tuple of the forward's positional arguments; tensors on another
    device than the model are replaced by same-shaped ones on the model's device, as only shapes matter.
    """
    device = model_device(model)
    args = normalize_inputs(example_inputs, device)
    record_module_names(model)  # so a hint refused during tracing names its module
    exported = export_model(model, args)
    ir = build_graph_ir(model, exported)
    batch = _batch_size(args)
    return dataclasses.replace(
        ir,
        batch_size=batch,
        recapture=_Recapture(model, args) if batch else None,
        step_hints=step_hints(model),
    )


def _batch_size(args: tuple[Any, ...]) -> int | None:
    """Dim 0 of the tensor inputs if they all share it (the batch, by PyTorch convention)."""
    sizes = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


class _Recapture:
    """Capture the same model on the same inputs resized to another batch (dim 0)."""

    def __init__(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        self.model, self.args = model, args

    def __call__(self, batch: int) -> GraphIR:
        args = tuple(
            torch.empty((batch, *a.shape[1:]), dtype=a.dtype, device=a.device)
            if isinstance(a, torch.Tensor) and a.dim() > 0 else a
            for a in self.args
        )
        return capture(self.model, args)
