"""Sharding options of one graph node: which placements its inputs must arrive in and its outputs get.

The options are DTensor's: read from its strategy registry through `_dtensor` (single-dim rules expanded
over the mesh axes here, op-strategy functions, the decomposition fallback for composites such as
aten.linear). autoshard adds rules only where DTensor has none; each is marked "own rule" below.

Then they are filtered to what the planner and runtime handle: placements Shard / Replicate /
Partial(sum|avg) only (no `_StridedShard`, no P(max|min), no `_MaskPartial`), even sharding only for
inputs and outputs, duplicates removed, and a deterministic order (replicated first).

Excluded on purpose (besides the DTensor rules found wrong, listed in strategies/exclusions.py):
- vocab-parallel embedding (weight S(0)): DTensor models it with `_MaskPartial`, whose mask buffer is
  state shared between the input and output redistributions; a raw local embedding on global ids is
  out of range. The planner would need a masked-embedding kernel to use it, so it is not offered.

Options are cached per (op, argument shapes/dtypes/values, input aliasing, mesh): the identical layers
of a deep model are enumerated once. Single-axis rules are cached without the mesh, so a new mesh only
pays for the expansion.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch
from torch.fx import Node
from torch.utils._pytree import tree_map

from autoshard.errors import ShardingError
from autoshard.strategies import _dtensor, exclusions
from autoshard.strategies.executable import unexecutable_reason
from autoshard.ir.signature import arg_signature
from autoshard.strategies.fused_split import fused_split_options
from autoshard.strategies.mesh import (
    PARTIAL_OPS,
    MeshSpec,
    Partial,
    Placement,
    Replicate,
    Shard,
    Spec,
    all_specs,
    is_even,
    normalize_spec,
    spec_str,
    trivial_axis_ok,
)

__all__ = ["ShardingOption", "clear_option_cache", "node_options", "node_source", "option_cache_info",
           "runs_locally_replicated"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardingOption:
    """One way to run a node on the mesh.

    output: one spec per output of the node (a single-tensor op has one; split/chunk/topk have one per
        element of the returned tuple, None for non-tensor elements; ops returning nothing have none).
    inputs: the spec each input must arrive in, aligned with `node.all_input_nodes`; None where the
        placement does not matter. For getitem, the one input is the selected element of the producer.
    """

    output: tuple[Spec | None, ...]
    inputs: tuple[Spec | None, ...]

    def __str__(self) -> str:
        outs = ", ".join(spec_str(s) for s in self.output)
        ins = ", ".join(spec_str(s) for s in self.inputs)
        return f"[{outs}] <- [{ins}]"


# ---------------------------------------------------------------------------------------------- entry


def node_options(node: Node, mesh: MeshSpec) -> list[ShardingOption]:
    """Every allowed sharding option of `node` (a node of a torch.export graph) on `mesh`: DTensor's
    own, plus those of autoshard's own rules (fused_split: chunked fused projections)."""
    return fused_split_options(node, mesh, _base_options(node, mesh))


def _base_options(node: Node, mesh: MeshSpec) -> list[ShardingOption]:
    val = node.meta.get("val")
    if node.op == "placeholder":
        # own rule: parameters and inputs may start in any even R/S(d) layout; Partial is no input state
        if not isinstance(val, torch.Tensor):
            return [ShardingOption(output=(None,), inputs=())]
        return [ShardingOption(output=(s,), inputs=()) for s in _specs(tuple(val.shape), mesh, False)]
    if node.op == "output":
        # own rule: the graph output imposes nothing; the caller decides how results are returned
        return [ShardingOption(output=(), inputs=(None,) * len(node.all_input_nodes))]
    if node.op != "call_function":
        raise NotImplementedError(f"node {node.name}: op kind {node.op!r} is not supported")
    if node.target is operator.getitem:
        # own rule: getitem selects one element of a multi-output producer; its option follows the
        # producer's chosen placement for that element (any allowed placement, Partial included)
        if not isinstance(val, torch.Tensor):
            return [ShardingOption(output=(None,), inputs=(None,))]
        return [ShardingOption(output=(s,), inputs=(s,)) for s in _specs(tuple(val.shape), mesh, True)]
    return list(_call_options(node, mesh))


def _specs(shape: tuple[int, ...], mesh: MeshSpec, partial: bool) -> tuple[Spec, ...]:
    return _cached_specs(shape, mesh, partial)


@functools.lru_cache(maxsize=4096)
def _cached_specs(shape: tuple[int, ...], mesh: MeshSpec, partial: bool) -> tuple[Spec, ...]:
    return tuple(all_specs(shape, mesh, partial=partial))


# ------------------------------------------------------------------------------------ call functions


def _meta_arg(a: Any) -> Any:
    if isinstance(a, Node):
        return _dtensor.meta_like(a.meta.get("val"))
    if isinstance(a, (list, tuple)):
        return type(a)(_meta_arg(e) for e in a)
    return a


def _tensor_nodes(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Node]:
    """The tensor-valued Nodes among the args, in DTensor's input order (args, kwargs, lists flattened)."""
    out: list[Node] = []
    for a in (*args, *kwargs.values()):
        for e in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(e, Node) and isinstance(e.meta.get("val"), torch.Tensor):
                out.append(e)
    return out


def _out_shapes(val: Any) -> tuple[tuple[int, ...] | None, ...]:
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape),)
    if isinstance(val, (list, tuple)):
        return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in val)
    return ()


def _call_options(node: Node, mesh: MeshSpec) -> tuple[ShardingOption, ...]:
    op = node.target
    args = tuple(_meta_arg(a) for a in node.args)
    kwargs = {k: _meta_arg(v) for k, v in node.kwargs.items()}
    tnodes = _tensor_nodes(node.args, node.kwargs)
    inputs = node.all_input_nodes
    alias = tuple(inputs.index(n) for n in tnodes)
    out_shapes = _out_shapes(node.meta.get("val"))
    key = (op, arg_signature(args), arg_signature(kwargs), alias, len(inputs), out_shapes, mesh)
    hit = _OPTIONS.get(key)
    if hit is None:
        try:
            hit = _compute_options(op, args, kwargs, node.meta.get("val"), alias, len(inputs), mesh)
        except Exception as exc:  # noqa: BLE001 - DTensor's private strategy code raises anything
            where = node_source(node)
            raise ShardingError(
                f"node {node.name} ({op}){' at ' + where if where else ''}: expected at least one sharding "
                f"option on mesh {mesh}, found none ({type(exc).__name__}: {exc}). DTensor's rule for this op "
                "rejects every placement autoshard offers; report the op and line, or rewrite that line "
                "with ops DTensor supports"
            ) from exc
        _OPTIONS[key] = hit
    return hit


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def node_source(node: Node) -> str:
    """"file:line" of the deepest frame of the user's code (not torch's) that created `node`, or ""."""
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "") if not f[0].startswith(_TORCH_DIR)]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""


# Caches keyed by hashable signatures (args hold meta tensors and dicts, so not functools caches).
_OPTIONS: dict[tuple, tuple[ShardingOption, ...]] = {}
_RULES: dict[tuple, tuple[int, list] | None] = {}


def _compute_options(
    op: Any, args: tuple, kwargs: dict, val: Any, alias: tuple[int, ...], n_inputs: int, mesh: MeshSpec
) -> tuple[ShardingOption, ...]:
    in_shapes = tuple(tuple(t.shape) for t in _dtensor.tensor_args(args, kwargs))
    out_shapes = _out_shapes(val)
    rows = _raw_options(op, args, kwargs, val, in_shapes, mesh)
    seen: dict[ShardingOption, None] = {}
    for outs, ins in rows:
        opt = _to_option(outs, ins, alias, n_inputs, in_shapes, out_shapes, mesh)
        if opt is not None:
            seen.setdefault(opt, None)
    if not seen:
        raise _dtensor.NoStrategy(f"{op}: none of DTensor's {len(rows)} options survived filtering on {mesh}")
    opts = [o for o in seen if unexecutable_reason(op, o.inputs) is None]
    if not opts:
        raise _dtensor.NoStrategy(f"{op}: DTensor's dispatch runs none of its {len(seen)} options on {mesh}")
    for pos, slot in enumerate(alias):
        if alias.index(slot) == pos:
            opts = _collapse_free_input(opts, slot, _specs(in_shapes[pos], mesh, True))
    opts = exclusions.filter_options(op, opts, mesh)  # DTensor rules the ground truth found wrong
    return tuple(sorted(opts, key=_order_key))


def _collapse_free_input(opts: list[ShardingOption], slot: int, every: tuple[Spec, ...]) -> list[ShardingOption]:
    """Merge options that differ only in input `slot` and together allow every spec there into one
    option with None there (e.g. the `other` of aten.type_as, whose values are never read)."""
    groups: dict[tuple, set] = {}
    for o in opts:
        rest = o.inputs[:slot] + o.inputs[slot + 1 :]
        groups.setdefault((o.output, rest), set()).add(o.inputs[slot])
    free = {k for k, specs in groups.items() if specs >= set(every)}
    if not free:
        return opts
    out: dict[ShardingOption, None] = {}
    for o in opts:
        k = (o.output, o.inputs[:slot] + o.inputs[slot + 1 :])
        if k in free:
            o = ShardingOption(output=o.output, inputs=o.inputs[:slot] + (None,) + o.inputs[slot + 1 :])
        out.setdefault(o, None)
    return list(out)


def _raw_options(
    op: Any, args: tuple, kwargs: dict, val: Any, in_shapes: tuple, mesh: MeshSpec
) -> Iterable[tuple[tuple, tuple]]:
    """(output specs, input specs in DTensor order) pairs, before filtering."""
    n_out = len(_out_shapes(val))
    if not in_shapes:
        # own rule: factory ops (arange, full, ...) have no input for DTensor to propagate from; they are
        # computed replicated (cheap, and every device then holds the same values)
        return [(tuple(_all_r(mesh) if s is not None else None for s in _out_shapes(val)), ())]
    kind = _dtensor.strategy_kind(op)
    rules = _rules(op, args, kwargs, val, kind) if kind in ("single_dim", "decomp") else None
    if rules is not None:
        return _expand(rules[0], rules[1], mesh)
    if kind == "op_strategy":
        cands = [_specs(s, mesh, True) for s in in_shapes]
        dmesh = _dtensor.device_mesh(mesh.sizes, mesh.names)
        return _dtensor.op_strategy_options(op, args, kwargs, dmesh, cands)
    if n_out == 0 or all(s is None for s in _out_shapes(val)):
        # own rule: an op with no tensor result and no DTensor strategy (e.g. aten._assert_tensor_metadata)
        # only inspects metadata; the placement of its inputs does not matter
        return [((), (None,) * len(in_shapes))]
    # own rule: no DTensor rule for this op and signature (none registered, or its decomposition cannot
    # be traced, as DTensor's dispatch would find too): run it replicated, which is always correct;
    # codegen calls it on the local tensors (runs_locally_replicated says so for the same nodes)
    log.info("no DTensor sharding strategy for %s; offering only full replication", op)
    return [(tuple(_all_r(mesh) if s is not None else None for s in _out_shapes(val)), (_all_r(mesh),) * len(in_shapes))]


def runs_locally_replicated(node: Node) -> bool:
    """True for a call node that DTensor has no sharding rule for (no strategy registered, e.g.
    `aten.lift_fresh_copy` or transformers' custom `grouped_mm_fallback`; or a decomposition that cannot
    be traced, e.g. `aten.fill_.Tensor`), and which reads and returns tensors.

    The one predicate for both sides: the planner offers such a node only fully replicated
    (`_raw_options`'s last branch), and codegen runs it on the local replicated tensors, because DTensor's
    dispatch would raise "does not have a sharding strategy registered"."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    val = node.meta.get("val")
    if not any(s is not None for s in _out_shapes(val)):
        return False
    if not any(isinstance(n.meta.get("val"), torch.Tensor) for n in node.all_input_nodes):
        return False
    op = node.target
    kind = _dtensor.strategy_kind(op)
    if kind == "none":
        return True
    if kind not in ("single_dim", "decomp"):
        return False
    args = tuple(_meta_arg(a) for a in node.args)
    kwargs = {k: _meta_arg(v) for k, v in node.kwargs.items()}
    return _rules(op, args, kwargs, val, kind) is None


# Composite ops whose rules all have each tensor input Replicate or one common placement
# (`_dtensor.aligned_combos`): deriving them traces ~100 combinations instead of the ~2400 of the full
# product (attention with a mask: 4 s a shape, T5 planned 15 shapes).
_ALIGNED_RULES = frozenset({aten.scaled_dot_product_attention.default})


# Composites whose decomposition is matmuls, softmax and elementwise ops, which DTensor shards dim by dim:
# their rules depend on which sizes are 1 (broadcasts, a squeezed batch of one), not on which sizes are
# equal, so the key drops the equalities (a tiny model's batch often equals its head count or sequence).
_DIMWISE_RULES = frozenset({aten.linear.default, aten.scaled_dot_product_attention.default})


def _rules(op: Any, args: tuple, kwargs: dict, val: Any, kind: str) -> tuple[int, list] | None:
    if kind == "decomp":
        key = (op, *_size_pattern(args, kwargs, equalities=op not in _DIMWISE_RULES))
    else:
        key = (op, arg_signature(args), arg_signature(kwargs))
    if key not in _RULES:
        _RULES[key] = _derive_rules(op, args, kwargs, val, kind)
    return _RULES[key]


def _size_pattern(args: tuple, kwargs: dict, *, equalities: bool = True) -> tuple:
    """The arguments of a composite op with tensor sizes abstracted to their pattern.

    A decomposition is generic code: traced at other sizes it runs the same ops, and DTensor admits the
    same placements, as long as the sizes keep their pattern: which are 1, which are equal to each other
    and to the op's integer arguments (a reshape's target, a dim), and the order of the strides. So the
    rules derived once serve every micro-batch size and every layer width of that pattern (a derivation
    costs 0.1-0.5 s: batch_norm and attention trace ~1000 placement combinations). Integer arguments
    stay literal. Were a decomposition to branch on a size anyway, the price of an option would be off,
    never a value: the generated code runs DTensor's own dispatch and redistributes from the placement
    it actually produced. tests/test_strategies.py checks the rules are equal across sizes for the
    composites of the zoo. `equalities=False` (for `_DIMWISE_RULES`) keeps only which sizes are 1."""
    classes: dict[int, int] = {}

    def size(n: int) -> object:
        if n <= 1:
            return n
        return ("size", classes.setdefault(n, len(classes))) if equalities else "size"

    def tensor(t: torch.Tensor) -> tuple:
        strides = tuple(sorted(range(t.ndim), key=lambda d: (-t.stride(d), d)))
        return ("T", t.dtype, tuple(size(int(n)) for n in t.shape), strides, t.is_contiguous())

    def scalar(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return tensor(x)
        if isinstance(x, bool) or not isinstance(x, int):
            return arg_signature(x)
        return ("int", x, classes.get(x))  # literal, and which size it equals (if any)

    def walk(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(walk(e) for e in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, walk(v)) for k, v in sorted(x.items())))
        return scalar(x)

    for t in _dtensor.tensor_args(args, kwargs):  # classes numbered by the tensors first, then ints
        tensor(t)
    return walk(args), walk(kwargs)


def _derive_rules(op: Any, args: tuple, kwargs: dict, val: Any, kind: str) -> tuple[int, list] | None:
    try:
        if kind == "single_dim":
            n_out, rows = _dtensor.single_dim_rules(op, args, kwargs, val)
        else:
            combos = _dtensor.aligned_combos(args, kwargs) if op in _ALIGNED_RULES else None
            got = _dtensor.decomp_rules(op, args, kwargs, combos)
            if got is None:
                # own step: some decompositions (flatten/reshape of a non-contiguous input) take a copy
                # path DTensor cannot trace; placements are logical, so retry on contiguous inputs
                got = _dtensor.decomp_rules(op, *_contiguous((args, kwargs)), combos)
            if got is None and op is aten.scaled_dot_product_attention.default:
                got = _dtensor.sdpa_rules(args, kwargs)
            if got is None:
                return None
            n_out, rows = got
    except Exception as exc:  # noqa: BLE001 - a strategy that cannot be derived falls back to replication
        log.warning("deriving DTensor rules for %s failed (%s: %s)", op, type(exc).__name__, exc)
        return None
    kept = [r for r in rows if all(p is None or _allowed(p) for p in r)]
    return n_out, kept


def _contiguous(value: Any) -> Any:
    def one(x: Any) -> Any:
        return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x

    return tree_map(one, value)


def _allowed(p: Placement) -> bool:
    """Placements the planner keeps: plain Shard, Replicate, Partial(sum|avg) (exact classes)."""
    if type(p) is Shard or type(p) is Replicate:
        return True
    return type(p) is Partial and p.reduce_op in PARTIAL_OPS


def _expand(n_out: int, rows: list[tuple], mesh: MeshSpec) -> Iterable[tuple[tuple, tuple]]:
    """Single-axis rules -> full-mesh options: one rule per mesh axis (DTensor's cartesian expansion)."""
    for combo in product(rows, repeat=mesh.ndim):
        specs = [None if combo[0][i] is None else tuple(r[i] for r in combo) for i in range(len(combo[0]))]
        yield tuple(specs[:n_out]), tuple(specs[n_out:])


def _all_r(mesh: MeshSpec) -> Spec:
    return (Replicate(),) * mesh.ndim


def _spec_ok(spec: Spec, shape: tuple[int, ...], mesh: MeshSpec) -> bool:
    if any(p is None or not _allowed(p) for p in spec):
        return False
    if len({p.reduce_op for p in spec if type(p) is Partial}) > 1:
        return False  # P(sum) on one axis and P(avg) on another: legal in DTensor, never needed here
    if not trivial_axis_ok(spec, mesh):
        return False  # S / P over a size-1 axis is Replicate; the all-R row stands for it
    return is_even(shape, spec, mesh)


def _to_option(
    outs: tuple, ins: tuple, alias: tuple[int, ...], n_inputs: int, in_shapes: tuple, out_shapes: tuple,
    mesh: MeshSpec,
) -> ShardingOption | None:
    """Filter one raw option and align its inputs with `node.all_input_nodes`; None when filtered out."""
    if len(outs) != len(out_shapes):
        if len(out_shapes) == 1 and len(outs) > 1:
            outs = outs[:1]  # e.g. native ops with auxiliary outputs the node does not return
        else:
            return None
    out_specs: list[Spec | None] = []
    for spec, shape in zip(outs, out_shapes, strict=True):
        if shape is None or spec is None:
            out_specs.append(None)
            continue
        spec = normalize_spec(spec, len(shape))
        if not _spec_ok(spec, shape, mesh):
            return None
        out_specs.append(spec)
    aligned: list[Spec | None] = [None] * n_inputs
    for pos, (spec, shape) in enumerate(zip(ins, in_shapes, strict=True)):
        if spec is None:
            continue
        spec = normalize_spec(spec, len(shape))
        if not _spec_ok(spec, shape, mesh):
            return None
        slot = alias[pos]
        if aligned[slot] is not None and aligned[slot] != spec:
            return None  # the same node used twice would have to arrive in two placements
        aligned[slot] = spec
    return ShardingOption(output=tuple(out_specs), inputs=tuple(aligned))


def _placement_key(p: Placement | None) -> tuple[int, int]:
    if p is None:
        return (-1, 0)
    if type(p) is Replicate:
        return (0, 0)
    if type(p) is Shard:
        return (1, p.dim)
    return (2, PARTIAL_OPS.index(p.reduce_op))


def _order_key(opt: ShardingOption) -> tuple:
    def spec_key(s: Spec | None) -> tuple:
        return ((-2, 0),) if s is None else tuple(_placement_key(p) for p in s)

    return (tuple(spec_key(s) for s in opt.output), tuple(spec_key(s) for s in opt.inputs))


def clear_option_cache() -> None:
    """Forget every cached enumeration (tests; or after monkeypatching DTensor's registry)."""
    _OPTIONS.clear()
    _RULES.clear()
    _cached_specs.cache_clear()


def option_cache_info() -> dict[str, int]:
    """Number of cached node enumerations and of cached single-axis rule sets."""
    return {"options": len(_OPTIONS), "rules": len(_RULES)}
