"""The one place autoshard touches DTensor's private sharding-propagation and redistribution APIs.

Tested with torch 2.13.x (the `torch>=2.13` floor in pyproject). The private names used here
(`torch.distributed.tensor._op_schema`, `_ops.single_dim_strategy`, `_decompositions`, `_redistribute`,
the propagator on `DTensor._op_dispatcher`) move between releases; when torch is upgraded, this module
is what to fix, and `tests/test_strategies*.py` say whether the rest still holds.

Why private APIs at all: DTensor's strategy registry is the most complete, most tested statement of
which shardings of which aten op are correct, and its redistribution planner defines which collectives
a placement change costs. Re-deriving either by hand would drift from what the runtime (DTensor)
actually does.

Three ways to read a strategy, the order DTensor's propagator checks them in:
1. single-dim rules (`op_single_dim_strategy_funcs`): the rules for ONE mesh axis; the caller expands
   them over the mesh axes;
2. op-strategy functions (`op_strategy_funcs`): called with every candidate input placement (many
   "follow the input" strategies emit one option per candidate);
3. the decomposition fallback (`DecompShardingStrategy`), for composites such as aten.linear: the op's
   decomposition is traced on meta tensors over a size-1 fake mesh once per candidate single-axis input
   placement, which again gives single-axis rules.

Nothing here needs a process group: meshes are built with `_init_backend=False, _rank=0`, which only
records the layout. So enumeration works for any mesh size with no process group, and also inside a
torchrun job whose real (e.g. gloo, world size 4) group differs from the planned mesh.
Redistribution costs, which the strategy functions compute as a side product, are kept cheap rather
than patched out: rules are read with a single all-Replicate candidate per input (DTensor short-cuts the
cost of leaving a replicated tensor to 0), single-input op-strategy functions are called once per
candidate (one cost entry each), and only multi-input ones such as cat get every candidate at once.
The planner prices with its own hardware model; DTensor's costs are ignored.
"""

from __future__ import annotations

import contextlib

import functools
import itertools
import math
from collections.abc import Iterator, Callable, Sequence
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._decompositions import DecompShardingStrategy
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import (
    OpSchema,
    OpSpec,
    OpStrategy,
    RuntimeSchemaInfo,
    TupleStrategy,
)
from torch.distributed.tensor._ops.single_dim_strategy import (
    _fill_single_dim_strategy_placeholders,
    _insert_single_dim_replication_strategy,
)
from torch.distributed.tensor._redistribute import _gen_transform_infos
from torch.distributed.tensor.placement_types import Placement
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = [
    "NoStrategy",
    "Row",
    "decomp_rules",
    "device_mesh",
    "greedy_redistribution",
    "op_strategy_options",
    "single_dim_rules",
    "strategy_kind",
    "tensor_args",
    "transform_steps",
]

TESTED_TORCH = (2, 13)


class NoStrategy(Exception):
    """DTensor's strategy code gave no option for an op on any of the input placements tried."""

# One single-mesh-axis rule: placements of [outputs..., tensor inputs...]; None for non-tensor outputs.
Row = tuple[Placement | None, ...]
# One full-mesh option from an op-strategy function: (output specs, input specs), each spec a tuple of
# placements per mesh axis (None where the op has no tensor there).
FullOption = tuple[tuple[tuple[Placement, ...] | None, ...], tuple[tuple[Placement, ...], ...]]


def _propagator() -> Any:
    return DTensor._op_dispatcher.sharding_propagator


@contextlib.contextmanager
def outside_local_tensor_mode() -> Iterator[None]:
    """Planning is pure computation on a process-group-free mesh of any size. Under a simulated world
    (torch.distributed._local_tensor.LocalTensorMode, used by the tests) DTensor would ask that mesh for
    this rank's coordinate, which a mesh smaller than the world does not have: step out of the mode."""
    from torch.distributed._local_tensor import enabled_local_tensor_mode

    mode = enabled_local_tensor_mode()
    if mode is None:
        yield
        return
    with mode.disable():
        yield


def reset_caches() -> None:
    """Forget DTensor's cached sharding decisions and redistribution plans. They are keyed by mesh
    layout, and hold the mesh objects (with their process-group names) they were made with: after a
    process group is destroyed and another initialised in the same process (test suites do this), an
    identical layout would otherwise reuse a mesh whose groups no longer exist.

    DeviceMesh equality and hash are by layout (ranks, shape, dim names), not by process-group names,
    so a cache hit from an earlier world returns that world's mesh. Besides the Python caches, DTensor's
    dispatch has a C++ fast-path sharding-propagation cache (torch._C._clear_DTensor_sharding_propagator_cache,
    what torch.distributed.tensor.debug._clear_fast_path_sharding_prop_cache calls): a hit there gives an
    op's output a spec on the old mesh, and the next redistribution of that output names a group of the
    old world ("Could not resolve the process group registered under the name 5"). It only shows when
    the old world's group names are not also names in the new one, which depends on how many groups
    each world created, hence on test order."""
    from torch.distributed.tensor import _redistribute

    propagator = _propagator()
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()
    _redistribute._gen_transform_infos.cache_clear()
    getattr(_redistribute, "_planner_cache", {}).clear()
    from autoshard.runtime import module

    module.MESHES.clear()


@functools.cache
def device_mesh(sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """A layout-only CPU DeviceMesh over ranks 0..n-1: no process group is created or consulted.

    `_rank=0` places this process at coordinate (0, ..., 0), which is what DTensor's cost short-cuts
    expect (a mesh without the current rank prices everything at 0). The real world size is irrelevant.
    """
    ranks = torch.arange(math.prod(sizes), dtype=torch.int).reshape(sizes)
    return DeviceMesh("cpu", ranks, mesh_dim_names=names, _init_backend=False, _rank=0)


def strategy_kind(op: object) -> str:
    """Which registration DTensor's propagator would use: single_dim, op_strategy, decomp or none."""
    if not isinstance(op, torch._ops.OpOverload):
        return "none"
    prop = _propagator()
    if op in prop.op_single_dim_strategy_funcs:  # checked first by the propagator
        return "single_dim"
    if op in prop.op_strategy_funcs:
        return "op_strategy"
    if DecompShardingStrategy.has_decomp(op):
        return "decomp"
    return "none"


def _tmeta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(shape=t.shape, stride=t.stride(), dtype=t.dtype)


def _is_tensor_list(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, torch.Tensor) for e in x)


def _wrap(args: Sequence[Any], kwargs: dict[str, Any], leaf: Callable[[torch.Tensor], Any]) -> tuple:
    """Replace tensors (and tensor lists, as TupleStrategy when `leaf` builds OpStrategy) in args."""

    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return leaf(x)
        if _is_tensor_list(x):
            items = [leaf(e) for e in x]
            if items and isinstance(items[0], OpStrategy):
                return TupleStrategy(items)
            return type(x)(items)
        return x

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def tensor_args(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Tensor inputs in DTensor's order: positional args then kwargs, tensor lists flattened."""
    out: list[torch.Tensor] = []
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif _is_tensor_list(x):
            out.extend(x)
    return out


def _out_meta(out: Any) -> TensorMeta | tuple[TensorMeta | None, ...] | None:
    if isinstance(out, torch.Tensor):
        return _tmeta(out)
    if isinstance(out, (list, tuple)):
        return tuple(_tmeta(o) if isinstance(o, torch.Tensor) else None for o in out)
    return None


def _schema_info(op: torch._ops.OpOverload, args: Sequence[Any]) -> RuntimeSchemaInfo | None:
    prop = _propagator()
    info = prop.op_to_schema_info.get(op) or prop.op_to_schema_info_for_single_dim_strategy.get(op)
    if info is None and any(_is_tensor_list(a) for a in args):
        # inferred schema infos lack needs_pytree for tensor-list args (e.g. aten.einsum); say it here
        # rather than mutating the propagator's table
        info = RuntimeSchemaInfo(needs_pytree=True)
    return info


def single_dim_rules(
    op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], out: Any
) -> tuple[int, list[Row]]:
    """(number of outputs, single-axis rules) of an op with a registered single-dim strategy.

    `args`/`kwargs` hold (meta) tensors in schema order, `out` the op's output value(s). The implicit
    all-Replicate rule is inserted and shard placeholders become plain `Shard`, as the propagator does
    for inputs that carry no `_StridedShard`.
    """
    mesh = device_mesh((1,), ("_",))
    s_args, s_kwargs = _wrap(args, kwargs, lambda t: OpStrategy([OpSpec(_r_spec(mesh, t))]))
    schema = OpSchema(op, s_args, s_kwargs, schema_info=_schema_info(op, args))
    out_meta = _out_meta(out)
    info = _propagator().op_single_dim_strategy_funcs[op]
    rules = info.func(op, schema.args_meta, schema.kwargs_meta)
    n_in = len(tensor_args(args, kwargs))
    if rules:
        n_out = len(rules[0]) - n_in
    else:
        n_out = 1 if isinstance(out_meta, TensorMeta) else len(out_meta or ())
    rules = _insert_single_dim_replication_strategy(list(rules), n_out, n_in, out_meta)
    rules = _fill_single_dim_strategy_placeholders({Shard(0)}, rules)
    return n_out, [tuple(r) for r in rules]


def _r_spec(mesh: DeviceMesh, t: torch.Tensor, placements: Sequence[Placement] | None = None) -> DTensorSpec:
    pl = tuple(placements) if placements is not None else (Replicate(),) * mesh.ndim
    return DTensorSpec(mesh, pl, tensor_meta=_tmeta(t))


def decomp_rules(
    op: torch._ops.OpOverload,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    combos: Sequence[tuple[Placement, ...]] | None = None,
) -> tuple[int, list[Row]] | None:
    """Single-axis rules of a composite op from DTensor's decomposition fallback, or None if it fails.

    Mirrors `DecompShardingStrategy.propagate_strategy`, with one change: the candidates per input are
    always {R, S(every dim), P(sum), P(avg)} instead of the placements seen on the runtime inputs, so the
    result does not depend on what the producers happen to hold (DTensor seeds from its inputs).
    `combos` (one placement per tensor input) replaces the product of those candidates when the op's
    structure says which combinations can hold (`aligned_combos`): each is still traced through the
    decomposition, so every rule returned is DTensor's own.
    """
    prop = _propagator()
    decomp = prop.decomp_strategy
    mesh = device_mesh((1,), ("_",))
    s_args, s_kwargs = _wrap(args, kwargs, lambda t: _r_spec(mesh, t))
    schema = OpSchema(op, s_args, s_kwargs, schema_info=_schema_info(op, args))
    tensors = tensor_args(args, kwargs)
    cands = [
        [Replicate(), *(Shard(d) for d in range(t.ndim)), Partial("sum"), Partial("avg")] for t in tensors
    ]
    # `_propagate_through_decomp` consumes one placement per pytree leaf of args then kwargs
    leaves = [*tree_leaves(schema.args_schema), *tree_leaves(schema.kwargs_schema)]
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, DTensorSpec)]
    rules: list[Row] = []
    n_out = 0
    for combo in itertools.product(*cands) if combos is None else combos:
        per_leaf: list[Placement | None] = [None] * len(leaves)
        for i, p in zip(slots, combo, strict=True):
            per_leaf[i] = p
        try:
            out = decomp._propagate_through_decomp(schema, tuple(per_leaf), mesh)
        except NotImplementedError:
            if all(type(p) is Replicate for p in combo):
                # replicated inputs fail only where an op of the decomposition has no strategy at all
                # (prims.where; a factory op such as aten.empty inside batch_norm): every placement
                # traces the same ops, so none can succeed (DTensor gives up on the op here too)
                return None
            continue  # an op inside has no strategy for this input, e.g. a factory op
        except (
            GuardOnDataDependentSymNode,
            RuntimeError,  # the trace needed a redistribution, or a view op rejected the placement
            KeyError,
            IndexError,
            AssertionError,
            ValueError,
            TypeError,
        ):
            continue  # DTensor's loop gives up on the whole op for the first two; we skip the candidate
        outs = out if isinstance(out, tuple) else (out,)
        n_out = len(outs)
        rules.append((*outs, *combo))
    return (n_out, rules) if rules else None


def op_strategy_options(
    op: torch._ops.OpOverload,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    mesh: DeviceMesh,
    candidates: Sequence[Sequence[tuple[Placement, ...]]],
) -> list[FullOption]:
    """Full-mesh options of an op with a registered op-strategy function.

    `candidates[i]` lists the placements input i may arrive in (one per producer option). Ops with one
    tensor input are called once per candidate, each time with that single candidate: follow-the-input
    strategies then emit exactly the option for it, `input_specs=None` ("the input is the output
    placement") is unambiguous, and the cost side product is one cheap entry. Ops with several tensor
    inputs (cat, stack, ...) get all candidates at once.
    """
    tensors = tensor_args(args, kwargs)
    func = _propagator().op_strategy_funcs[op]
    info = _schema_info(op, args)
    if len(tensors) == 1:
        calls = [[[c]] for c in candidates[0]]
    else:
        calls = [[list(c) for c in candidates]]
    results: list[FullOption] = []
    failures: list[BaseException] = []
    for call in calls:
        try:
            results += _call_op_strategy(op, func, info, args, kwargs, tensors, mesh, call)
        except Exception as exc:  # noqa: BLE001 - private strategy code: any failure means "no option"
            # DTensor refuses this input placement (RuntimeError for an uneven unflatten, KeyError from
            # the view/expand strategy on a size-1 dim, ...): the candidate has no option
            failures.append(exc)
    if not results and len(tensors) > 1:
        # DTensor refused the candidates together: the all-Replicate call alone, which always exists
        replicated = [[tuple(Replicate() for _ in range(mesh.ndim))] for _ in candidates]
        try:
            results = _call_op_strategy(op, func, info, args, kwargs, tensors, mesh, replicated)
        except Exception as exc:  # noqa: BLE001 - as above
            failures.append(exc)
    if not results and failures:
        last = failures[-1]
        raise NoStrategy(
            f"DTensor's strategy for {op} refused every input placement offered "
            f"({len(failures)} tried; last: {type(last).__name__}: {last})"
        ) from last
    return results


def _call_op_strategy(
    op: torch._ops.OpOverload,
    func: Callable[..., Any],
    info: RuntimeSchemaInfo | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    tensors: list[torch.Tensor],
    mesh: DeviceMesh,
    call: list[list[tuple[Placement, ...]]],
) -> list[FullOption]:
    """One call of an op-strategy function with `call[i]` as the candidate placements of tensor i."""
    by_id = {id(t): cs for t, cs in zip(tensors, call, strict=True)}

    def leaf(t: torch.Tensor) -> OpStrategy:
        return OpStrategy([OpSpec(_r_spec(mesh, t, pl)) for pl in by_id[id(t)]])

    s_args, s_kwargs = _wrap(args, kwargs, leaf)
    strat = func(OpSchema(op, s_args, s_kwargs, schema_info=info))
    if not isinstance(strat, OpStrategy):
        raise NotImplementedError(f"{op}: op strategy returned {type(strat).__name__}")
    results: list[FullOption] = []
    for spec in strat.strategies:
        outs = spec.output_specs
        out_t = tuple(o.placements if o is not None else None for o in outs) if isinstance(
            outs, (tuple, list)
        ) else (outs.placements,)
        if spec.input_specs is None:
            ins = tuple(out_t[0] for _ in tensors)  # "inputs follow the output" convention
        else:
            ins = tuple(s.placements for s in spec.input_specs)
        results.append((out_t, ins))
    return results


def transform_steps(
    src: tuple[Placement, ...],
    dst: tuple[Placement, ...],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    sizes: tuple[int, ...],
    names: tuple[str, ...],
) -> list[tuple[int, Placement, Placement, tuple[int, ...]]]:
    """DTensor's redistribution plan src -> dst: (mesh dim, from, to, logical shape on that dim) steps.

    The logical shape is the tensor's shape as seen on that mesh dim at that step, i.e. with the
    shardings on the other mesh dims applied but not this one.
    """
    mesh = device_mesh(sizes, names)
    meta = TensorMeta(shape=torch.Size(shape), stride=_contiguous_stride(shape), dtype=dtype)
    infos = _gen_transform_infos(DTensorSpec(mesh, src, tensor_meta=meta), DTensorSpec(mesh, dst, tensor_meta=meta))
    return [(i.mesh_dim, *i.src_dst_placements, tuple(int(s) for s in i.logical_shape)) for i in infos]


def greedy_redistribution() -> bool:
    """Whether DTensor plans a redistribution of plain placements greedily (its default), not by the
    shape-aware min-cost search that `_redistribute._FORCE_MIN_COST_REDISTRIBUTION_PLAN` switches on."""
    from torch.distributed.tensor import _redistribute

    return not getattr(_redistribute, "_FORCE_MIN_COST_REDISTRIBUTION_PLAN", None)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def meta_like(value: Any) -> Any:
    """Tensors in a (nested) value as meta tensors of the same shape, stride and dtype."""

    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        return x

    return tree_map(one, value)


def aligned_combos(args: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[Placement, ...]]:
    """Input placements where every tensor input is Replicate or one common placement: Shard(d) of the
    first input's dim d (dims aligned from the right, as broadcasting aligns them; an input whose aligned
    dim is missing or of size 1 can only be Replicate), Partial(sum) or Partial(avg).

    For attention (q, k, v, mask) every rule DTensor's decomposition admits is of this form: batch or
    heads split everywhere, the query's sequence split with its mask rows, v's features or a Partial v
    alone. tests/test_strategies.py checks the rules it yields equal the full product's for masked,
    broadcast-mask and cross attention; the product costs ~7^4 traces (4 s), this ~100.
    """
    tensors = tensor_args(args, kwargs)
    rank = tensors[0].ndim
    families: list[Callable[[torch.Tensor], Placement | None]] = [
        lambda t, p=p: p for p in (Partial("sum"), Partial("avg"))
    ]
    for d in range(rank):

        def shard(t: torch.Tensor, d: int = d) -> Placement | None:
            own = d - (rank - t.ndim)
            return Shard(own) if 0 <= own < t.ndim and t.shape[own] != 1 else None

        families.append(shard)
    seen: dict[tuple[Placement, ...], None] = {tuple(Replicate() for _ in tensors): None}
    for family in families:
        choices = [[Replicate()] + ([p] if (p := family(t)) is not None else []) for t in tensors]
        for combo in itertools.product(*choices):
            seen.setdefault(tuple(combo), None)
    return list(seen)


def sdpa_rules(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, list[Row]] | None:
    """Single-axis rules for aten.scaled_dot_product_attention when its decomposition cannot be traced.

    With is_causal=True the CIA decomposition builds its mask with `torch.ones`, which DTensor's
    decomposition tracer rejects (a factory op has no input spec). DTensor registers rules for the
    fused kernels the op dispatches to on GPU; their base rules (replicate, shard heads, shard batch)
    hold for the math path too, as long as there is no attention mask to shard alongside.
    """
    from torch.distributed.tensor._ops._matrix_ops import (
        _scaled_dot_product_flash_attention_base_strategies,
    )

    q = args[0]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if mask is not None or not isinstance(q, torch.Tensor) or q.ndim != 4:
        return None
    mesh = device_mesh((1,), ("_",))
    qkv = tuple(OpStrategy([OpSpec(_r_spec(mesh, t))]) for t in args[:3])
    schema = OpSchema(torch.ops.aten._scaled_dot_product_flash_attention.default, (*qkv, 0.0, False, False), {})
    rows = _scaled_dot_product_flash_attention_base_strategies(schema)
    return 1, [(r[0], *r[-3:]) for r in rows]  # keep the attention output; drop logsumexp, rng state, ...
