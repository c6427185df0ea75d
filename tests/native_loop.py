"""The training loop a user writes, run on a compiled model and on the single-device model alike.

AdamW with two param groups (weight decay on matrices, none on norms and biases), a linear warmup
schedule, and clipping to a global norm the gradients exceed, so each part acts. On the compiled model
the loop calls `model.step(*batch)` and `model.clip_grad_norm_`; on one device, `loss.backward()` and
`torch.nn.utils.clip_grad_norm_`: the only two lines that differ (README's loop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autoshard.runtime.fsdp import full_value

STEPS = 3
LR = 1e-2
MAX_NORM = 0.5  # below gpt-tiny's gradient norms (a test checks the reference clips)
WEIGHT_DECAY = 0.1


@dataclasses.dataclass
class LoopRun:
    losses: list[float]
    norms: list[float]  # the global gradient norm before clipping, each step
    first_grads: dict[str, torch.Tensor]  # after the first step's clipping
    params: dict[str, torch.Tensor]  # after the last step

    def reconciled(self, value: Callable[[torch.Tensor], torch.Tensor]) -> LoopRun:
        """The run with `value` applied to every tensor (a simulated rank's common value)."""
        return LoopRun(
            self.losses, self.norms, {n: value(t) for n, t in self.first_grads.items()},
            {n: value(t) for n, t in self.params.items()},
        )  # fmt: skip


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings; none on vectors (norm weights, biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 2)


def training_state(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The user's AdamW (two param groups) and warmup schedule over `model.parameters()`."""
    opt = torch.optim.AdamW(param_groups(model), lr=LR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, sched: Any, batches: Sequence[Sequence[Any]], *, native: bool
) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One loop step per batch; returns the losses, the norms before clipping and the first step's
    clipped gradients (full values)."""
    losses, norms, first = [], [], {}
    for step, batch in enumerate(batches):
        if native:
            losses.append(model.step(*batch))
            norm = model.clip_grad_norm_(MAX_NORM)
        else:
            loss = model(*batch)
            loss = loss if torch.is_tensor(loss) else loss.loss
            loss.backward()
            losses.append(float(loss))
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        norms.append(float(norm.reconcile() if hasattr(norm, "reconcile") else norm))
        if step == 0:
            first = {n: full_value(p.grad.detach()) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        sched.step()
    return losses, norms, first


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full_value(p.detach()) for n, p in model.named_parameters()}


def user_loop(model: nn.Module, batches: Sequence[Sequence[Any]], *, native: bool) -> LoopRun:
    """`len(batches)` steps of the loop; `native` for a compiled model."""
    opt, sched = training_state(model)
    losses, norms, first = train_steps(model, opt, sched, batches, native=native)
    return LoopRun(losses, norms, first, full_params(model))
