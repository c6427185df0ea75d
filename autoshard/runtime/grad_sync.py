"""Gradients settled to their parameters' placements in few collectives: DDP's buckets.

After backward a parameter replicated over an axis on which its gradient came out Partial(sum) (every
parameter under data parallelism; a replicated norm weight beside sequence-sharded activations under
tp) needs an all-reduce over that axis. DTensor's `redistribute` issues one per parameter: 44 on a
4-layer GPT, each paying the collective's latency. Here the gradients that need the same all-reduces
(the same mesh, axes and dtype) are flattened into buckets (`bucket_sizes`: DDP's), each bucket
all-reduced once per axis, and the sums written back as the parameters' gradients. The values are the
same sums DTensor's all-reduces compute. Any other change of placement (a replicated gradient to a
parameter's shard, a Partial(avg)) goes through DTensor's `redistribute` as before.

Buckets follow the reverse of the parameters' order, as DDP's do (backward produces the last layers'
gradients first), so `bucketed_gradients` on the plan side (runtime/comm.py) predicts the same count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from autoshard.passes.codegen import contiguous_strides

__all__ = ["BUCKET_BYTES", "FIRST_BUCKET_BYTES", "Bucket", "OverlappedSync", "bucket_sizes", "buckets_of", "settle_gradients"]

BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb
FIRST_BUCKET_BYTES = 2**20  # DDP's first bucket: the last layers' gradients start reducing early

_ALL_REDUCE_ = torch.ops._c10d_functional.all_reduce_.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default


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


def bucket_sizes(nbytes: Sequence[int], cap: int = BUCKET_BYTES, first: int = FIRST_BUCKET_BYTES) -> list[int]:
    """How many consecutive tensors of these byte sizes each bucket takes: up to `first` bytes in the
    first, `cap` in the others (a tensor larger than that is a bucket of its own)."""
    counts: list[int] = []
    filled = 0
    for n in nbytes:
        limit = first if len(counts) == 1 else cap
        if not counts or filled + n > limit:
            counts.append(0)
            filled = 0
        counts[-1] += 1
        filled += n
    return counts


@dataclass(frozen=True, slots=True)
class Bucket:
    """Gradients reduced together: over `axes` of `mesh`, each arriving in `placements`."""

    members: tuple[torch.nn.Parameter, ...]
    placements: tuple[tuple[object, ...], ...]
    mesh: object
    axes: tuple[int, ...]


def buckets_of(params: Iterable[torch.nn.Parameter]) -> tuple[list[Bucket], list[torch.nn.Parameter]]:
    """The buckets the current gradients form (reverse parameter order), and the parameters whose
    gradient needs another change of placement (DTensor's redistribute)."""
    groups: dict[tuple[object, ...], list[torch.nn.Parameter]] = {}
    rest = []
    for p in reversed(list(params)):
        g = p.grad
        if not isinstance(g, DTensor) or tuple(g.placements) == tuple(p.placements):
            continue
        axes = _summed_axes(g, p.placements)
        if axes is None:
            rest.append(p)
            continue
        groups.setdefault((g.device_mesh, axes, g.dtype), []).append(p)
    out = []
    for (mesh, axes, _dtype), members in groups.items():
        start = 0
        for count in bucket_sizes([p.grad.to_local().numel() * p.grad.element_size() for p in members]):
            chosen = tuple(members[start:start + count])
            out.append(Bucket(chosen, tuple(tuple(p.grad.placements) for p in chosen), mesh, axes))
            start += count
    return out, rest


def settle_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Bring every parameter's gradient to the parameter's placement (collective: every rank calls it)."""
    _settle(*buckets_of(params))


def _settle(buckets: Sequence[Bucket], rest: Sequence[torch.nn.Parameter]) -> None:
    for p in rest:
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
    for b in buckets:
        _write_back(b, _reduce(b, _flatten(b)))


class OverlappedSync:
    """Buckets all-reduced during the step's last backward, as soon as their gradients are in (DDP's
    overlap of communication with the rest of backward), then written back by `settle`.

    The buckets are the first step's (`buckets_of`, settled without overlap). In later steps a hook on
    each member launches its bucket's first all-reduce when the last member's gradient has been
    accumulated, in the backward `arm` announced; a bucket whose gradients arrive in other placements
    than the first step's, or whose launch did not happen, is settled as `settle_gradients` does. The
    values are the same sums either way."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.buckets: list[Bucket] | None = None
        self._index: dict[int, int] = {}
        self._missing: list[int] = []
        self._launched: dict[int, torch.Tensor] = {}
        self._armed = False
        for p in self.params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._accumulated)

    def arm(self) -> None:
        """The next backward is the step's last: its gradients are final once accumulated."""
        if self.buckets is not None:
            self._armed = True
            self._missing = [len(b.members) for b in self.buckets]
            self._launched = {}

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        if not self._armed or id(p) not in self._index:
            return
        i = self._index[id(p)]
        self._missing[i] -= 1
        if self._missing[i] == 0:
            b = self.buckets[i]
            if all(isinstance(m.grad, DTensor) and tuple(m.grad.placements) == pl
                   for m, pl in zip(b.members, b.placements)):
                self._launched[i] = _all_reduce(b, b.axes[0], _flatten(b))

    def settle(self) -> None:
        armed, self._armed = self._armed, False
        if self.buckets is None:  # the first step: its buckets are the ones later steps launch
            self.buckets, rest = buckets_of(self.params)
            self._index = {id(m): i for i, b in enumerate(self.buckets) for m in b.members}
            _settle(self.buckets, rest)
            return
        if not armed:
            settle_gradients(self.params)
            return
        for i, b in enumerate(self.buckets):
            if i in self._launched:
                flat = _wait(self._launched[i])
                _write_back(b, _reduce(b, flat, first_done=True))
        self._launched = {}
        settle_gradients(self.params)  # what the hooks did not settle (nothing, in the common case)


def _flatten(b: Bucket) -> torch.Tensor:
    locals_ = [m.grad.to_local() for m in b.members]
    return torch.cat([t.reshape(-1) for t in locals_]) if len(locals_) > 1 else locals_[0].reshape(-1).clone()


def _reduce(b: Bucket, flat: torch.Tensor, *, first_done: bool = False) -> torch.Tensor:
    for axis in b.axes[1:] if first_done else b.axes:
        _wait(_all_reduce(b, axis, flat))
    return flat


def _all_reduce(b: Bucket, axis: int, flat: torch.Tensor) -> torch.Tensor:
    """Start summing `flat` in place over `axis` of the bucket's mesh; `_wait(flat)` completes it. In
    place, as DDP's buckets are: `funcol.all_reduce` would first copy the whole bucket. The functional
    in-place op (not `dist.all_reduce`) goes through the dispatcher, so comm accounting sees it."""
    return _ALL_REDUCE_(flat, "sum", b.mesh.get_group(axis).group_name)


def _wait(flat: torch.Tensor) -> torch.Tensor:
    return _WAIT(flat)


def _write_back(b: Bucket, flat: torch.Tensor) -> None:
    offset = 0
    for p in b.members:
        g = p.grad
        local = g.to_local()
        piece = flat[offset:offset + local.numel()].view(local.shape)
        offset += local.numel()
        p.grad = DTensor.from_local(piece, b.mesh, p.placements, run_check=False, shape=g.shape,
                                    stride=contiguous_strides(g.shape))
