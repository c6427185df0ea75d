"""How models are called and what they return (capture/calls.py): keyword inputs, the loss found among
the outputs by the rules a user expects, and calls that differ from the captured one refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoshard
import zoo
from autoshard.capture.calls import eager_loss, flatten_call


class Net(nn.Module):
    """One linear layer; `returns` says what forward gives back."""

    def __init__(self, returns: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.returns = returns

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0):
        logits = self.fc(x) * scale
        loss = F.cross_entropy(logits, y)
        return {
            "scalar": lambda: loss,
            "dict": lambda: {"logits": logits, "loss": loss},
            "tuple": lambda: (logits, loss),
            "logits": lambda: logits,
            "two scalars": lambda: (loss, loss * 2),
        }[self.returns]()


def batch() -> dict:
    return {"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))}


@pytest.mark.parametrize(("returns", "index", "how"), [
    ("scalar", 0, "scalar"), ("dict", 1, "loss entry"), ("tuple", 1, "single scalar of a tuple"),
])
def test_loss_is_found_in_what_the_model_returns(returns: str, index: int, how: str) -> None:
    ir = autoshard.capture(Net(returns), batch())
    assert (ir.loss.index, ir.loss.how) == (index, how)
    # the output the index names really is the loss node (cross_entropy's result, a scalar)
    output = next(n for n in ir.exported.graph.nodes if n.op == "output")
    assert tuple(output.args[0][index].meta["val"].shape) == ()


@pytest.mark.parametrize(("returns", "why"), [("logits", "no scalar"), ("two scalars", "2 scalar outputs")])
def test_no_loss_found_says_what_the_model_returned(returns: str, why: str) -> None:
    ir = autoshard.capture(Net(returns), batch())
    assert ir.loss.index is None and why in ir.loss.how
    assert "[8, 3]" in ir.loss.found or "[]" in ir.loss.found


def test_hugging_face_model_output_loss_and_keywords() -> None:
    model = zoo.build("gpt2")
    inputs = zoo.inputs("gpt2", 4)
    ir = autoshard.capture(model, inputs)
    assert ir.loss.how == "loss entry" and "logits [4, 16, 128]" in ir.loss.found
    assert ir.batch_size == 4
    # keywords in another order are the same call; the flat inputs follow the graph's order
    flat = flatten_call(ir.exported, (), dict(reversed(list(inputs.items()))))
    assert flat[0] is inputs["input_ids"] and flat[1] is inputs["attention_mask"] and flat[2] is inputs["labels"]
    assert flat[3] is False
    # and the eager loss is the ModelOutput's own
    assert eager_loss(model(**inputs)) is not None


def test_a_call_of_another_shape_or_constant_is_refused() -> None:
    ir = autoshard.capture(Net("scalar"), batch())
    b = batch()
    with pytest.raises(autoshard.InputError, match=r"keywords \['x', 'y'\]"):
        flatten_call(ir.exported, (), {"x": b["x"]})
    ir = autoshard.capture(Net("scalar"), {**batch(), "scale": 2.0})
    with pytest.raises(autoshard.InputError, match="captured with 2.0"):
        flatten_call(ir.exported, (), {**b, "scale": 3.0})
    assert flatten_call(ir.exported, (), {**b, "scale": 2.0})[2] == 2.0


def test_recapture_resizes_keyword_inputs() -> None:
    ir = autoshard.capture(zoo.build("bert"), zoo.inputs("bert", 4))
    small = ir.recapture(2)
    users = [n for n in small.exported.graph.nodes if n.op == "placeholder" and n.name in ("input_ids", "labels")]
    assert [tuple(n.meta["val"].shape) for n in users] == [(2, 16), (2, 16)]


def test_example_inputs_of_the_wrong_kind_are_refused() -> None:
    with pytest.raises(autoshard.InputError, match="dict of its keyword arguments"):
        autoshard.capture(Net("scalar"), "x")
