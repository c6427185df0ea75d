"""capture/resize.py: a capture at another batch size, specialised from one symbolic-batch export,
is the graph a concrete export at that size gives -- node by node, names, arguments, shapes and
strides -- on models nobody here wrote; and where it cannot be, capture falls back to exporting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoshard
import zoo
from autoshard.capture import _resized
from autoshard.capture.calls import as_call
from autoshard.capture.export import export_model
from autoshard.capture.inputs import model_device, normalize_inputs
from autoshard.capture.resize import graph_signature
from autoshard.models import build

# gpt2: HF's `hidden_states[:, slice(0, None), :]`, an alias in a concrete trace; t5: encoder-decoder
# with shifted labels; resnet: convolutions and train-mode BatchNorm; nanogpt: plain user code
ZOO = ["gpt2", "t5", "resnet", "nanogpt"]


def _ir_rows(ir: autoshard.GraphIR) -> tuple:
    """Everything the planner reads of a capture: every node's facts, the parameters, the loss."""
    return ir.nodes, ir.params, repr(ir.loss), ir.batch_size  # the loss: its counting function aside


@pytest.mark.parametrize("name", ZOO)
def test_a_specialised_graph_is_the_concrete_export_of_that_size(name: str) -> None:
    model = zoo.build(name, large=False, device="meta")
    inputs = zoo.inputs(name, 4, device="meta")
    ir = autoshard.capture(model, inputs)
    ir.recapture.expect(range(2, 12))  # as a search over many micro-batch sizes would
    call = normalize_inputs(as_call(inputs), model_device(model))
    for rows in (3, 6):
        exported = ir.recapture.symbolic.at(rows)
        assert exported is not None, ir.recapture.symbolic.reason
        assert graph_signature(exported) == graph_signature(export_model(model, _resized(call, rows)))
    # the whole capture (loss rewrite, costs) from it equals a capture of the resized inputs
    resized = _resized(call, 6)
    assert _ir_rows(ir.recapture(6)) == _ir_rows(autoshard.capture(model, resized.args, resized.kwargs))


def test_gpt_recaptures_come_from_the_symbolic_export_and_size_1_is_exported() -> None:
    model = build("gpt-tiny", device="meta")
    idx = torch.zeros(8, 16, dtype=torch.long, device="meta")
    ir = autoshard.capture(model, (idx, idx))
    assert ir.recapture.symbolic.at(2) is None  # no sizes expected: a symbolic export would not pay
    ir.recapture.expect(range(1, 12))
    assert ir.recapture.symbolic.at(2) is not None, ir.recapture.symbolic.reason
    assert ir.recapture.symbolic.at(1) is None  # export specialises size 1: outside its proven range
    one = ir.recapture(1)
    assert one.batch_size == 1
    small = torch.zeros(1, 16, dtype=torch.long, device="meta")
    assert _ir_rows(one) == _ir_rows(autoshard.capture(model, (small, small)))  # one tensor twice: two inputs


class _FixedBatch(nn.Module):
    """A model that bakes its batch size in (`view(8, ...)`): no symbolic batch exists for it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).view(8, 2, 2).sum()


def test_a_model_without_a_symbolic_batch_is_exported_at_each_size() -> None:
    model = _FixedBatch()
    ir = autoshard.capture(model, (torch.zeros(8, 4),))
    ir.recapture.expect(range(2, 12))
    assert ir.recapture.symbolic.at(4) is None
    assert ir.recapture.symbolic.reason  # says why
    with pytest.raises(autoshard.CaptureError):  # the model itself cannot run at 4 rows
        ir.recapture(4)


class _EvenBatch(nn.Module):
    """Runs only on an even batch of at least 6 rows: export's guards say so, its range ([2, inf]) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        torch._check(b % 2 == 0)
        return self.lin(x).view(b // 2, 2, 4).sum()


def test_sizes_the_symbolic_export_assumed_away_are_exported_concretely() -> None:
    model = _EvenBatch()
    ir = autoshard.capture(model, (torch.zeros(8, 4),))
    ir.recapture.expect(range(2, 12))
    symbolic = ir.recapture.symbolic
    for rows in (4, 6, 10):
        exported = symbolic.at(rows)
        assert exported is not None, (rows, symbolic.reason)
        assert graph_signature(exported) == graph_signature(export_model(model, as_call((torch.zeros(rows, 4),))))
    for rows in (2, 3, 5):  # 2 // 2 == 1 is guarded out, odd sizes too
        assert symbolic.at(rows) is None
