"""The loss's reduction read from the graph (capture/loss_reduction.py), against the single device.

For every loss the reader knows, the rewritten graph run on each micro-batch, its numerators summed and
divided by the global batch's denominator, must give the single-device loss of the whole batch and its
gradients, for 1, 2 and 4 micro-batches whose counts of real targets differ. (Averaging micro-batch
losses, what the runtime did before, fails this for the token means and the sum.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoshard
from autoshard.errors import InputError

ROWS, SEQ, CLASSES = 8, 6, 5


def padded_targets(seed: int = 0) -> torch.Tensor:
    """Rows with different numbers of real targets, the rest -100 (as a collator pads)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (ROWS, SEQ), generator=g)
    for r in range(ROWS):
        y[r, 1 + (r * 5) % SEQ :] = -100
    return y


LOSSES = {
    "cross_entropy": lambda o, y, m: F.cross_entropy(o.reshape(-1, CLASSES), y.reshape(-1)),
    "label_smoothing": lambda o, y, m: F.cross_entropy(o.reshape(-1, CLASSES), y.reshape(-1), label_smoothing=0.1),
    "nll_ignore_1": lambda o, y, m: F.nll_loss(F.log_softmax(o, -1).reshape(-1, CLASSES), y.clamp(min=-1).reshape(-1), ignore_index=-1),
    "sum": lambda o, y, m: F.cross_entropy(o.reshape(-1, CLASSES), y.reshape(-1), reduction="sum"),
    "scaled_sum": lambda o, y, m: 0.5 * F.cross_entropy(o.reshape(-1, CLASSES), y.reshape(-1), reduction="sum"),
    "mse": lambda o, y, m: F.mse_loss(o, torch.zeros_like(o)),
    "mean": lambda o, y, m: o.pow(2).mean(),
    "masked_mean": lambda o, y, m: (o.pow(2).sum(-1) * m).sum() / m.sum(),
    "probabilities": lambda o, y, m: F.cross_entropy(o, F.softmax(o.detach() * 0 + m[..., None], -1)),
}
KINDS = {
    "cross_entropy": "token mean", "label_smoothing": "token mean", "nll_ignore_1": "token mean", "sum": "sum",
    "scaled_sum": "sum", "mse": "mean", "mean": "mean", "masked_mean": "masked mean", "probabilities": "row mean",
}  # fmt: skip


class Head(nn.Module):
    def __init__(self, loss: str) -> None:
        super().__init__()
        self.proj, self.loss = nn.Linear(4, CLASSES), loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return LOSSES[self.loss](self.proj(x), y, mask)


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    y = padded_targets()
    return torch.randn(ROWS, SEQ, 4, generator=g), y, (y != -100).float()


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_numerators_over_the_global_denominator_equal_one_device(loss: str, micro_batches: int) -> None:
    torch.manual_seed(0)
    model = Head(loss)
    inputs = batch()
    rows = ROWS // micro_batches
    chunks = [tuple(t[k * rows : (k + 1) * rows] for t in inputs) for k in range(micro_batches)]
    ir = autoshard.capture(copy.deepcopy(model), chunks[0])
    reduction = ir.loss.reduction
    assert reduction.kind == KINDS[loss], reduction
    program = ir.exported.module()
    denominator = reduction.denominator(chunks)
    total = sum(program(*c) for c in chunks) / denominator
    expected = model(*inputs)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)
    total.backward()
    expected.backward()
    for (name, p), q in zip(program.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_averaging_micro_batch_token_means_is_not_one_device() -> None:
    """The check above can fail: the old rule (mean of the micro-batch means) differs on these batches."""
    model, inputs = Head("cross_entropy"), batch()
    halves = [tuple(t[k * 4 : (k + 1) * 4] for t in inputs) for k in range(2)]
    averaged = sum(model(*h) for h in halves) / 2
    assert not torch.allclose(averaged, model(*inputs), rtol=1e-4)


class TwoTerms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        return F.cross_entropy(out.reshape(-1, CLASSES), y.reshape(-1)) + 0.1 * out.pow(2).mean()


class BatchSizeDivisor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.proj(x).reshape(-1, CLASSES), y.reshape(-1), reduction="sum") / x.shape[0]


def test_unknown_reductions_name_what_was_found_and_refuse_the_splits_that_change_them() -> None:
    x, y, _ = batch()
    two = autoshard.capture(TwoTerms(), (x, y)).loss.reduction
    assert two.kind == "unknown" and "add" in two.found
    with pytest.raises(InputError, match="the loss is add.*2 micro-batches.*loss_reduction"):
        two.check_split(dp=1, pp=1, micro_batches=2)
    two.check_split(dp=4, pp=1, micro_batches=1)  # one micro-batch: dp reduces the graph as one device
    divided = autoshard.capture(BatchSizeDivisor(), (x, y)).loss.reduction
    assert divided.kind == "unknown" and "divides by 8, the captured batch of 8 rows (x.shape[0])" in divided.found
    with pytest.raises(InputError, match="2 pipeline stages"):
        divided.check_split(dp=1, pp=2, micro_batches=1)
    divided.check_split(dp=4, pp=1, micro_batches=1)  # dp alone: DTensor divides the global sum by 8


def test_a_token_mean_inside_a_larger_loss_becomes_sum_over_count_in_the_graph() -> None:
    """Inside a loss of two terms the cross-entropy mean is rewritten to its sum over the count of real
    targets (DTensor then reduces both over the ranks, where it would average per-rank means); the
    graph still computes the model's loss."""
    x, y, _ = batch()
    model = TwoTerms()
    ir = autoshard.capture(copy.deepcopy(model), (x, y))
    ops = [n.target for n in ir.exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.ne.Scalar in ops and torch.ops.aten.div.Tensor in ops
    torch.testing.assert_close(ir.exported.module()(x, y), model(x, y), rtol=1e-6, atol=1e-7)


class Weighted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, CLASSES)
        self.register_buffer("weight", torch.arange(1.0, CLASSES + 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.proj(x).reshape(-1, CLASSES), y.reshape(-1), weight=self.weight)


def test_a_class_weighted_mean_is_refused_for_every_split() -> None:
    """Its mean divides by the weights of the targets seen, which no count from the inputs gives."""
    x, y, _ = batch()
    weighted = autoshard.capture(Weighted(), (x, y)).loss.reduction
    assert weighted.kind == "unknown" and "class weights" in weighted.found
    with pytest.raises(InputError, match="dp=2 ranks.*class-weighted mean"):
        weighted.check_split(dp=2, pp=1, micro_batches=1)
    with pytest.raises(InputError, match="2 micro-batches"):
        weighted.check_split(dp=1, pp=1, micro_batches=2)
    weighted.check_split(dp=1, pp=1, micro_batches=1)


def test_a_declared_reduction_is_used_where_the_graph_cannot_tell_and_refused_where_it_contradicts() -> None:
    x, y, m = batch()
    declared = autoshard.capture(BatchSizeDivisor(), (x, y), loss_reduction="mean").loss.reduction
    assert declared.declared and declared.kind == "mean"
    declared.check_split(dp=2, pp=2, micro_batches=4)
    assert declared.denominator([()] * 4) == 4  # equal micro-batches weigh equally
    with pytest.raises(InputError, match="loss_reduction='sum' was declared.*token mean"):
        autoshard.capture(Head("cross_entropy"), (x, y, m), loss_reduction="sum")
    with pytest.raises(InputError, match="expected loss_reduction among"):
        autoshard.capture(Head("cross_entropy"), (x, y, m), loss_reduction="batchmean")
