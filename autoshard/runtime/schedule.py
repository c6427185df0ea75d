"""Schedules: how a compiled model's stages run one global batch.

Every plan is a pipeline of stages (runtime/stage.py); the schedule is what differs:

- `Accumulation`, for a plan without pipelining: its one stage runs the plan's micro-batches in turn,
  one backward each (gradient accumulation), with FSDP told before each whether it is the last (ZeRO's
  stage, runtime/fsdp.py). The loss comes out of the stage's own graph.
- `Pipeline`, for `training.pp > 1`: torch.distributed.pipelining's GPipe, 1F1B or interleaved 1F1B over
  the stages this rank runs, with the loss tail as the schedule's `loss_fn` on the last stage, so the
  targets never travel. A parameter read by stages on two pp ranks (GPT's tied wte / lm_head) has a
  copy on each; after backward the copies' gradients are summed over the pp axis (Megatron's embedding
  all-reduce), so every copy takes the same optimizer step and the copies stay equal.

Under torch's pipelining the schedule drives FSDP itself: gradients accumulate unsharded over the
micro-batches and are reduce-scattered once after the last (so ZeRO-2 acts as ZeRO-1 there, and ZeRO-3
keeps a stage's parameters gathered across its micro-batches' backward). The schedule's `scale_grads`
is off: it divides `p.grad` afterwards, which ZeRO-2 has already moved into its shard; each micro-batch's
loss is divided by the global batch's denominator instead (capture/loss_reduction.py).

Both give `step(inputs, denominator) -> float` (the global batch's loss on every rank) and
`forward(inputs) -> outputs` (one micro-batch of every replica, no gradients; the model's user outputs
as full tensors, graph order, the loss still a numerator).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from autoshard.errors import InputError
from autoshard.passes.stages import StageSplit
from autoshard.runtime.fsdp import before_micro_batch
from autoshard.runtime.grad_sync import OverlappedSync
from autoshard.runtime.module import as_float
from autoshard.runtime.stage import LossTail, Stage

__all__ = ["SCHEDULES", "Accumulation", "Phase", "Pipeline", "no_phase"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}

Phase = Callable[[str], ContextManager[None]]


def no_phase(_name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


class Accumulation:
    """One stage over the micro-batches, a backward per micro-batch."""

    def __init__(
        self,
        stage: Stage,
        loss_of: Callable[[Sequence[Any]], Any],
        fsdp: Sequence[FSDPModule],
        zero_stage: int,
        sync: OverlappedSync | None = None,
    ) -> None:
        self.stage, self.loss_of, self.fsdp, self.zero_stage = stage, loss_of, list(fsdp), zero_stage
        self.sync = sync  # told before the last backward, so the gradient buckets start reducing in it

    def step(self, chunks: Sequence[Sequence[Any]], denominator: float, phase: Phase = no_phase) -> float:
        """Forward and backward of each micro-batch in `chunks`; each loss is a numerator over the global
        batch's `denominator`, so the accumulated gradients are the global batch's."""
        total = 0.0
        for k, chunk in enumerate(chunks):
            if self.fsdp:  # when FSDP gathers, frees and reduce-scatters (ZeRO's stage)
                before_micro_batch(self.fsdp, self.zero_stage, last=k == len(chunks) - 1)
            with phase("forward"):
                loss = self.loss_of(self.stage(*chunk))
            if loss.numel() != 1:
                raise InputError(
                    f"expected a scalar loss, found shape {tuple(loss.shape)}; "
                    "pass loss_fn=... to autoshard.compile, or return the loss from the model"
                )
            loss = loss / denominator if denominator != 1 else loss
            if self.sync is not None and k == len(chunks) - 1:
                self.sync.arm()
            with phase("backward"):
                loss.backward()
            value = loss.full_tensor() if isinstance(loss, DTensor) else loss
            total += as_float(value.detach())
        return total

    def forward(self, inputs: Sequence[Any]) -> list[Any]:
        """Every output of the program (DTensors made whole)."""
        return [o.full_tensor() if isinstance(o, DTensor) else o for o in self.stage(*inputs)]


class Pipeline:
    """This rank's stages under torch's pipelining schedule, over the pp process group."""

    def __init__(
        self,
        stages: Sequence[Stage],
        stage_ids: Sequence[int],
        split: StageSplit,
        loss: LossTail,
        *,
        schedule: str,
        num_micro_batches: int,
        pp_group: dist.ProcessGroup,
        device: torch.device,
    ) -> None:
        self.stages, self.stage_ids, self.split, self.loss = list(stages), tuple(stage_ids), split, loss
        self.pp_group = pp_group
        self.pp = dist.get_world_size(pp_group)
        self.num_stages = len(split.stages)
        self.pipeline_stages = [
            PipelineStage(m, sid, self.num_stages, device, group=pp_group)
            for m, sid in zip(self.stages, self.stage_ids, strict=True)
        ]
        first = self.pipeline_stages if schedule == "interleaved-1f1b" else self.pipeline_stages[0]
        self.schedule = SCHEDULES[schedule](first, num_micro_batches, loss_fn=loss, scale_grads=False)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def step(self, args: Sequence[Any], target: torch.Tensor, denominator: float) -> float:
        """The schedule's forward and backward over the global batch (`args`: stage 0's inputs); returns
        the global loss, broadcast from the last stage."""
        self.loss.denominator = denominator
        losses: list[torch.Tensor] = []
        self.schedule.step(
            *(args if self.has_first else ()),
            target=target if self.has_last else None,
            losses=losses if self.has_last else None,
            return_outputs=False,
        )
        loss = torch.stack([x.detach() for x in losses]).sum() if self.has_last else torch.zeros(())
        return self._from_last(loss.reshape(()).to(torch.float32).clone())

    def forward(self, args: Sequence[Any], target: torch.Tensor) -> list[Any]:
        """One micro-batch through every stage in order, no gradients: each stage's local outputs are sent
        to the rank of the next, the last stage's go through the outputs tail with the target, and the
        model's outputs, made whole, are broadcast from the last stage's ranks to every pp rank."""
        if self.split.unreachable:
            raise InputError(
                f"expected the model's outputs to be made on the last pipeline stage or from the loss, found "
                f"{list(self.split.unreachable)} made earlier; a pipelined forward cannot return them. "
                "Return only the loss and what the last stage computes, or evaluate a plan with pp=1"
            )
        me = dist.get_group_rank(self.pp_group, dist.get_rank())
        values: Any = tuple(args)
        for sid in range(self.num_stages):
            if sid % self.pp != me:
                continue
            if sid > 0:  # the previous stage ran on another pp rank
                box: list[Any] = [None]
                dist.recv_object_list(box, src=self._global((sid - 1) % self.pp), group=self.pp_group)
                values = box[0]
            out = self.stages[self.stage_ids.index(sid)](*values)
            values = out if isinstance(out, tuple) else (out,)
            if sid + 1 < self.num_stages:
                dist.send_object_list([values], dst=self._global((sid + 1) % self.pp), group=self.pp_group)
        outputs: list[Any] = [None]
        if self.has_last:
            made = self.loss.run(self.split.outputs, values, target)
            outputs = [[o.full_tensor() if isinstance(o, DTensor) else o for o in made]]
        dist.broadcast_object_list(outputs, src=self._global(self.pp - 1), group=self.pp_group)
        return outputs[0]

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.pp_group, pp_rank)

    def _from_last(self, value: torch.Tensor) -> float:
        dist.broadcast(value, src=self._global(self.pp - 1), group=self.pp_group)
        return float(value)

    # ---- parameters several stages read ------------------------------------------------------------

    def sum_shared_gradients(
        self,
        shared: Sequence[str],
        params: Mapping[str, nn.Parameter],
        shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    ) -> None:
        """Sum the gradients of each shared parameter's copies over the pp axis. `params` holds this rank's
        copy (its stages share one); `shapes` the local gradient shape and dtype, for ranks holding none."""
        for c in shared:
            mine = params.get(c)
            if mine is not None and not mine.requires_grad:
                continue
            if mine is not None:
                total = torch.zeros_like(mine.detach().to_local())
                if mine.grad is not None:
                    total += mine.grad.to_local()
            else:  # this pp rank holds no copy; it still takes part in the reduction, with zeros
                shape, dtype = shapes[c]
                total = torch.zeros(shape, dtype=dtype)
            dist.all_reduce(total, group=self.pp_group)
            if mine is not None:
                mine.grad = DTensor.from_local(
                    total, mine.device_mesh, mine.placements, run_check=False, shape=mine.shape, stride=mine.stride()
                )

    def combine_norms(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The norm over every pp rank's counted parameters (each rank's operator mesh already agrees)."""
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.pp_group)
            return local
        power = local.pow(norm_type)
        dist.all_reduce(power, group=self.pp_group)
        return power.pow(1.0 / norm_type)

    def gather(self, mine: Any) -> list[Any]:
        """`mine` from every pp rank, in pp order (collective over the pp group)."""
        every: list[Any] = [None] * self.pp
        dist.all_gather_object(every, mine, group=self.pp_group)
        return every
