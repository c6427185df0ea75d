"""Sharding hints for one tensor: what the user asked for, parsed, checked and mapped onto mesh axes.

A hint follows MindSpore's ``Cell.shard`` strategies: per tensor dim either a *split count* (``(4, 1)``: dim 0
in 4 pieces, dim 1 whole) or the *mesh axes* that shard it (``("dp", None, ("dp", "tp"))`` style, where a
dim may name several axes and ``None`` means not sharded). Counts leave the choice of axes to the solver;
names pin it. A hint is a constraint the solver must honour, never a separate code path, so everything here
is pure data: parsing, validation with errors that tell the user how to fix the spec, and the enumeration of
mesh-axis assignments the solver may pick from.

The serialised string form (``str(hint)``, e.g. ``(4, 1)`` or ``(dp, -, (dp, tp))``) is what travels through
the ``autoshard::shard`` custom op, because custom ops take strings but not Python objects; it is also
what a user sees in a printed graph, so it is the same compact text as ``__str__``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from autoshard.errors import InputError

__all__ = [
    "MESH_AXES",
    "DimSpec",
    "TensorHint",
    "mesh_sizes",
    "parse_spec",
]

# The axis names a hint may use: data, tensor, pipeline and expert parallelism.
MESH_AXES: tuple[str, ...] = ("dp", "tp", "pp", "ep")

_SPEC_EXAMPLES = "e.g. (4, 1) to split dim 0 four ways, or ('dp', None, 'tp') to name mesh axes"


@dataclass(frozen=True, kw_only=True, slots=True)
class DimSpec:
    """How one tensor dim is sharded: a split count, or the mesh axes that shard it.

    Exactly one form is used: ``DimSpec(count=4)`` leaves the axes to the solver; ``DimSpec(axes=("dp",))``
    pins them and ``DimSpec(axes=())`` says "not sharded" in the named form.
    """

    count: int | None = None  # split count >= 1 (1 = not split); None in the named form
    axes: tuple[str, ...] = ()  # mesh axes in major-to-minor order; only in the named form

    def __post_init__(self) -> None:
        if self.count is not None:
            if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
                raise InputError(
                    f"expected a split count as an integer >= 1, found {self.count!r}; "
                    "use 1 for a dim that is not split."
                )
            if self.axes:
                raise InputError(
                    f"expected a dim to give either a split count or mesh axes, found both "
                    f"(count={self.count}, axes={self.axes}); keep one of them."
                )
        elif not isinstance(self.axes, tuple):
            raise InputError(f"expected DimSpec.axes as a tuple of axis names, found {self.axes!r}.")
        else:
            for axis in self.axes:
                _check_axis_name(axis, "DimSpec")
            _check_no_repeats((self.axes,), "DimSpec")

    @property
    def is_named(self) -> bool:
        """True for the mesh-axis form, False for the split-count form."""
        return self.count is None

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        if not self.axes:
            return "-"
        if len(self.axes) == 1:
            return self.axes[0]
        return "(" + ", ".join(self.axes) + ")"


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class TensorHint:
    """The sharding hint of one tensor: one DimSpec per dim, all split counts or all mesh axes."""

    dims: tuple[DimSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.dims, tuple) or not all(isinstance(d, DimSpec) for d in self.dims):
            raise InputError(
                f"expected TensorHint.dims as a tuple of DimSpec, found {self.dims!r}; "
                "build hints with autoshard.hints.parse_spec."
            )
        if len({d.is_named for d in self.dims}) > 1:
            raise InputError(
                f"expected every dim of a hint in one form (all split counts or all mesh axes), found "
                f"{self}; write 1 rather than None for an unsplit dim in a split-count hint."
            )
        _check_no_repeats(tuple(d.axes for d in self.dims), "hint")

    # --- what the hint says -------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def is_named(self) -> bool:
        """True when the hint names mesh axes; False for split counts (a 0-d hint counts as counts)."""
        return bool(self.dims) and self.dims[0].is_named

    @property
    def counts(self) -> tuple[int, ...] | None:
        """The split counts, or None for a named hint (whose counts depend on the mesh)."""
        if self.is_named:
            return None
        return tuple(d.count for d in self.dims)  # type: ignore[misc]

    @property
    def axes(self) -> tuple[tuple[str, ...], ...] | None:
        """The named axes per dim, or None for a split-count hint (the solver picks the axes)."""
        if not self.is_named:
            return None
        return tuple(d.axes for d in self.dims)

    def split_counts(self, mesh: Mapping[str, int] | None = None) -> tuple[int, ...] | None:
        """Pieces per dim: the counts themselves, or for named axes the product of their sizes on `mesh`.

        None when the hint names axes and no mesh is given, as their sizes are unknown then.
        """
        if not self.is_named:
            return self.counts
        if mesh is None:
            return None
        sizes = mesh_sizes(mesh)
        return tuple(math.prod(sizes.get(a, 1) for a in d.axes) for d in self.dims)

    # --- checks -------------------------------------------------------------------------------------

    def check_rank(self, ndim: int, where: str) -> None:
        """Refuse a hint whose number of entries differs from the tensor's number of dims."""
        if self.ndim != ndim:
            raise InputError(
                f"{where}: expected a spec with one entry per tensor dim ({ndim}), found {self.ndim} "
                f"entries in {self}; give exactly {ndim} entries."
            )

    def check_shape(self, shape: Sequence[Any], where: str, mesh: Mapping[str, int] | None = None) -> None:
        """Refuse a hint whose pieces do not divide the dims they split.

        Uneven shards would make the solver's per-device sizes and the runtime's shapes disagree, so a
        split must divide its dim exactly. Named axes can only be checked when `mesh` gives their sizes.
        Symbolic sizes (dynamic shapes) are skipped: their value is not known at capture.
        """
        shape = tuple(shape)
        self.check_rank(len(shape), where)
        counts = self.split_counts(mesh)
        if counts is None:
            return
        for i, (size, count) in enumerate(zip(shape, counts)):
            if not isinstance(size, int) or size % count == 0:
                continue
            over = ""
            if self.is_named:
                names = "x".join(f"{a}={mesh_sizes(mesh)[a]}" for a in self.dims[i].axes)  # type: ignore[arg-type]
                over = f" (over mesh axes {names})"
            raise InputError(
                f"{where}: dim {i} of size {size} cannot be split {count} ways{over}; expected a split "
                f"count that divides {size}, e.g. one of {_some_divisors(size)}. Change the hint for dim {i} "
                f"or make the dim a multiple of {count}."
            )

    def check_mesh(
        self, mesh: Mapping[str, int], shape: Sequence[Any] | None = None, where: str = "hint"
    ) -> None:
        """Refuse a hint that cannot be realised on `mesh` (and, given `shape`, on that tensor).

        Split counts: each must be a product of some mesh axis sizes, all together must fit the devices,
        and there must be a way to give each dim its own axes. Named axes: each must exist in the mesh.
        """
        sizes = mesh_sizes(mesh)
        shown = _show_mesh(sizes)
        if self.is_named:
            for i, d in enumerate(self.dims):
                for axis in d.axes:
                    if axis not in sizes:
                        raise InputError(
                            f"{where}: dim {i} names mesh axis {axis!r}, but mesh {shown} has only axes "
                            f"{list(sizes)}; expected one of those. Name an axis of the mesh or add "
                            f"{axis!r} to it."
                        )
        else:
            valid = sorted(_subset_products(sizes))
            counts = self.counts or ()
            for i, count in enumerate(counts):
                if count not in valid:
                    raise InputError(
                        f"{where}: dim {i} is split {count} ways, but on mesh {shown} a dim can only be "
                        f"split {_or_list(valid)} ways (products of mesh axis sizes); expected one of those. "
                        "Change the count or the mesh."
                    )
            devices = math.prod(sizes.values())
            total = math.prod(counts)
            if total > devices:
                raise InputError(
                    f"{where}: the split counts {self} need {total} devices, but mesh {shown} has "
                    f"{devices}; expected counts whose product is at most {devices}. Lower a count."
                )
            if not self.axis_assignments(sizes):
                raise InputError(
                    f"{where}: the split counts {self} cannot be laid on mesh {shown}: each mesh axis can "
                    "shard only one dim, and no choice of separate axes per dim gives these counts; "
                    "expected counts that use disjoint mesh axes. Change a count or the mesh."
                )
        if shape is not None:
            self.check_shape(shape, where, sizes)

    # --- mapping onto a mesh ------------------------------------------------------------------------

    def axis_assignments(self, mesh: Mapping[str, int]) -> list[tuple[tuple[str, ...], ...]]:
        """Every way to realise the hint on `mesh`: per dim, the mesh axes that shard it.

        Named hints have exactly one (themselves) when every axis is in the mesh, none otherwise. Split
        counts have one per choice of disjoint axis subsets whose sizes multiply to each count, axes in
        mesh order within a dim. Size-1 axes are never assigned: they shard nothing, and listing them
        would only add duplicates of the same layout. Returns [] when the hint does not fit.
        """
        sizes = mesh_sizes(mesh)
        if self.is_named:
            named = self.axes or ()
            if all(a in sizes for d in named for a in d):
                return [named]
            return []
        usable = tuple(a for a, s in sizes.items() if s > 1)
        return list(_assign(self.counts or (), usable, sizes, frozenset()))

    # --- (de)serialisation --------------------------------------------------------------------------

    def __str__(self) -> str:
        inner = ", ".join(str(d) for d in self.dims)
        return f"({inner},)" if len(self.dims) == 1 else f"({inner})"

    def __repr__(self) -> str:
        return f"TensorHint({str(self)!r})"

    def serialize(self) -> str:
        """The compact text form, which :meth:`deserialize` reads back; what the custom op carries."""
        return str(self)

    @staticmethod
    def deserialize(text: str, *, where: str = "spec string") -> TensorHint:
        """Read the compact text form, e.g. ``(4, 1)``, ``(dp, -, tp)`` or ``((dp, tp), -)``."""
        if not isinstance(text, str):
            raise InputError(f"{where}: expected a spec string such as '(4, 1)', found {type(text).__name__}.")
        return _deserialize_cached(text, where)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"dims": [4, 1]}`` or ``{"dims": [["dp"], [], ["dp", "tp"]]}``."""
        if self.is_named:
            return {"dims": [list(d.axes) for d in self.dims]}
        return {"dims": [d.count for d in self.dims]}

    @staticmethod
    def from_json(data: Mapping[str, Any], *, where: str = "hint JSON") -> TensorHint:
        """Read what :meth:`to_json` wrote (refusing anything else)."""
        if not isinstance(data, Mapping) or set(data) != {"dims"} or not isinstance(data["dims"], list):
            raise InputError(
                f"{where}: expected a dict {{'dims': [...]}} as written by TensorHint.to_json, found "
                f"{data!r}; serialise hints with to_json."
            )
        entries = tuple(tuple(e) if isinstance(e, list) else e for e in data["dims"])
        return parse_spec(entries, None, where=where)


def parse_spec(spec: Any, ndim: int | None, *, where: str) -> TensorHint:
    """Parse a user's spec for a tensor with `ndim` dims (None when not known yet) into a TensorHint.

    Accepted: a tuple (or list) of split counts ``(4, 1)``; a tuple of mesh-axis entries, each an axis name,
    None (not sharded) or a tuple of names ``("dp", None, ("dp", "tp"))``; the compact string form; or an
    existing TensorHint. `where` names the tensor or input in every error message.
    """
    if isinstance(spec, TensorHint):
        hint = spec
    elif isinstance(spec, str):
        hint = TensorHint.deserialize(spec, where=where)
    elif isinstance(spec, (tuple, list)):
        hint = _parse_entries(tuple(spec), where)
    else:
        raise InputError(
            f"{where}: expected a sharding spec as a tuple, {_SPEC_EXAMPLES}; found "
            f"{type(spec).__name__} {spec!r}. Wrap the entries in a tuple."
        )
    if ndim is not None:
        hint.check_rank(ndim, where)
    return hint


def mesh_sizes(mesh: Any) -> dict[str, int]:
    """A mesh as {axis name: size} in mesh order, from a mapping or a named torch DeviceMesh.

    Refused: anything else, empty meshes, non-string names and sizes that are not positive integers.
    """
    if not isinstance(mesh, Mapping):
        names = getattr(mesh, "mesh_dim_names", None)
        shape = getattr(mesh, "shape", None)
        if names is None or shape is None:
            raise InputError(
                f"expected a mesh as a mapping of axis name to size, e.g. {{'dp': 2, 'tp': 4}}, or a "
                f"DeviceMesh with mesh_dim_names, found {type(mesh).__name__} {mesh!r}."
            )
        mesh = dict(zip(names, tuple(shape)))
    if not mesh:
        raise InputError("expected a mesh with at least one axis, e.g. {'dp': 2, 'tp': 4}, found an empty one.")
    out: dict[str, int] = {}
    for name, size in mesh.items():
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise InputError(
                f"expected mesh axes as name -> positive integer size, found {name!r}: {size!r} in "
                f"{dict(mesh)}; fix that axis."
            )
        out[name] = int(size)
    return out


# --- helpers ----------------------------------------------------------------------------------------


def _parse_entries(entries: tuple[Any, ...], where: str) -> TensorHint:
    kinds = [_entry_kind(e, i, entries, where) for i, e in enumerate(entries)]
    if len(set(kinds)) > 1:
        first = kinds.index("axes")
        raise InputError(
            f"{where}: expected all split counts or all mesh axes in one spec, found a mix in "
            f"{_show(entries)} (entry {first} is {entries[first]!r}); write 1 rather than None for an "
            f"unsplit dim in a split-count spec, or name axes for every dim ({_SPEC_EXAMPLES})."
        )
    if kinds and kinds[0] == "count":
        for i, e in enumerate(entries):
            if e < 1:
                raise InputError(
                    f"{where}: entry {i} of {_show(entries)} is {e}; expected a split count >= 1 (1 = not "
                    "split). Use 1 for a dim that is not split."
                )
        return TensorHint(dims=tuple(DimSpec(count=int(e)) for e in entries))
    axes = tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)
    for i, names in enumerate(axes):
        for name in names:
            _check_axis_name(name, f"{where}: entry {i} of {_show(entries)}")
    _check_no_repeats(axes, f"{where}: {_show(entries)}")
    return TensorHint(dims=tuple(DimSpec(axes=a) for a in axes))


def _entry_kind(entry: Any, i: int, entries: tuple[Any, ...], where: str) -> str:
    """'count' or 'axes'; anything that is neither is refused here, naming the entry."""
    if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
        return "count"
    if entry is None or isinstance(entry, str):
        return "axes"
    if isinstance(entry, (tuple, list)) and all(isinstance(n, str) for n in entry):
        return "axes"
    raise InputError(
        f"{where}: entry {i} of {_show(entries)} is {type(entry).__name__} {entry!r}; expected a split "
        f"count, a mesh axis name ({', '.join(MESH_AXES)}), None or a tuple of axis names "
        f"({_SPEC_EXAMPLES})."
    )


def _check_axis_name(name: Any, where: str) -> None:
    if name not in MESH_AXES:
        hint = f" (did you mean {name.lower()!r}?)" if isinstance(name, str) and name.lower() in MESH_AXES else ""
        raise InputError(
            f"{where}: names unknown mesh axis {name!r}{hint}; expected one of {', '.join(MESH_AXES)} "
            "(data, tensor, pipeline, expert parallelism)."
        )


def _check_no_repeats(axes_per_dim: Sequence[tuple[str, ...]], where: str) -> None:
    """A mesh axis can shard a tensor once: used twice, the same devices would hold two pieces at once."""
    seen: dict[str, int] = {}
    for i, axes in enumerate(axes_per_dim):
        for axis in axes:
            if axis in seen:
                other = f"twice in dim {i}" if seen[axis] == i else f"by dims {seen[axis]} and {i}"
                raise InputError(
                    f"{where}: mesh axis {axis!r} is used {other}; expected each axis at most once per "
                    "tensor. Drop one of the uses or use another axis."
                )
            seen[axis] = i


def _assign(
    counts: tuple[int, ...], usable: tuple[str, ...], sizes: Mapping[str, int], taken: frozenset[str]
) -> Iterator[tuple[tuple[str, ...], ...]]:
    """Depth-first over dims: each dim takes a subset of the still free axes whose sizes give its count."""
    if not counts:
        yield ()
        return
    for subset in _subsets_with_product(counts[0], tuple(a for a in usable if a not in taken), sizes):
        for rest in _assign(counts[1:], usable, sizes, taken | set(subset)):
            yield (subset, *rest)


def _subsets_with_product(count: int, axes: tuple[str, ...], sizes: Mapping[str, int]) -> Iterator[tuple[str, ...]]:
    """Subsets of `axes` (kept in mesh order) whose sizes multiply to `count`, smallest subsets first."""
    found: list[tuple[str, ...]] = []

    def walk(start: int, chosen: tuple[str, ...], product: int) -> None:
        if product == count:
            found.append(chosen)
            return
        for j in range(start, len(axes)):
            size = sizes[axes[j]]
            if count % (product * size) == 0:
                walk(j + 1, (*chosen, axes[j]), product * size)

    walk(0, (), 1)
    yield from sorted(found, key=len)


def _subset_products(sizes: Mapping[str, int]) -> set[int]:
    products = {1}
    for size in sizes.values():
        products |= {p * size for p in products}
    return products


def _some_divisors(n: int, limit: int = 8) -> str:
    divisors = [d for d in range(1, min(n, 1024) + 1) if n % d == 0][:limit]
    return ", ".join(map(str, divisors)) if divisors else "1"


def _or_list(values: Sequence[int]) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _show(entries: tuple[Any, ...]) -> str:
    return repr(entries)


def _show_mesh(sizes: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sizes.items()) + "}"


# --- the compact text form --------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(-)|([(),]))")


@lru_cache(maxsize=1024)
def _deserialize_cached(text: str, where: str) -> TensorHint:
    """Recursive descent over: spec := '(' [entry (',' entry)* [',']] ')';
    entry := count | '-' | name | '(' [name (',' name)* [',']] ')'."""
    tokens = _tokenize(text, where)
    pos = 0

    def fail(what: str) -> InputError:
        return InputError(
            f"{where}: cannot read spec string {text!r}: {what}; expected the form written by "
            "TensorHint.serialize, e.g. '(4, 1)', '(dp, -, tp)' or '((dp, tp), -)'."
        )

    def peek() -> str:
        return tokens[pos] if pos < len(tokens) else "the end"

    def take() -> str:
        nonlocal pos
        tok = peek()
        pos += 1
        return tok

    def sequence(read_item: Any) -> tuple[Any, ...]:
        opening = take()
        if opening != "(":
            raise fail(f"expected '(', found {opening!r}")
        items: list[Any] = []
        while peek() != ")":
            if peek() == "the end":
                raise fail("a ')' is missing")
            items.append(read_item())
            if peek() == ",":
                take()
            elif peek() != ")":
                raise fail(f"expected ',' or ')', found {peek()!r}")
        take()
        return tuple(items)

    def axis_name() -> str:
        tok = take()
        if not tok[:1].isalpha() and tok[:1] != "_":
            raise fail(f"expected a mesh axis name inside an axis group, found {tok!r}")
        return tok

    def entry() -> Any:
        tok = peek()
        if tok == "(":
            return sequence(axis_name)
        take()
        if tok.isdigit():
            return int(tok)
        if tok == "-":
            return None
        if tok[:1].isalpha() or tok[:1] == "_":
            return tok
        raise fail(f"expected a split count, '-', an axis name or an axis group, found {tok!r}")

    entries = sequence(entry)
    if pos != len(tokens):
        raise fail(f"unexpected {peek()!r} after the closing ')'")
    return _parse_entries(entries, where)


def _tokenize(text: str, where: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if not m:
            raise InputError(
                f"{where}: cannot read spec string {text!r}: unexpected character {stripped[pos:].lstrip()[:1]!r}; "
                "expected the form written by TensorHint.serialize, e.g. '(4, 1)' or '(dp, -, tp)'."
            )
        tokens.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return tokens
