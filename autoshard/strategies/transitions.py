"""The collectives that move a tensor from one placement to another, forward and for its gradient.

`transition` asks DTensor's own redistribution planner (`_gen_transform_infos`, via `_dtensor`) which
steps it would run, so the planner prices exactly what the runtime will do; the planner then prices the
steps with its own hardware model (DTensor's `redistribute_cost` is not used).

Impossible transitions return None (not an exception): a Shard cannot become a Partial, and one
Partial reduction cannot become another (P(sum) -> P(avg)). A solver can treat None as "no edge".
Replicate -> Partial is possible and free (DTensor keeps the value on one rank and zeros elsewhere,
or keeps it everywhere for avg).

Byte convention (`CommStep.full_bytes`): the size of the buffer that is whole on the step's mesh axis,
i.e. the tensor with the shardings of the OTHER axes at that step applied: the all-gather output, the
reduce-scatter input, the all-reduce buffer, the all-to-all buffer (all ranks' pieces together).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.strategies import _dtensor
from autoshard.strategies.fused_split import as_plain, has_strided, is_sharded
from autoshard.strategies.mesh import MeshSpec, Partial, Placement, Replicate, Shard, Spec, normalize_spec

__all__ = ["COLLECTIVES", "CommStep", "backward_transition", "gradient_is_partial", "gradient_spec", "transition"]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "local")


@dataclass(frozen=True, kw_only=True, slots=True)
class CommStep:
    """One step of a redistribution: a collective over one mesh axis (or a free local op)."""

    axis: str
    collective: str  # one of COLLECTIVES; "local" is a free chunk, zeroing or no-op
    full_bytes: int  # bytes of the buffer whole on `axis` at this step (see the module docstring)


def _kind(src: Placement, dst: Placement) -> str:
    if type(src) is Partial and type(dst) is Replicate:
        return "all_reduce"
    if type(src) is Partial and type(dst) is Shard:
        return "reduce_scatter"
    if type(src) is Shard and type(dst) is Replicate:
        return "all_gather"
    if type(src) is Shard and type(dst) is Shard:
        return "all_to_all"
    return "local"


def _possible(src: Spec, dst: Spec) -> bool:
    for s, d in zip(src, dst, strict=True):
        if type(d) is Partial and s != d and not type(s) is Replicate:
            return False  # S -> P, or P(sum) -> P(avg): no collective produces it
    return True


def transition(
    src: Sequence[Placement], dst: Sequence[Placement], shape: tuple[int, ...], itemsize: int, mesh: MeshSpec
) -> tuple[CommStep, ...] | None:
    """DTensor's collectives to turn a tensor of logical `shape` from `src` into `dst`; () if equal.

    Returns None when no redistribution exists (S -> P, P(a) -> P(b)). Cached.
    """
    if len(src) != mesh.ndim or len(dst) != mesh.ndim:
        raise ValueError(f"specs {src} -> {dst} do not have one placement per axis of {mesh}")
    if has_strided(src) or has_strided(dst):
        return _strided_transition(tuple(src), tuple(dst), shape, itemsize, mesh)
    return _transition(normalize_spec(tuple(src), len(shape)), normalize_spec(tuple(dst), len(shape)),
                       tuple(int(s) for s in shape), int(itemsize), mesh)


@functools.lru_cache(maxsize=65536)
def _transition(src: Spec, dst: Spec, shape: tuple[int, ...], itemsize: int, mesh: MeshSpec) -> tuple[CommStep, ...] | None:
    if src == dst:
        return ()
    if not _possible(src, dst):
        return None
    # Bytes: the buffer whole on the step's axis is the tensor with every OTHER axis's current sharding
    # applied. DTensor's own `logical_shape` applies only the axes before the step's, so a dp collective
    # of a tensor sharded on a later tp axis would be priced tp times too big (measured against the
    # collectives DTensor issues: tests/test_runtime_comm.py).
    current = list(src)
    out = []
    if _dtensor.greedy_redistribution():
        plan = _greedy_plan(src, dst, len(shape), mesh)
    else:  # DTensor's min-cost planner reads the shape
        plan = tuple((d, a, b) for d, a, b, _ in _dtensor.transform_steps(src, dst, shape, torch.float32,
                                                                            mesh.sizes, mesh.names))
    for dim, a, b in plan:
        whole = list(shape)
        for other, p in enumerate(current):
            if other != dim and isinstance(p, Shard):
                whole[p.dim] = -(-whole[p.dim] // mesh.sizes[other])
        out.append(CommStep(axis=mesh.names[dim], collective=_kind(a, b), full_bytes=math.prod(whole) * itemsize))
        current[dim] = b
    return tuple(out)


@functools.lru_cache(maxsize=16384)
def _greedy_plan(src: Spec, dst: Spec, ndim: int, mesh: MeshSpec) -> tuple[tuple[int, Placement, Placement], ...]:
    """DTensor's steps (mesh dim, from, to) for plain placements, which do not depend on the shape.

    For Shard/Replicate/Partial placements DTensor runs its greedy planner
    (`generate_greedy_transform_infos`), whose choices read only the placements and the mesh; the shape
    enters just the logical shapes it records, which are not used here (bytes are computed above). So
    one plan serves every shape of a rank, and is asked for on a shape every axis divides evenly.
    tests/test_strategies.py checks it against DTensor's plan at the true shape."""
    even = (math.prod(mesh.sizes),) * ndim
    steps = _dtensor.transform_steps(src, dst, even, torch.float32, mesh.sizes, mesh.names)
    return tuple((dim, a, b) for dim, a, b, _logical in steps)


def _strided_transition(
    src: Spec, dst: Spec, shape: tuple[int, ...], itemsize: int, mesh: MeshSpec
) -> tuple[CommStep, ...] | None:
    """Price a move involving _StridedShard as the same move of Shard (same bytes per rank), except that
    a strided and a plain layout of one dim are different orders of the data: go through Replicate."""
    if src == dst:
        return ()
    mixed = any(
        s != d and is_sharded(s) and is_sharded(d) and (type(s) is _StridedShard or type(d) is _StridedShard)
        for s, d in zip(src, dst)
    )
    if not mixed:
        return transition(as_plain(src), as_plain(dst), shape, itemsize, mesh)
    replicated = tuple(Replicate() for _ in src)
    up = transition(as_plain(src), replicated, shape, itemsize, mesh)
    down = transition(replicated, as_plain(dst), shape, itemsize, mesh)
    return None if up is None or down is None else (*up, *down)


def gradient_is_partial(input_placement: Placement, output_placements: Sequence[Placement | None]) -> bool:
    """Whether, on one mesh axis, the gradient w.r.t. an input consumed as `input_placement` is a
    partial sum, given the consuming op's output placements on that axis.

    A replicated input feeding a sharded or partial output (the input of a column-parallel linear,
    Megatron's f operator; a replicated weight used on batch-sharded activations) gets a different
    contribution to its gradient on every rank: the gradient is P(sum) there.
    """
    return type(input_placement) is Replicate and any(
        p is not None and not type(p) is Replicate for p in output_placements
    )


def gradient_spec(
    dst: Sequence[Placement], consumer_outputs: Sequence[Sequence[Placement] | None] | Sequence[Placement]
) -> Spec:
    """Placement the gradient of an input arrives in, per axis: that of the input as consumed (`dst`),
    P(sum) where `gradient_is_partial`, and Replicate where the input was consumed as a Partial (the
    gradient of every summand of a sum is the gradient of the sum).

    `consumer_outputs` is the consumer's `ShardingOption.output`; a single Spec is accepted too.
    """
    if any(o is not None and not isinstance(o, tuple) for o in consumer_outputs):
        consumer_outputs = (tuple(consumer_outputs),)  # one Spec given instead of ShardingOption.output
    out: list[Placement] = []
    for axis, p in enumerate(dst):
        outs = [o[axis] for o in consumer_outputs if o is not None]
        if gradient_is_partial(p, outs):
            out.append(Partial("sum"))
        elif type(p) is Partial:
            out.append(Replicate())
        else:
            out.append(p)
    return tuple(out)


def backward_transition(
    src: Sequence[Placement],
    dst: Sequence[Placement],
    consumer_outputs: Sequence[Sequence[Placement] | None] | Sequence[Placement],
    shape: tuple[int, ...],
    itemsize: int,
    mesh: MeshSpec,
) -> tuple[CommStep, ...] | None:
    """Collectives for the gradient of an edge whose forward is `src` -> `dst` (`dst` being what the
    consumer, whose outputs are `consumer_outputs` = its chosen `ShardingOption.output`, reads).

    The gradient arrives in `gradient_spec(dst, consumer_outputs)` and must be brought to `src`, except
    that axes where `src` is Partial take a Replicate gradient. None only if impossible (it never is:
    the target holds no Partial).
    """
    grad = gradient_spec(dst, consumer_outputs)
    target = tuple(Replicate() if type(p) is Partial else p for p in src)
    return transition(grad, target, shape, itemsize, mesh)
