"""A loss whose reduction the graph cannot tell, on 4 simulated ranks: refused where a split changes it
(micro-batches), exact where the graph can be made so (dp), trained equal to one device once declared
(`loss_reduction=`).

Simulation as in test_runtime_sim.py (fake process group, LocalTensorMode).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoshard
from autoshard.errors import InputError
from autoshard.runtime.fsdp import full_value
from test_runtime_sim import WORLD, local_mode, value


class CrossEntropyPlusPenalty(nn.Module):
    """Two terms reduced differently: no single numerator over a denominator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.down(torch.relu(self.up(x)))
        return F.cross_entropy(out, y) + 0.01 * out.pow(2).mean()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def test_an_unknown_reduction_is_refused_for_micro_batches(fake_world) -> None:
    model, inputs = CrossEntropyPlusPenalty(), batch()
    with pytest.raises(InputError, match=r"the loss is add \(add.Tensor\); 4 micro-batches.*loss_reduction"):
        autoshard.plan(model, inputs, f"cpu:{WORLD}", mesh={"tp": 4}, micro_batch_size=2)
    with pytest.raises(InputError, match=r"the loss is add \(add.Tensor\); 2 micro-batches"):
        autoshard.plan(model, inputs, f"cpu:{WORLD}", mesh={"dp": 4}, micro_batch_size=1)
    searched = autoshard.plan(model, inputs, f"cpu:{WORLD}")  # the search keeps to the splits that are exact
    t = searched.training
    assert (t.pp, t.num_micro_batches) == (1, 1)
    assert "unknown" in t.loss_reduction


def test_an_unknown_reduction_with_a_token_mean_inside_is_exact_under_dp(fake_world) -> None:
    """Padded labels spread unevenly over the 4 ranks: the cross-entropy mean inside the two-term loss
    counts the global batch's real labels (rewritten to sum / count in the graph)."""
    model, (x, y) = CrossEntropyPlusPenalty(), batch()
    y = y.clone()
    y[:3] = -100  # rank 0 holds rows 0-1 (none real), rank 1 rows 2-3 (one real)
    reference = copy.deepcopy(model)
    reference(x, y).backward()
    with local_mode():
        compiled = autoshard.compile(model, (x, y), mesh={"dp": 4})
        loss = compiled.step(x, y)
        grads = {n: value(full_value(p.grad)) for n, p in compiled.named_parameters()}
    torch.testing.assert_close(torch.tensor(loss), reference(x, y).detach(), rtol=1e-6, atol=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_declared_mean_trains_equal_to_one_device_over_micro_batches_and_dp(fake_world) -> None:
    model, inputs = CrossEntropyPlusPenalty(), batch()  # every label counts: equal micro-batches weigh equally
    reference = copy.deepcopy(model)
    reference(*inputs).backward()
    with local_mode():
        plan = autoshard.plan(model, inputs, f"cpu:{WORLD}", mesh={"dp": 4}, micro_batch_size=1,
                              zero_stage=0, recompute="none", loss_reduction="mean")  # fmt: skip
        assert plan.training.num_micro_batches == 2 and "declared" in plan.training.loss_reduction
        compiled = autoshard.compile(model, inputs, plan=plan, loss_reduction="mean")
        loss = compiled.step(*inputs)
        grads = {n: value(full_value(p.grad)) for n, p in compiled.named_parameters()}
    torch.testing.assert_close(torch.tensor(loss), reference(*inputs).detach(), rtol=1e-6, atol=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_plan_made_without_the_declaration_is_refused_at_compile(fake_world) -> None:
    model, inputs = CrossEntropyPlusPenalty(), batch()
    with local_mode():
        plan = autoshard.plan(model, inputs, f"cpu:{WORLD}", mesh={"dp": 4}, micro_batch_size=1,
                              zero_stage=0, recompute="none", loss_reduction="mean")  # fmt: skip
        with pytest.raises(InputError, match="2 micro-batches"):
            autoshard.compile(model, inputs, plan=plan)  # compile reads the graph afresh: declare it there too
