"""Own rule: a fused projection split into equal chunks (nanoGPT's `c_attn(x).chunk(3, -1)`).

DTensor has no rule for chunking a tensor along a dim it is sharded on: it gathers first. Megatron's
plan for a fused qkv projection needs exactly that chunk to be local: each rank holds its slice of q,
of k and of v. In DTensor's vocabulary that layout is `_StridedShard(dim, split_factor=k)`: the dim is
viewed as k chunks and each chunk is sharded across the axis. So, where a linear's output feeds only a
k-way chunk/split of its last dim:

- the weight (and bias) may be `_StridedShard(0, k)` on an axis where they could be `Shard(0)`;
- the linear then produces `_StridedShard(-1, k)` (a column permutation commutes with the matmul);
- the chunk turns `_StridedShard(d, k)` into `Shard(d)` pieces with no communication.

Redistributions involving `_StridedShard` are priced like those of `Shard` on the same dim (the same
bytes move), except between a strided and a plain layout of the same dim, which goes through Replicate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor.placement_types import _StridedShard
from torch.fx import Node

from autoshard.strategies.mesh import MeshSpec, Placement, Replicate, Shard, Spec

__all__ = ["as_plain", "fused_split_options", "is_sharded", "strided"]

_SPLITS = (torch.ops.aten.chunk.default, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)
_LINEAR = torch.ops.aten.linear.default


def strided(dim: int, k: int) -> _StridedShard:
    return _StridedShard(dim, split_factor=k)


def is_sharded(p: Placement | None) -> bool:
    """Shard or _StridedShard: each rank holds 1/n of the dim."""
    return type(p) in (Shard, _StridedShard)


def as_plain(spec: Sequence[Placement]) -> Spec:
    """`spec` with every _StridedShard(d, k) read as Shard(d): same bytes per rank, for pricing."""
    return tuple(Shard(p.dim) if type(p) is _StridedShard else p for p in spec)


def has_strided(spec: Sequence[Placement] | None) -> bool:
    return spec is not None and any(type(p) is _StridedShard for p in spec)


def split_pieces(node: Node) -> tuple[int, int] | None:
    """(dim, k) when `node` cuts its input into k equal pieces along `dim`, else None."""
    if node.op != "call_function" or node.target not in _SPLITS:
        return None
    val = node.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % val.dim()
    size = val.shape[dim]
    if node.target is torch.ops.aten.chunk.default:
        k = int(node.args[1])
        return (dim, k) if size % k == 0 else None
    if node.target is torch.ops.aten.split.Tensor:
        piece = int(node.args[1])
        return (dim, size // piece) if size % piece == 0 else None
    sizes = list(node.args[1])
    return (dim, len(sizes)) if len(set(sizes)) == 1 else None


def _fused_linear_split(linear: Node) -> int | None:
    """k when `linear` is an aten.linear whose every user splits its last dim into k equal pieces."""
    if linear.op != "call_function" or linear.target is not _LINEAR or not linear.users:
        return None
    val = linear.meta.get("val")
    ks = set()
    for user in linear.users:
        pieces = split_pieces(user)
        if pieces is None or pieces[0] != val.dim() - 1:
            return None
        ks.add(pieces[1])
    return ks.pop() if len(ks) == 1 else None


def fused_split_options(node: Node, mesh: MeshSpec, base: Sequence) -> list:
    """`base` (DTensor's options of `node`) plus the strided variants this rule allows."""
    from autoshard.strategies.options import ShardingOption

    extra: list[ShardingOption] = []
    pieces = split_pieces(node)
    if pieces is not None and _fused_linear_split(node.args[0]) == pieces[1]:
        dim, k = pieces
        size = node.args[0].meta["val"].shape[dim] // k
        for o in base:
            for axis, n in enumerate(mesh.sizes):
                if n == 1 or size % n or not isinstance(o.inputs[0][axis], Replicate):
                    continue
                if not all(out is not None and type(out[axis]) is Replicate for out in o.output):
                    continue
                inputs = (_with(o.inputs[0], axis, strided(dim, k)), *o.inputs[1:])
                output = tuple(_with(out, axis, Shard(dim)) for out in o.output)
                extra.append(ShardingOption(output=output, inputs=inputs))
    k = _fused_linear_split(node)
    if k is not None:
        last = node.meta["val"].dim() - 1
        for o in base:
            out = o.output[0]
            for axis in range(mesh.ndim):
                column = type(out[axis]) is Shard and out[axis].dim % (last + 1) == last
                weight = o.inputs[1]
                if not column or weight is None or weight[axis] != Shard(0):
                    continue
                inputs = list(o.inputs)
                for slot in range(1, len(inputs)):  # weight and bias
                    if inputs[slot] is not None and inputs[slot][axis] == Shard(0):
                        inputs[slot] = _with(inputs[slot], axis, strided(0, k))
                extra.append(ShardingOption(output=(_with(out, axis, strided(last, k)),), inputs=tuple(inputs)))
    if node.op == "placeholder":
        ks = {_fused_linear_split(user) for user in node.users if user.target is _LINEAR}
        ks.discard(None)
        for k in sorted(ks):
            for o in base:
                for axis in range(mesh.ndim):
                    if o.output[0][axis] == Shard(0):
                        extra.append(ShardingOption(output=(_with(o.output[0], axis, strided(0, k)),), inputs=()))
    return [*base, *dict.fromkeys(extra)]


def _with(spec: Spec, axis: int, p: Placement) -> Spec:
    return tuple(p if i == axis else q for i, q in enumerate(spec))

