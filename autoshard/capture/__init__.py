"""Capture: a user's nn.Module and example inputs -> GraphIR, via torch.export on meta/fake tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autoshard.capture.build import build_graph_ir
from autoshard.capture.calls import Call, as_call, find_loss
from autoshard.capture.export import export_model
from autoshard.capture.inputs import model_device, normalize_inputs
from autoshard.hints import checking_module_hints, record_module_names, step_hints
from autoshard.ir.graph import GraphIR

__all__ = ["capture"]


def capture(model: nn.Module, example_inputs: Any, kwargs: Mapping[str, Any] | None = None) -> GraphIR:
    """Capture `model` called on `example_inputs` as a GraphIR with shapes, costs and parameter identities.

    Works on a model built on the meta device (no parameter memory: a 175B model captures in seconds).
    `example_inputs` is a tensor, a tuple of the forward's positional arguments, or a dict of its keyword
    arguments (`{"input_ids": ids, "labels": labels}`, as Hugging Face models are called); `kwargs` adds
    keywords to positional inputs. Tensors on another device than the model are replaced by same-shaped
    ones on the model's device, as only shapes matter. The loss among the outputs is found here
    (`GraphIR.loss`: a scalar output, a ModelOutput's `.loss`, or the single scalar of a tuple).
    """
    device = model_device(model)
    call = normalize_inputs(as_call(example_inputs, kwargs), device)
    record_module_names(model)  # so a hint refused during tracing names its module
    with checking_module_hints(model):  # a module hint that never took effect is refused, not dropped
        exported = export_model(model, call)
    ir = build_graph_ir(model, exported)
    batch = _batch_size(call)
    return dataclasses.replace(
        ir,
        batch_size=batch,
        recapture=_Recapture(model, call) if batch else None,
        step_hints=step_hints(model),
        loss=find_loss(exported),
    )


def _batch_size(call: Call) -> int | None:
    """Dim 0 of the tensor inputs if they all share it (the batch, by PyTorch convention)."""
    sizes = {a.shape[0] for a in call.tensors() if a.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


class _Recapture:
    """Capture the same model on the same inputs resized to another batch (dim 0)."""

    def __init__(self, model: nn.Module, call: Call) -> None:
        self.model, self.call = model, call

    def __call__(self, batch: int) -> GraphIR:
        resized = self.call.map_tensors(
            lambda a: torch.empty((batch, *a.shape[1:]), dtype=a.dtype, device=a.device) if a.dim() > 0 else a
        )
        return capture(self.model, resized.args, resized.kwargs)
