"""Capture: a user's nn.Module and example inputs -> GraphIR, via torch.export on meta/fake tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from autoshard.capture.build import build_graph_ir
from autoshard.capture.calls import Call, as_call, find_loss
from autoshard.capture.loss_reduction import reduction_at_capture
from autoshard.capture.export import export_model
from autoshard.capture.resize import SymbolicBatch, graph_signature
from autoshard.capture.inputs import model_device, normalize_inputs
from autoshard.hints import checking_module_hints, record_module_names, step_hints
from autoshard.ir.graph import GraphIR

__all__ = ["capture"]


def capture(
    model: nn.Module,
    example_inputs: Any,
    kwargs: Mapping[str, Any] | None = None,
    *,
    loss_reduction: str | None = None,
    loss_in_graph: bool = True,
) -> GraphIR:
    """Capture `model` called on `example_inputs` as a GraphIR with shapes, costs and parameter identities.

    Works on a model built on the meta device (no parameter memory: a 175B model captures in seconds).
    `example_inputs` is a tensor, a tuple of the forward's positional arguments, or a dict of its keyword
    arguments (`{"input_ids": ids, "labels": labels}`, as Hugging Face models are called); `kwargs` adds
    keywords to positional inputs. Tensors on another device than the model are replaced by same-shaped
    ones on the model's device, as only shapes matter. The loss among the outputs is found here
    (`GraphIR.loss`: a scalar output, a ModelOutput's `.loss`, or the single scalar of a tuple), with its
    reduction (`GraphIR.loss.reduction`, capture/loss_reduction.py): where it is known, the graph is
    rewritten to return the loss's numerator, which the runtime divides by the global batch's denominator.
    `loss_reduction` ("mean" or "sum") declares it where the graph cannot tell; `loss_in_graph=False`
    says the loss is computed outside the graph (compile's `loss_fn`), so the graph is left as it is.
    """
    device = model_device(model)
    call = normalize_inputs(as_call(example_inputs, kwargs), device)
    record_module_names(model)  # so a hint refused during tracing names its module
    with checking_module_hints(model):  # a module hint that never took effect is refused, not dropped
        exported = export_model(model, call)
    batch = _batch_size(call)
    # other batch sizes (the step search's micro-batches) from one symbolic-batch export, checked
    # against this one before the loss rewrite below changes its graph (capture/resize.py)
    recapture = _Recapture(model, call, loss_reduction, loss_in_graph, graph_signature(exported), batch) if batch else None
    return _graph_ir(model, call, exported, batch, recapture, loss_reduction, loss_in_graph)


def _graph_ir(
    model: nn.Module,
    call: Call,
    exported: ExportedProgram,
    batch: int | None,
    recapture: _Recapture | None,
    loss_reduction: str | None,
    loss_in_graph: bool,
) -> GraphIR:
    """The GraphIR of `exported`: the loss found and its reduction read (the graph rewritten to return
    the numerator), shapes, costs and parameter identities."""
    loss = find_loss(exported)

    def export_at(rows: int) -> tuple[Any, int | None]:  # the same model at another batch, to tell x.shape[0]
        other = export_model(model, _resized(call, rows))
        return other, find_loss(other).index

    reduction = reduction_at_capture(exported, loss.index, batch, loss_reduction, loss_in_graph, export_at)
    loss = dataclasses.replace(loss, reduction=reduction)
    ir = build_graph_ir(model, exported)  # after the rewrite: the planner prices the graph that runs
    return dataclasses.replace(ir, batch_size=batch, recapture=recapture, step_hints=step_hints(model), loss=loss)


def _batch_size(call: Call) -> int | None:
    """Dim 0 of the tensor inputs if they all share it (the batch, by PyTorch convention)."""
    sizes = {a.shape[0] for a in call.tensors() if a.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _resized(call: Call, batch: int) -> Call:
    """`call` with its batched tensors resized to `batch` rows (dim 0; values do not matter)."""
    return call.map_tensors(
        lambda a: torch.empty((batch, *a.shape[1:]), dtype=a.dtype, device=a.device) if a.dim() > 0 else a
    )


class _Recapture:
    """Capture the same model on the same inputs resized to another batch (dim 0): specialised from one
    symbolic-batch export where that is exact (capture/resize.py), else exported at that size."""

    def __init__(
        self, model: nn.Module, call: Call, loss_reduction: str | None, loss_in_graph: bool,
        reference: list[tuple], rows: int,
    ) -> None:
        self.model, self.call = model, call
        self.loss_reduction, self.loss_in_graph = loss_reduction, loss_in_graph
        self.symbolic = SymbolicBatch(model, call, reference, rows, self._export_symbolic)
        self.how = ""  # how the last capture was made, for progress messages

    def _export_symbolic(self, model: nn.Module, args: Any, kwargs: Any, dynamic_shapes: Any) -> ExportedProgram:
        with checking_module_hints(model):
            return export_model(model, Call(args=args, kwargs=kwargs), dynamic_shapes=dynamic_shapes)

    def expect(self, sizes: Iterable[int]) -> None:
        """The batch sizes a search will ask for: the symbolic export (~3 concrete exports' time) is
        made only when enough of them lie in its range to pay for it (`SymbolicBatch.worth_it`)."""
        self.symbolic.expect(sizes)

    def __call__(self, batch: int) -> GraphIR:
        resized = _resized(self.call, batch)
        prepared = self.symbolic.prepared
        exported = self.symbolic.at(batch)
        made = ""
        if not prepared and self.symbolic.prepared:
            reason = self.symbolic.reason
            made = f"symbolic-batch export not usable: {reason}; " if reason else "symbolic-batch export made; "
        self.how = made + ("exported" if exported is None else "specialised from the symbolic-batch export")
        if exported is None:
            return capture(
                self.model, resized.args, resized.kwargs,
                loss_reduction=self.loss_reduction, loss_in_graph=self.loss_in_graph,
            )  # fmt: skip
        return _graph_ir(self.model, resized, exported, batch, self, self.loss_reduction, self.loss_in_graph)
