"""The logical device mesh and per-tensor placements the planner reasons about.

A plan never needs real devices: a `MeshSpec` is only named axis sizes. Placements reuse DTensor's own
classes (`Shard`, `Replicate`, `Partial`) so that a chosen plan can be handed to DTensor / the runtime
without translation, and so that options read from DTensor's strategy registry need no conversion.
A `Spec` is one placement per mesh axis, in mesh-axis order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from torch.distributed.tensor import Partial, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = [
    "MeshSpec",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "Spec",
    "all_specs",
    "is_even",
    "local_shape",
    "normalize_spec",
    "placement_from_json",
    "placement_to_json",
    "spec_from_json",
    "spec_from_str",
    "spec_str",
    "spec_to_json",
    "trivial_axis_ok",
]

Spec = tuple[Placement, ...]  # one placement per mesh axis, in MeshSpec axis order

# The only Partial reductions the planner keeps: linear reductions that an all-reduce / reduce-scatter
# implements. P(max)/P(min) (pointwise ops) and `_MaskPartial` (vocab-parallel embedding) are dropped.
PARTIAL_OPS = ("sum", "avg")


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshSpec:
    """An ordered, named logical device mesh, e.g. `MeshSpec.of({"dp": 2, "tp": 4})` (tp innermost)."""

    axes: tuple[tuple[str, int], ...]
    # derived once (the planner asks for them in its inner loops)
    names: tuple[str, ...] = field(init=False, compare=False, repr=False)
    sizes: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [n for n, _ in self.axes]
        if not self.axes:
            raise ValueError("a MeshSpec needs at least one axis")
        if len(set(names)) != len(names):
            raise ValueError(f"mesh axis names must be unique, found {names}")
        for name, size in self.axes:
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes must be positive ints")
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "sizes", tuple(size for _, size in self.axes))

    @classmethod
    def of(cls, axes: Mapping[str, int] | Iterable[tuple[str, int]]) -> MeshSpec:
        """Build from `{"dp": 2, "tp": 4}` (insertion order is axis order) or `[("dp", 2), ("tp", 4)]`."""
        items = axes.items() if isinstance(axes, Mapping) else axes
        return cls(axes=tuple((str(n), int(s)) for n, s in items))


    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def num_devices(self) -> int:
        return math.prod(self.sizes)

    def size(self, axis: str | int) -> int:
        """Size of one axis, by name or index."""
        return self.sizes[self.index(axis)]

    def index(self, axis: str | int) -> int:
        """Position of an axis given by name (or already an index)."""
        if isinstance(axis, int):
            if not -self.ndim <= axis < self.ndim:
                raise IndexError(f"mesh axis index {axis} out of range for {self}")
            return axis % self.ndim
        try:
            return self.names.index(axis)
        except ValueError:
            raise KeyError(f"no mesh axis named {axis!r}; axes are {self.names}") from None

    def __str__(self) -> str:
        return "{" + ", ".join(f"{n}={s}" for n, s in self.axes) + "}"


def normalize_spec(spec: Sequence[Placement], ndim: int) -> Spec:
    """`spec` as a tuple with negative Shard dims made non-negative for a tensor of `ndim` dims."""
    return tuple(Shard(p.dim % ndim) if type(p) is Shard and p.dim < 0 else p for p in spec)


def _placement_str(p: Placement) -> str:
    if type(p) is _StridedShard:
        return f"SS({p.dim},{p.split_factor})"
    if type(p) is Shard:
        return f"S({p.dim})"
    if type(p) is Replicate:
        return "R"
    if type(p) is Partial:
        name = "P" if type(p) is Partial else type(p).__name__
        return name if p.reduce_op == "sum" else f"{name}({p.reduce_op})"
    return repr(p)


def spec_str(spec: Sequence[Placement] | None) -> str:
    """Short form, e.g. `(S(0), R)`, `(P, S(1))`, `(P(avg),)`; `-` for None."""
    if spec is None:
        return "-"
    return "(" + ", ".join(_placement_str(p) for p in spec) + ("," if len(spec) == 1 else "") + ")"


def placement_to_json(p: Placement) -> dict[str, Any]:
    """{"type": "shard", "dim": d} | {"type": "replicate"} | {"type": "partial", "reduce_op": op}."""
    if type(p) is Shard:
        return {"type": "shard", "dim": p.dim}
    if type(p) is _StridedShard:
        return {"type": "strided_shard", "dim": p.dim, "split_factor": p.split_factor}
    if type(p) is Replicate:
        return {"type": "replicate"}
    if type(p) is Partial:
        return {"type": "partial", "reduce_op": p.reduce_op}
    raise ValueError(f"placement {p!r} has no JSON form: plans use only Shard, Replicate and Partial")


def placement_from_json(obj: Mapping[str, Any]) -> Placement:
    kind = obj.get("type")
    if kind == "shard":
        return Shard(int(obj["dim"]))
    if kind == "strided_shard":
        return _StridedShard(int(obj["dim"]), split_factor=int(obj["split_factor"]))
    if kind == "replicate":
        return Replicate()
    if kind == "partial":
        return Partial(str(obj.get("reduce_op", "sum")))
    raise ValueError(f"unknown placement JSON {dict(obj)!r}; expected type shard, replicate or partial")


def spec_to_json(spec: Sequence[Placement]) -> list[dict[str, Any]]:
    return [placement_to_json(p) for p in spec]


def spec_from_json(obj: Sequence[Mapping[str, Any]]) -> Spec:
    return tuple(placement_from_json(p) for p in obj)


def local_shape(shape: Sequence[int], spec: Sequence[Placement], mesh: MeshSpec) -> tuple[int, ...] | None:
    """Per-device shape under `spec` with even sharding, or None when some sharded dim does not divide.

    A tensor dim sharded on several mesh axes is split by the product of their sizes (nested sharding).
    """
    out = list(shape)
    for p, n in zip(spec, mesh.sizes, strict=True):
        if type(p) is Shard:
            d = p.dim % len(shape) if shape else p.dim
            if d >= len(shape) or out[d] % n:
                return None
            out[d] //= n
    return tuple(out)


def is_even(shape: Sequence[int], spec: Sequence[Placement], mesh: MeshSpec) -> bool:
    """True when every sharded dim of `shape` is divisible by the product of its mesh-axis sizes."""
    return local_shape(shape, spec, mesh) is not None


def trivial_axis_ok(spec: Sequence[Placement], mesh: MeshSpec) -> bool:
    """False when `spec` shards or reduces over a mesh axis of size 1.

    On a size-1 axis Shard(d) and Partial hold the same values as Replicate: offering them only
    multiplies the options by equivalent copies, and DTensor's private strategy functions are not
    written for them (its view/expand strategy raises KeyError for a Shard of a size-1 dim over a
    size-1 axis; the step search plans one replica on such an axis, `{"dp": 1}`).
    """
    return all(n > 1 or type(p) is Replicate for p, n in zip(spec, mesh.sizes, strict=True))


def all_specs(
    shape: Sequence[int], mesh: MeshSpec, *, partial: bool = False
) -> Iterator[Spec]:
    """Every evenly sharded spec of R / S(d) per axis (plus P(sum), P(avg) with `partial`), R first.

    Combinations that mix P(sum) and P(avg) on different axes are left out: they are legal in DTensor but
    no producer in a training graph needs them and they double the candidate count. An axis of size 1
    offers only Replicate (see `trivial_axis_ok`).
    """
    per_axis: list[Placement] = [Replicate(), *(Shard(d) for d in range(len(shape)))]
    if partial:
        per_axis += [Partial(op) for op in PARTIAL_OPS]
    choices = [per_axis if n > 1 else [Replicate()] for n in mesh.sizes]
    for spec in product(*choices):
        ops = {p.reduce_op for p in spec if type(p) is Partial}
        if len(ops) <= 1 and is_even(shape, spec, mesh):
            yield spec


def _split_top_level(text: str) -> list[str]:
    """`text` cut at the commas that are not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _placement_from_str(text: str) -> Placement:
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    head, _, rest = text.partition("(")
    args = [a.strip() for a in rest.rstrip(")").split(",")] if rest else []
    if head == "S" and len(args) == 1:
        return Shard(int(args[0]))
    if head == "SS" and len(args) == 2:
        return _StridedShard(int(args[0]), split_factor=int(args[1]))
    if head == "P" and len(args) == 1 and args[0] in PARTIAL_OPS:
        return Partial(args[0])
    raise ValueError(
        f"unknown placement {text!r}; expected R, P, P(sum|avg), S(dim) or SS(dim,split_factor)"
    )


def spec_from_str(text: str) -> Spec:
    """Inverse of `spec_str`: `"(S(0), R)"` -> `(Shard(0), Replicate())`; plans store specs this way."""
    body = text.strip()
    if not (body.startswith("(") and body.endswith(")")):
        raise ValueError(f"a spec is written like '(S(0), R)' or '(P,)', found {text!r}")
    return tuple(_placement_from_str(p) for p in _split_top_level(body[1:-1]))
