"""Stage: one piece of the generated program, run on the operator mesh, as an `nn.Module`.

Every plan runs as stages. A plan without pipelining has one stage holding the whole program
(passes/stages.py `whole_program`): it takes the user's inputs, distributes them per the plan and
returns the program's outputs as DTensors. A pipelined plan has `len(training.stages)` of them, cut by
passes/stages.py: between stages torch's `PipelineStage` sends plain local tensors, so a stage turns
what it receives into DTensors with the planned placements (`Boundary.enter`, `DTensor.from_local`) and
its outputs back into local tensors (`Boundary.leave`); both carry autograd, so the gradients that travel
back are the local shards of the true gradients. A boundary value the plan leaves Partial is reduced
(to Replicate) before it is sent: a partial sum has no meaning on another rank.

Under ZeRO a stage's program is a `ProgramScope` (runtime/fsdp.py) that owns its parameters, and the
stage is the root FSDP2 group; otherwise the stage holds the parameters it reads itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from autoshard.errors import InputError
from autoshard.passes.codegen import contiguous_strides, use_mesh
from autoshard.passes.stages import StageGraph
from autoshard.runtime.fsdp import ProgramScope
from autoshard.runtime.layout import Placements
from autoshard.runtime.precision import autocast

__all__ = ["Boundary", "LossTail", "Stage", "enter"]


@dataclasses.dataclass(frozen=True, slots=True)
class Boundary:
    """How a value crosses a stage boundary: its placement (no Partial) and global shape."""

    spec: Placements
    shape: torch.Size

    def enter(self, local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
        stride = contiguous_strides(self.shape)
        return DTensor.from_local(local, mesh, self.spec, run_check=False, shape=self.shape, stride=stride)

    def leave(self, value: Any, mesh: DeviceMesh) -> torch.Tensor:
        if not isinstance(value, DTensor):
            raise InputError(f"expected a DTensor at a stage boundary, found {type(value).__name__}")
        if tuple(value.placements) != self.spec:
            value = value.redistribute(mesh, self.spec)
        return value.to_local().contiguous()


def enter(how: Boundary | Placements, value: Any, mesh: DeviceMesh) -> Any:
    """A value arriving at a stage as a DTensor: a local piece from the previous stage (`Boundary`), or a
    whole user input distributed per its placement. Non-tensors (flags, ints) and DTensors pass as they are."""
    if isinstance(how, Boundary):
        return how.enter(value, mesh)
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
        return value
    # every rank holds the same global batch (check_same_batch): each takes its own piece, no scatter
    return distribute_tensor(value, mesh, how, src_data_rank=None)


def check_same_batch(inputs: Sequence[Any]) -> None:
    """Refuse a batch that differs between ranks (collective over the default group; run once).

    The runtime's contract is that every rank passes the same global batch: each rank cuts its own rows
    from its copy, and the loss's denominator (the count of real labels) is computed from it without a
    collective. Per-rank batches (a DistributedSampler's) would train on a batch no rank holds."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    sums = [_checksum(x) for x in inputs if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)]
    if not sums:
        return
    mine = torch.stack(sums)
    high, low = mine.clone(), -mine
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    if not torch.equal(high, -low):
        raise InputError(
            "expected the same global batch on every rank, found ranks passing different inputs; autoshard "
            "splits the global batch itself (over dp, micro-batches and stages): give every rank the whole "
            "batch (no DistributedSampler), e.g. the same seed for the data order on every rank"
        )


def _checksum(x: torch.Tensor) -> torch.Tensor:
    """An order-sensitive sum of `x`'s values and its shape, in float64 (equal tensors: equal sums)."""
    flat = torch.nan_to_num(x.detach().reshape(-1).to(torch.float64).cpu(), nan=0.5, posinf=1e300, neginf=-1e300)
    weights = torch.arange(flat.numel(), dtype=torch.float64) % 1009 + 1
    shape = sum((i + 1) * 7919.0 * n for i, n in enumerate(x.shape))
    return (flat * weights).sum() + shape


class Stage(nn.Module):
    """One stage: `forward(*inputs)` runs its piece of the program on `mesh` under the plan's precision.

    `inputs` says how each input arrives (a Boundary for a value from the previous stage, a placement
    for a user input); `outputs` how each output leaves (Boundaries: local tensors for the next stage),
    or None: the DTensors themselves (the one stage of a plan without pipelining)."""

    def __init__(
        self,
        piece: StageGraph,
        mesh: DeviceMesh,
        params: Mapping[str, nn.Parameter],
        tensors: Mapping[str, torch.Tensor],
        inputs: Sequence[Boundary | Placements],
        outputs: Sequence[Boundary] | None,
        precision: str,
        scope: ProgramScope | None = None,
        held: Mapping[str, nn.Parameter] | None = None,
        *,
        torch_compile: bool = False,
    ) -> None:
        super().__init__()
        self.piece = piece
        self.graph_module = piece.graph_module
        self.mesh = mesh
        self.precision = precision
        self.scope = scope  # under ZeRO: the program as FSDP2 modules, owning its parameters
        if scope is None:
            for name in piece.state:
                if name in params:
                    self.register_parameter(name, params[name])
            for c, p in (held or {}).items():  # read by no node: held here so the state has them
                self.register_parameter(c.replace(".", "__"), p)
        self._params = {n: params[n] for n in piece.state if n in params}
        self._tensors = {n: tensors[n] for n in piece.state if n not in params}
        self._inputs = list(inputs)
        self._outputs = None if outputs is None else list(outputs)
        if len(self._inputs) != len(piece.inputs):
            raise InputError(f"stage built with {len(self._inputs)} input layouts for inputs {piece.inputs}")
        self._order = [n.name for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        # the program as it runs: under torch_compile, AOTAutograd's trace of it (local ops and the
        # collectives DTensor issued, forward and backward), made on the first call. A function, not a
        # module attribute, so the stage's modules and state are the same either way
        self._run = torch.compile(self.graph_module.forward, backend="aot_eager", dynamic=False) \
            if torch_compile else self.graph_module

    def forward(self, *values: Any) -> Any:
        args = [enter(how, v, self.mesh) for how, v in zip(self._inputs, values, strict=True)]
        by_name = {**self._tensors, **dict(zip(self.piece.inputs, args, strict=True))}
        with use_mesh(self.mesh), autocast(self.precision, self.mesh.device_type):
            if self.scope is not None:  # FSDP2 modules: they read their own parameters
                out = self.scope(by_name)
            else:
                by_name.update(self._params)
                out = self._run(*(by_name[n] for n in self._order))
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if self._outputs is None:
            return out
        locals_ = tuple(b.leave(v, self.mesh) for b, v in zip(self._outputs, out, strict=True))
        return locals_[0] if len(locals_) == 1 else locals_

    def code(self) -> str:
        return self.scope.code() if self.scope is not None else self.graph_module.code


class LossTail:
    """The loss tail of a pipelined plan as the schedule's `loss_fn(output, target)`: the micro-batch's
    loss numerator (capture/loss_reduction.py) divided by the global batch's denominator, a plain tensor.

    `denominator` is set by each step from the global batch (every rank holds it)."""

    def __init__(
        self, piece: StageGraph, mesh: DeviceMesh, inputs: Sequence[Boundary], target: Placements, precision: str
    ) -> None:
        self.piece, self.mesh, self.inputs, self.target, self.precision = piece, mesh, list(inputs), target, precision
        self.denominator = 1.0

    def run(self, piece: StageGraph, output: Any, target: torch.Tensor) -> tuple[Any, ...]:
        """`piece` (the loss, or the model's outputs) on the last stage's local outputs and the target."""
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        args = [b.enter(v, self.mesh) for b, v in zip(self.inputs, outputs, strict=True)]
        args.append(enter(self.target, target, self.mesh))
        with use_mesh(self.mesh), autocast(self.precision, self.mesh.device_type):
            out = piece.graph_module(*args)
        return tuple(out)

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        (loss,) = self.run(self.piece, output, target)
        if loss.numel() != 1:
            raise InputError(f"expected a scalar loss, found shape {tuple(loss.shape)}; the model must return the loss")
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        return loss / self.denominator
