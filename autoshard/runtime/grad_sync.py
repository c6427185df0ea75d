"""Gradients settled to their parameters' placements in few collectives: DDP's buckets.

After backward a parameter replicated over an axis on which its gradient came out Partial(sum) (every
parameter under data parallelism; a replicated norm weight beside sequence-sharded activations under
tp) needs an all-reduce over that axis. DTensor's `redistribute` issues one per parameter: 44 on a
4-layer GPT, each paying the collective's latency. Here the gradients that need the same all-reduces
(the same mesh, axes and dtype) are flattened into buckets of up to `BUCKET_BYTES`, each bucket
all-reduced once per axis, and the sums written back as the parameters' gradients. The values are the
same sums DTensor's all-reduces compute. Any other change of placement (a replicated gradient to a
parameter's shard, a Partial(avg)) goes through DTensor's `redistribute` as before.

Buckets follow the reverse of the parameters' order, as DDP's do (backward produces the last layers'
gradients first), so `gradient_buckets` on the plan side (runtime/comm.py) predicts the same count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor, Partial, Replicate

from autoshard.passes.codegen import contiguous_strides

__all__ = ["BUCKET_BYTES", "bucket_sizes", "settle_gradients"]

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def _summed_axes(grad: DTensor, placements: Sequence[object]) -> tuple[int, ...] | None:
    """The axes a plain all-reduce brings `grad` to `placements` over, or None if it takes more."""
    axes = []
    for i, (g, p) in enumerate(zip(grad.placements, placements, strict=True)):
        if g == p:
            continue
        if not (type(g) is Partial and g.reduce_op == "sum" and type(p) is Replicate):
            return None
        axes.append(i)
    return tuple(axes)


def bucket_sizes(nbytes: Sequence[int], cap: int = BUCKET_BYTES) -> list[int]:
    """How many consecutive tensors of these byte sizes each bucket takes (a tensor larger than `cap`
    is a bucket of its own)."""
    counts: list[int] = []
    filled = cap
    for n in nbytes:
        if filled + n > cap or not counts:
            counts.append(0)
            filled = 0
        counts[-1] += 1
        filled += n
    return counts


def settle_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Bring every parameter's gradient to the parameter's placement (collective: every rank calls it)."""
    groups: dict[tuple[object, ...], list[torch.nn.Parameter]] = {}
    for p in reversed(list(params)):
        g = p.grad
        if not isinstance(g, DTensor) or tuple(g.placements) == tuple(p.placements):
            continue
        axes = _summed_axes(g, p.placements)
        if axes is None:
            p.grad = g.redistribute(p.device_mesh, p.placements)
            continue
        groups.setdefault((g.device_mesh, axes, g.dtype), []).append(p)
    for (mesh, axes, _dtype), members in groups.items():
        start = 0
        for count in bucket_sizes([p.grad.to_local().numel() * p.grad.element_size() for p in members]):
            _all_reduce(members[start:start + count], mesh, axes)
            start += count


def _all_reduce(members: Sequence[torch.nn.Parameter], mesh: object, axes: tuple[int, ...]) -> None:
    grads = [p.grad for p in members]
    locals_ = [g.to_local() for g in grads]
    flat = torch.cat([t.reshape(-1) for t in locals_]) if len(locals_) > 1 else locals_[0].reshape(-1).clone()
    for axis in axes:
        flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", (mesh, axis)))
    offset = 0
    for p, g, t in zip(members, grads, locals_, strict=True):
        piece = flat[offset:offset + t.numel()].view(t.shape)
        offset += t.numel()
        p.grad = DTensor.from_local(piece, mesh, p.placements, run_check=False, shape=g.shape,
                                    stride=contiguous_strides(g.shape))
