"""Capture: a user's nn.Module and example inputs -> GraphIR, via torch.export on meta/fake tensors."""

from __future__ import annotations

from typing import Any

from torch import nn

from autoshard.capture.build import build_graph_ir
from autoshard.capture.export import export_model
from autoshard.capture.inputs import model_device, normalize_inputs
from autoshard.hints import record_module_names
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
    return build_graph_ir(model, exported)
