"""Micro-batches: a plan is made for one micro-batch of every data-parallel replica
(`micro_batch_size * dp` sequences along dim 0); a step runs `num_micro_batches` of them.

How micro-batch losses combine into the global batch's is the loss's reduction (capture/loss_reduction.py):
each micro-batch's numerator over the global denominator, never a blind average of micro-batch means
(which is wrong for a token mean whose micro-batches hold different numbers of real labels, and for a sum).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch.utils._pytree import tree_map_only
from torch.export.graph_signature import InputKind

from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan

__all__ = ["BatchLayout", "first_micro_batch", "micro_batch_rows", "split_micro_batches"]

T = TypeVar("T")


def micro_batch_rows(plan: Plan) -> int:
    """Sequences in one micro-batch of all replicas (0 when the plan does not say)."""
    return plan.training.micro_batch_size * plan.axis_size("dp")


def first_micro_batch(inputs: T, plan: Plan) -> T:
    """The example inputs to capture for `plan` (any nesting of tuples and dicts: positional and keyword
    arguments alike): global-batch tensors (`num_micro_batches` micro-batches) are cut to the first
    micro-batch; inputs already one micro-batch long are kept."""
    t = plan.training
    micro = micro_batch_rows(plan)
    if micro <= 0 or t.num_micro_batches == 1:
        return inputs
    return tree_map_only(
        torch.Tensor, lambda x: x[:micro] if x.ndim and x.shape[0] == micro * t.num_micro_batches else x, inputs
    )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BatchLayout:
    """Which user inputs carry the batch, and how many rows along dim 0 the plan runs.

    The generated program is the graph captured for one micro-batch of every replica, sharded as planned:
    a batch of other rows does not fail by itself (a dp shard of uneven or zero rows gives a NaN mean, or
    a loss over the wrong sequences), so every entry point checks the batch here first, where the input
    enters, and says which batch the plan takes."""

    batched: tuple[tuple[int, str, int], ...]  # (position in the flat user inputs, input name, rows per micro-batch)
    micro_rows: int  # rows of one micro-batch of every replica (0: neither plan nor capture says)
    micro_batch_size: int  # rows per dp replica per micro-batch (0: the plan does not say)
    dp: int
    num_micro_batches: int

    @classmethod
    def of(cls, ir: GraphIR, plan: Plan) -> BatchLayout:
        """The layout of `ir` (captured for one micro-batch of every replica) under `plan`: a user input
        carries the batch when it is a tensor whose captured dim 0 is that micro-batch's rows. The rows are
        the plan's (micro_batch_size x dp), else the capture's (the dim 0 every tensor input shares). Where
        neither says (inputs disagree on dim 0, e.g. a feature-weight vector beside the batch), every tensor
        input is held to the dim 0 it was captured with: the program is made for those shapes."""
        t = plan.training
        placeholders = {n.name: n for n in ir.exported.graph.nodes if n.op == "placeholder"}
        users = [s.arg.name for s in ir.exported.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
        micro = micro_batch_rows(plan) or ir.batch_size or 0
        batched = []
        for i, name in enumerate(users):
            val = placeholders[name].meta.get("val") if name in placeholders else None
            if isinstance(val, torch.Tensor) and val.ndim and (val.shape[0] == micro or not micro):
                batched.append((i, name, int(val.shape[0])))
        return cls(
            batched=tuple(batched),
            micro_rows=micro,
            micro_batch_size=t.micro_batch_size,
            dp=plan.axis_size("dp"),
            num_micro_batches=t.num_micro_batches,
        )

    def check(self, inputs: Sequence[Any], *, entry: str, micro_batches: int | None = None) -> None:
        """Refuse `inputs` unless every batched tensor has `micro_batches` (default: the plan's
        `num_micro_batches`) micro-batches of rows along dim 0. `entry` names the call for the message."""
        m = self.num_micro_batches if micro_batches is None else micro_batches
        for i, name, micro in self.batched:
            want = micro * m
            x = inputs[i] if i < len(inputs) else None
            if not isinstance(x, torch.Tensor) or (x.ndim and x.shape[0] == want):
                continue
            found = f"{x.shape[0]} rows along dim 0" if x.ndim else "no dim 0 (a scalar)"
            if self.micro_batch_size:
                each = f"micro_batch_size {self.micro_batch_size} x dp {self.dp} = {micro} rows"
            else:
                each = f"{micro} rows (the rows it was captured with)"
            plural = "micro-batch" if m == 1 else "micro-batches"
            whole = " (micro_batch_size x dp x num_micro_batches)" if self.micro_batch_size and m == self.num_micro_batches else ""
            raise InputError(
                f"input {name} (argument {i}) has {found}; {entry} runs {m} {plural} of {each}, "
                f"so it takes a batch of exactly {want} rows{whole}. Pass {want} rows, or compile for this "
                f"batch: capture and plan with example inputs of that many rows (a multiple of dp {self.dp})."
            )


def split_micro_batches(inputs: Sequence[Any], layout: BatchLayout) -> list[tuple[Any, ...]]:
    """The global batch checked (`layout.check`) and cut into `num_micro_batches` equal pieces along dim 0
    (the inputs that carry the batch; everything else is passed to every piece)."""
    layout.check(inputs, entry="train_step")
    m, micro = layout.num_micro_batches, layout.micro_rows
    if m == 1:
        return [tuple(inputs)]
    cut = {i for i, _, _ in layout.batched}
    return [
        tuple(x[k * micro : (k + 1) * micro] if i in cut and isinstance(x, torch.Tensor) else x for i, x in enumerate(inputs))
        for k in range(m)
    ]
