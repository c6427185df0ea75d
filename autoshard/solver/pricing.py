"""Price sharding options: compute, communication and memory per device, in seconds and bytes.

This is where the graph (GraphIR), the options (strategies/) and the hardware (cost_model/) meet.

- A computation under an option runs on 1/k of the work, k the product of the mesh axes its output
  is sharded or partial over; forward plus backward is priced as the forward roofline time times
  (1 + backward factor).
- It keeps its output for backward (activations) when autograd does: capture runs each op on meta
  tensors and records what its backward saves (its inputs, its output, internal tensors), so an
  output is kept when its own backward or a consumer's keeps it (GraphIR.NodeInfo.output_kept).
- A parameter under a placement holds its local shard of parameter, gradient and optimizer state,
  and pays for an optimizer step over them (memory bound).
- An edge pays the collectives DTensor runs to bring the producer's placement to the consumer's,
  and in backward those that bring the gradient back (see strategies.backward_transition).
- Gradient reductions of parameters are bucketed in practice (DDP and FSDP reduce ~25 MiB buckets, not
  one collective per tensor), so they are priced by bandwidth alone: the per-tensor latency term would
  otherwise make data parallelism look ruinous for models with many small parameters.
- Precision "bf16-mixed" (torch.autocast with fp32 master weights, as Megatron and FSDP2's mixed policy):
  floating activations, their collectives and compute are bf16 (bf16 tensor-core peak); parameters
  stay fp32 with a bf16 working copy (autocast's cast cache, 2 B per element), gradients and their
  reductions are fp32, optimizer state fp32. Graphs are captured in the model's own dtype (fp32), so
  the pricer converts: it never needs a second capture.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard
from torch.fx import Node

from autoshard.cost_model import (
    Cluster,
    Collective,
    Link,
    backward_factor,
    collective_bytes_per_device,
    collective_time,
    compute_time,
    optimizer_state_bytes_per_param,
)
from autoshard.errors import InputError
from autoshard.ir.graph import NodeInfo, NodeKind, TensorMeta
from autoshard.ir.plan import PRECISIONS
from autoshard.strategies.fused_split import is_sharded
from autoshard.strategies import CommStep, MeshSpec, ShardingOption, Spec, backward_transition, transition

__all__ = ["EdgePrice", "OptionPrice", "Pricer"]

# Ops whose backward needs none of their inputs or outputs: they keep nothing alive for backward.
_SAVES_NOTHING = frozenset(
    {
        "aten.add.Tensor",
        "aten.sub.Tensor",
        "aten.neg.default",
        "aten.clone.default",
        "aten._to_copy.default",
        "aten.to.dtype",
        "aten.to.dtype_layout",
        "aten.type_as.default",
        "aten.contiguous.default",
        "aten.arange.default",
        "aten.arange.start",
        "aten.zeros.default",
        "aten.ones.default",
        "aten.full.default",
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class OptionPrice:
    """What one option of one unit costs per device, per copy."""

    compute_s: float
    activation_bytes: float = 0.0
    parameter_bytes: float = 0.0
    gradient_bytes: float = 0.0
    optimizer_bytes: float = 0.0

    @property
    def memory_bytes(self) -> float:
        return self.activation_bytes + self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgePrice:
    """The collectives of one edge under one pair of options, forward and backward."""

    seconds: float
    bytes_per_device: float
    forward: tuple[CommStep, ...]
    backward: tuple[CommStep, ...]


class Pricer:
    """Prices options for one cluster, mesh and optimizer (links per axis computed once)."""

    def __init__(self, *, cluster: Cluster, mesh: MeshSpec, optimizer: str, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise InputError(f"expected precision in {PRECISIONS}, found {precision!r}")
        self.cluster = cluster
        self.mesh = mesh
        self.optimizer = optimizer
        self.precision = precision
        shape = dict(mesh.axes)
        self.links: dict[str, Link] = {axis: cluster.axis_link(shape, axis) for axis in mesh.names}
        self.bucket_links = {axis: dataclasses.replace(link, latency=0.0) for axis, link in self.links.items()}
        self._edge_cache = _edge_cache(cluster, mesh, precision)

    # ---- units ---------------------------------------------------------------------------------

    def parameter(self, meta: TensorMeta, spec: Sequence[Placement], *, trainable: bool) -> OptionPrice:
        local = self.local_bytes(meta, spec)
        numel = local / meta.dtype.itemsize
        grad = local if trainable else 0.0
        opt = numel * optimizer_state_bytes_per_param(self.optimizer, meta.dtype) if trainable else 0.0
        # An optimizer step reads parameter, gradient and state and writes parameter and state back.
        step_bytes = 2 * local + grad + 2 * opt if trainable else 0.0
        step = compute_time(0, step_bytes, meta.dtype, self.cluster.hardware) if trainable else 0.0
        working_copy = numel * (self.compute_dtype(meta.dtype).itemsize if self.mixed(meta.dtype) else 0)
        return OptionPrice(
            compute_s=step, parameter_bytes=local + working_copy, gradient_bytes=grad, optimizer_bytes=opt
        )

    def mixed(self, dtype: torch.dtype) -> bool:
        """Whether autocast runs this dtype's ops in a narrower one."""
        return self.precision == "bf16-mixed" and dtype in (torch.float32, torch.float64)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.mixed(dtype) else dtype

    def activation_scale(self, dtype: torch.dtype) -> float:
        """Bytes of an activation of `dtype` under this precision, per byte as captured."""
        return self.compute_dtype(dtype).itemsize / dtype.itemsize

    def computation(self, node: NodeInfo, option: ShardingOption) -> OptionPrice:
        if node.kind is not NodeKind.CALL or node.is_view:
            return OptionPrice(compute_s=0.0)
        out_spec = option.output[0] if option.output else None
        work_split = self.work_split(out_spec)
        captured = node.outputs[0].dtype if node.outputs else torch.float32
        dtype = self.compute_dtype(captured)
        moved = node.bytes_moved * self.activation_scale(captured)
        forward = compute_time(node.flops / work_split, moved / work_split, dtype, self.cluster.hardware)
        total = forward
        if node.requires_grad:
            factor = backward_factor(node.flops)
            total += compute_time(
                factor.flops * node.flops / work_split,
                factor.bytes_moved * moved / work_split,
                dtype,
                self.cluster.hardware,
            )
        if node.output_kept is None:  # not probed at capture: a rule of thumb
            keeps_output = node.requires_grad and node.op not in _SAVES_NOTHING
        else:
            keeps_output = node.output_kept
        saved = 0.0
        if keeps_output:
            saved = sum(
                self.local_bytes(meta, spec) * self.activation_scale(meta.dtype)
                for meta, spec in zip(node.outputs, option.output)
                if spec is not None
            )
        if node.internal_saved_bytes:  # statistics and the like, split like the op's work
            saved += node.internal_saved_bytes * self.activation_scale(captured) / work_split
        return OptionPrice(compute_s=total, activation_bytes=saved)

    # ---- edges ---------------------------------------------------------------------------------

    def edge(
        self,
        meta: TensorMeta,
        src: Sequence[Placement] | None,
        dst: Sequence[Placement] | None,
        consumer_output: Sequence[Placement] | None,
        *,
        requires_grad: bool,
        bucketed: bool = False,
    ) -> EdgePrice:
        """Collectives to move a tensor from `src` to `dst`, and its gradient back."""
        if src is None or dst is None:
            return EdgePrice(seconds=0.0, bytes_per_device=0.0, forward=(), backward=())
        key = (meta.shape, meta.dtype, tuple(src), tuple(dst), tuple(consumer_output or ()), requires_grad, bucketed)
        if key in self._edge_cache:
            return self._edge_cache[key]
        # forward: the tensor as computed (a parameter's bf16 working copy under mixed precision);
        # backward: activation gradients in the compute dtype, parameter gradients reduced in fp32.
        itemsize = self.compute_dtype(meta.dtype).itemsize
        fwd = self._steps(tuple(src), tuple(dst), meta.shape, itemsize)
        bwd: tuple[CommStep, ...] = ()
        if requires_grad:
            grad_itemsize = meta.dtype.itemsize if bucketed else itemsize
            bwd = backward_transition(
                tuple(src), tuple(dst), tuple(consumer_output or dst), meta.shape, grad_itemsize, self.mesh
            )
        steps = (*fwd, *bwd)
        price = EdgePrice(
            seconds=sum(self.step_seconds(s) for s in fwd)
            + sum(self.step_seconds(s, bucketed=bucketed) for s in bwd),
            bytes_per_device=sum(self.step_bytes(s) for s in steps),
            forward=tuple(fwd),
            backward=tuple(bwd),
        )
        self._edge_cache[key] = price
        return price

    def _steps(self, src: Spec, dst: Spec, shape: tuple[int, ...], itemsize: int) -> tuple[CommStep, ...]:
        """DTensor's path from src to dst; where it has none (Shard -> Partial, one Partial kind to
        another) the tensor goes through Replicate, which always works."""
        direct = transition(src, dst, shape, itemsize, self.mesh)
        if direct is not None:
            return tuple(direct)
        replicated = tuple(Replicate() for _ in src)
        up = transition(src, replicated, shape, itemsize, self.mesh)
        down = transition(replicated, dst, shape, itemsize, self.mesh)
        if up is None or down is None:
            raise AssertionError(f"no redistribution from {src} to {dst} even through Replicate")
        return (*up, *down)

    def step_seconds(self, step: CommStep, *, bucketed: bool = False) -> float:
        kind = _COLLECTIVES.get(step.collective)
        if kind is None:
            return 0.0
        link = self.bucket_links[step.axis] if bucketed else self.links[step.axis]
        nbytes = step.full_bytes // link.group_size if kind is Collective.ALL_TO_ALL else step.full_bytes
        return collective_time(kind, int(nbytes), link)

    def step_bytes(self, step: CommStep) -> float:
        kind = _COLLECTIVES.get(step.collective)
        if kind is None:
            return 0.0
        n = self.links[step.axis].group_size
        nbytes = step.full_bytes // n if kind is Collective.ALL_TO_ALL else step.full_bytes
        return collective_bytes_per_device(kind, int(nbytes), n)

    # ---- helpers -------------------------------------------------------------------------------

    def work_split(self, spec: Sequence[Placement] | None) -> int:
        """How many ways the work of an op with this output placement is divided."""
        if spec is None:
            return 1
        return math.prod(
            size for p, size in zip(spec, self.mesh.sizes) if is_sharded(p) or type(p) is Partial
        )

    def local_bytes(self, meta: TensorMeta, spec: Sequence[Placement] | None) -> float:
        """Bytes one device holds of a tensor under `spec` (a Partial tensor is full size)."""
        if spec is None:
            return float(meta.nbytes)
        shards = math.prod(size for p, size in zip(spec, self.mesh.sizes) if is_sharded(p))
        return meta.nbytes / shards


_EDGE_CACHES: dict[tuple[Cluster, MeshSpec, str], dict[tuple[object, ...], EdgePrice]] = {}
_EDGE_CACHES_KEPT = 8


def _edge_cache(cluster: Cluster, mesh: MeshSpec, precision: str) -> dict[tuple[object, ...], EdgePrice]:
    """The edge prices of one cluster, mesh and precision, shared by every Pricer of them.

    An edge's price depends on nothing else (not the optimizer), and planning the same mesh again (a
    memory sweep, the step search's micro-batch sizes, a test's replans) meets the same tensors moved
    between the same placements: pricing them is half of a small model's planning time. The most
    recently created 8 are kept."""
    key = (cluster, mesh, precision)
    cache = _EDGE_CACHES.pop(key, None)
    if cache is None:
        cache = {}
        while len(_EDGE_CACHES) >= _EDGE_CACHES_KEPT:
            del _EDGE_CACHES[next(iter(_EDGE_CACHES))]
    _EDGE_CACHES[key] = cache  # most recent last
    return cache


_COLLECTIVES = {
    "all_reduce": Collective.ALL_REDUCE,
    "all_gather": Collective.ALL_GATHER,
    "reduce_scatter": Collective.REDUCE_SCATTER,
    "all_to_all": Collective.ALL_TO_ALL,
}


def producer_output_index(consumer: Node, slot: int) -> int:
    """Which output of the producer feeds `consumer`'s input `slot` (getitem picks one of several)."""
    if consumer.target is operator.getitem and slot == 0:
        return int(consumer.args[1])
    return 0
