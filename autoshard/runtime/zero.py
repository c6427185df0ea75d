"""ZeRO over the `dp` mesh axis, written as DTensor redistributions (the collectives FSDP2 issues).

The runtime's parameters are DTensors on the plan's whole mesh, normally Replicate on dp. ZeRO shards,
per stage, what each dp rank keeps (Rajbhandari et al. 2020):

- stage 1, optimizer state: the optimizer runs over an fp32 master copy of each parameter sharded over
  dp (`Shard(d)`, d a dim dp divides that no other axis shards). After backward the gradients are
  all-reduced as without ZeRO; each rank takes its slice (local, no collective), steps its shard and
  all-gathers the updated shard into the replicated parameter.
- stage 2, + gradients: a parameter's gradient leaves backward Partial over dp (DTensor defers the
  reduction; see passes/codegen.py) and is reduce-scattered straight to the shard the moment autograd
  has accumulated it (a post-accumulate-grad hook), the full gradient is dropped. Then as stage 1.
- stage 3, + parameters: the parameters themselves are stored `Shard(d)` on dp (`zero3_plan` rewrites
  the plan's parameter placements). Codegen then inserts `redistribute(p, <planned input>)` before each
  use: an all-gather in forward whose backward is the reduce-scatter of the gradient, exactly FSDP's
  pair. The optimizer needs no master copy: parameters, gradients and state are all shards.

A parameter with no dim dp divides (and not already sharded otherwise) stays whole; `unsharded` lists
those, so the memory saved is never overstated. Under ZeRO-3 so does a parameter split `_StridedShard`
on another axis (a fused qkv under tp): DTensor cannot gather a dp shard beside it where it is used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan
from autoshard.strategies.mesh import spec_from_str, spec_str

__all__ = ["DP_AXIS", "ZeroOptimizer", "check_zero_mesh", "master_spec", "on_dp", "zero3_plan", "zero_dim", "zero_spec"]

log = logging.getLogger(__name__)

DP_AXIS = "dp"


def check_zero_mesh(mesh: Mapping[str, int], stage: int) -> int:
    """The index of the dp axis in `mesh`; an error where ZeRO has no dp axis to shard over."""
    if DP_AXIS not in mesh or int(mesh[DP_AXIS]) < 2:
        raise InputError(
            f"zero_stage={stage} shards over the {DP_AXIS!r} mesh axis; the plan's mesh {dict(mesh)} has "
            f"{'no such axis' if DP_AXIS not in mesh else 'it of size 1'}. Plan on a mesh with dp >= 2 "
            "or set zero_stage=0"
        )
    return list(mesh).index(DP_AXIS)


def zero_dim(shape: Sequence[int], placements: Sequence[Placement], dp_index: int, dp: int) -> int | None:
    """The tensor dim ZeRO shards over dp: the first dim no other mesh axis shards that dp divides.

    None if there is none, or if the tensor is already sharded over dp (nothing left to do)."""
    if not isinstance(placements[dp_index], Replicate):
        return None
    # _StridedShard is not a Shard subclass in torch 2.13: a dim another axis splits strided (a fused qkv
    # under tp) counts as free here. That is still exact: ZeRO's collectives run on the local tensor over
    # the 1-D dp sub-mesh (`on_dp`), and the 4-rank dp2 x tp2 tests cover it.
    taken = {p.dim for p in placements if isinstance(p, Shard)}
    for d, size in enumerate(shape):
        if d not in taken and size % dp == 0 and size >= dp:
            return d
    return None


def zero_spec(placements: Sequence[Placement], dp_index: int, dim: int) -> tuple[Placement, ...]:
    """`placements` with the dp entry replaced by `Shard(dim)`."""
    return tuple(Shard(dim) if i == dp_index else p for i, p in enumerate(placements))


def master_spec(shape: Sequence[int], placements: Sequence[Placement], mesh: DeviceMesh) -> tuple[Placement, ...] | None:
    """The placements of a parameter's ZeRO-1/2 master shard on `mesh` (which has a dp axis); None for a
    parameter ZeRO-1/2 keeps as it is (no dim dp divides, or the plan already shards it over dp)."""
    dp_index = list(mesh.mesh_dim_names or ()).index(DP_AXIS)
    dim = zero_dim(shape, placements, dp_index, mesh.shape[dp_index])
    return None if dim is None else zero_spec(placements, dp_index, dim)


def on_dp(t: DTensor, dp_index: int, placement: Placement) -> DTensor:
    """`t` with its dp entry moved to `placement`, every other axis left as it is.

    Run as a redistribution on the 1-D dp sub-mesh of the local tensor: ZeRO's dim is one no other axis
    shards, so over dp the local tensor is the whole of that dim and the dp collective (all-gather,
    reduce-scatter) or slice is the same as on the full mesh. DTensor's N-D redistribution cannot take
    every combination here (a dp shard beside a tp `_StridedShard` of the fused qkv, for one).
    """
    mesh = t.device_mesh
    if t.placements[dp_index] == placement:
        return t
    sub = mesh[mesh.mesh_dim_names[dp_index]]
    local = DTensor.from_local(t.to_local(), sub, (t.placements[dp_index],), run_check=False)
    moved = local.redistribute(sub, (placement,)).to_local()
    placements = tuple(placement if i == dp_index else p for i, p in enumerate(t.placements))
    return DTensor.from_local(moved, mesh, placements, run_check=False, shape=t.shape, stride=t.stride())


def zero3_plan(plan: Plan, ir: GraphIR) -> tuple[Plan, tuple[str, ...]]:
    """`plan` with every parameter that is Replicate on dp stored `Shard(d)` on dp instead, and the
    parameters no dim of which dp divides (they stay as planned).

    Only storage changes: the nodes keep their planned inputs, so codegen all-gathers each parameter
    where it is used (forward) and reduce-scatters its gradient there (backward). Those collectives are
    not in `plan.collectives` unless the planner itself placed the parameters so (pass
    `param_placements` to `plan_graph`); the plan's prediction is the planner's, not this rewrite's.
    """
    dp_index = check_zero_mesh(plan.mesh, 3)
    dp = int(plan.mesh[DP_AXIS])
    params = dict(plan.params)
    unsharded = []
    for info in ir.params:
        placement = params.get(info.name)
        if placement is None:
            continue
        spec = spec_from_str(placement)
        # DTensor cannot redistribute a dp shard beside a `_StridedShard` (the tp split of a fused qkv)
        # when codegen gathers it at use; such a parameter stays whole
        strided = any(isinstance(p, _StridedShard) for p in spec)
        dim = None if strided else zero_dim(info.meta.shape, spec, dp_index, dp)
        if dim is None:
            if isinstance(spec[dp_index], Replicate):
                unsharded.append(info.name)
            continue
        params[info.name] = spec_str(zero_spec(spec, dp_index, dim))
    if len(unsharded) == len(params):
        raise InputError(
            f"zero_stage=3 found no parameter with a dim that dp={dp} divides; ZeRO-3 would shard nothing. "
            "Use a dp size that divides the parameters' dims or set zero_stage=0"
        )
    if unsharded:
        log.info("ZeRO-3: %d parameters have no dim dp=%d divides and stay whole: %s", len(unsharded), dp, unsharded)
    return dataclasses.replace(plan, params=params), tuple(unsharded)


@dataclasses.dataclass(slots=True)
class _Shard:
    """One parameter under ZeRO-1/2: its replicated tensor and this rank's fp32 master shard."""

    param: nn.Parameter  # Replicate on dp
    master: nn.Parameter  # Shard(dim) on dp, what the optimizer updates
    spec: tuple[Placement, ...]  # the master's placements
    dp_index: int

    def shard_of(self, grad: DTensor) -> DTensor:
        """The master's gradient from the parameter's: other axes brought to the parameter's placements
        (the reductions the runtime does anyway), then dp to the shard: a reduce-scatter from Partial,
        a local slice from Replicate."""
        p = self.param
        if not isinstance(grad, DTensor):
            raise InputError(f"expected a DTensor gradient for a ZeRO parameter, found {type(grad).__name__}")
        others = tuple(grad.placements[i] if i == self.dp_index else q for i, q in enumerate(p.placements))
        if tuple(grad.placements) != others:
            grad = grad.redistribute(p.device_mesh, others)
        return on_dp(grad, self.dp_index, self.spec[self.dp_index]).to(torch.float32)


class ZeroOptimizer:
    """An optimizer (built by `make_optimizer` over a list of parameters) run ZeRO-1 or ZeRO-2 style.

    `step()` after backward (and after the runtime brought the remaining gradients to their parameters'
    placements): each master shard takes its gradient shard, the optimizer steps the shards, and every
    parameter is all-gathered from its updated shard. Parameters without a dp-divisible dim, or already
    sharded over dp by the plan, are stepped as they are.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        mesh: DeviceMesh,
        *,
        stage: int,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        if stage not in (1, 2):
            raise InputError(f"ZeroOptimizer runs zero_stage 1 or 2, found {stage}; stage 3 is a plan rewrite (zero3_plan)")
        names = tuple(mesh.mesh_dim_names or ())
        dp_index = check_zero_mesh(dict(zip(names, mesh.shape, strict=True)), stage)
        dp = mesh.shape[dp_index]
        self.stage = stage
        self.shards: dict[str, _Shard] = {}
        unsharded: list[str] = []
        planned: list[str] = []  # sharded over dp by the plan itself: state and gradient are shards already
        stepped: list[nn.Parameter] = []
        for name, p in params.items():
            if not p.requires_grad:
                continue
            spec = master_spec(p.shape, p.placements, mesh)
            if spec is None:
                if isinstance(p.placements[dp_index], Replicate):
                    unsharded.append(name)
                else:
                    planned.append(name)
                stepped.append(p)
                continue
            with torch.no_grad():  # a slice of the replicated value (local), copied so it owns its storage
                master = nn.Parameter(on_dp(p.detach(), dp_index, spec[dp_index]).to(torch.float32).clone())
            self.shards[name] = _Shard(param=p, master=master, spec=spec, dp_index=dp_index)
            stepped.append(master)
            if stage == 2:
                p.register_post_accumulate_grad_hook(self._scatter_hook(self.shards[name]))
        if not self.shards:
            raise InputError(
                f"zero_stage={stage} found no parameter with a dim that dp={dp} divides; ZeRO would shard "
                "nothing. Use a dp size that divides the parameters' dims or set zero_stage=0"
            )
        self.unsharded = tuple(unsharded)
        self.planned_shards = tuple(planned)
        if unsharded:
            log.info("ZeRO-%d: %d parameters have no dim dp=%d divides and stay whole: %s", stage, len(unsharded), dp, unsharded)
        self.optimizer = make_optimizer(stepped)

    @staticmethod
    def _scatter_hook(shard: _Shard) -> Callable[[nn.Parameter], None]:
        def hook(p: nn.Parameter) -> None:
            # Partial over dp -> Shard(d): a reduce-scatter; the full gradient is dropped right away
            grad = shard.shard_of(p.grad)
            shard.master.grad = grad if shard.master.grad is None else shard.master.grad + grad
            p.grad = None

        return hook

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for s in self.shards.values():
            s.param.grad = None

    def step(self) -> None:
        if self.stage == 1:
            for s in self.shards.values():
                if s.param.grad is not None:  # already reduced over dp: taking the shard is local
                    s.master.grad = s.shard_of(s.param.grad)
        self.optimizer.step()
        with torch.no_grad():
            for s in self.shards.values():  # all-gather the updated shard into the replicated parameter
                full = on_dp(s.master.detach(), s.dp_index, Replicate())
                s.param.to_local().copy_(full.to_local())

    def gradients(self) -> dict[str, DTensor]:
        """The gradient each ZeRO'd parameter's update used (stage 2: the only one kept, a shard)."""
        return {name: s.master.grad for name, s in self.shards.items() if s.master.grad is not None}

    def state_tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor the optimizer keeps: master shards and their state (for memory accounting)."""
        for s in self.shards.values():
            yield s.master
        for state in self.optimizer.state.values():
            yield from (t for t in state.values() if isinstance(t, torch.Tensor))
