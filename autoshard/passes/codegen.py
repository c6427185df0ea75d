"""Codegen: the exported graph rewritten so that it runs the plan on DTensors.

DTensor alone would run the captured graph correctly but choose its own placements op by op; the plan
would then be a suggestion. Codegen makes the plan explicit and readable instead: wherever a consumer's
planned input placement differs from its producer's planned output placement, a `redistribute` node is
inserted before the consumer, carrying a comment with the collectives the plan priced for that edge
(`# all_reduce over tp, 32.0 MiB`). With every input arriving as planned, DTensor's propagation has a
zero-cost strategy for each op and takes it, so the placements DTensor runs are the planned ones.

Other rewrites, each needed because the graph was captured on meta tensors for one device:
- `autoshard.shard` hint nodes are identities and are dropped;
- `aten._assert_tensor_metadata` checks name the capture device (meta) and are dropped;
- factory ops (`arange`, ...) get the runtime's device and their plain output becomes a DTensor with its
  planned placement (DTensor refuses to mix plain tensors and DTensors);
- scaled_dot_product_attention runs on local shards (DTensor's CPU path mixes in a plain mask tensor);
- an op DTensor has no rule for (strategies/options.runs_locally_replicated; the plan holds it fully
  replicated) runs on the local replicated tensors through `run_replicated`;
- no op relies on a stride that the eager run happened to have: `aten.view` (and `_unsafe_view`) become
  `aten.reshape`, the same values, copying only where a view is impossible. Export can drop a
  `.contiguous()` whose input was already contiguous on the capture device (nanoGPT's
  `y.transpose(1, 2).contiguous().view(B, T, C)` after SDPA), and local-shard attention returns another
  layout at run time;
- a chunk of a `_StridedShard(d, k)` tensor (fused qkv, see strategies/fused_split.py) is done locally:
  DTensor has no rule for it and would all-gather;
- blocks planned with recomputation (`plan.training.recompute`) outlined into submodules called through
  `checkpoint_block` (passes/recompute.py);
- `grad_to` on an activation edge whose planned gradient reduction DTensor would otherwise defer (it
  keeps a gradient Partial until something forces it, then reduces a different tensor).

The graph takes the lifted parameters, buffers and constants as placeholders (the order of
`ExportedProgram.graph_signature.input_specs`), so the runtime passes DTensor parameters as inputs.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_leaves, tree_map

from autoshard.errors import InputError
from autoshard.hints.ops import SHARD_OP
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan, PlannedCollective
from autoshard.passes.recompute import block_modes, outline_blocks
from autoshard.report.table import format_count
from autoshard.strategies.executable import unexecutable_reason
from autoshard.strategies.options import runs_locally_replicated
from autoshard.strategies.mesh import Spec, spec_from_str, spec_str

__all__ = [
    "EdgeRedistribution",
    "as_dtensor",
    "codegen",
    "contiguous_strides",
    "dropout",
    "evaluating",
    "grad_to",
    "local_attention",
    "local_chunk",
    "redistribute",
    "run_replicated",
    "use_mesh",
]

_ASSERT_META = torch.ops.aten._assert_tensor_metadata.default
_CHUNK = torch.ops.aten.chunk.default
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
# views whose kernel needs viewable strides; reshape gives the same values on any layout
_STRIDE_BOUND_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
_RESHAPE = torch.ops.aten.reshape.default



class _Setting:
    """A value the generated functions read while a graph runs, set for a `with` block.

    A plain attribute rather than a `contextvars.ContextVar`: torch.compile cannot trace
    `ContextVar.get` and would break the graph at every factory op and dropout."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    @contextlib.contextmanager
    def set_to(self, value: Any) -> Iterator[None]:
        old, self.value = self.value, value
        try:
            yield
        finally:
            self.value = old


_MESH = _Setting(None)
_EVALUATING = _Setting(False)
_DROPOUT = torch.ops.aten.dropout.default


@contextlib.contextmanager
def use_mesh(mesh: Any) -> Iterator[None]:
    """Make `mesh` the one `as_dtensor` places factory outputs on while a generated graph runs."""
    with _MESH.set_to(mesh):
        yield


@lru_cache(maxsize=None)
def _spec(text: str) -> Spec:
    return spec_from_str(text)


# ---- the functions the generated graph calls (kept tiny: they are what the printed code shows) -------


@torch.fx.wrap
def redistribute(x: DTensor, placements: str) -> DTensor:
    """`x` moved to `placements` (a spec string such as "(S(0), R)") with DTensor's collectives. DTensor
    has no path into a Partial from a Shard or another Partial kind: those axes go through Replicate
    first, as the solver prices them (solver/pricing.py)."""
    dst = _spec(placements)
    if any(d.is_partial() and s != d for s, d in zip(x.placements, dst, strict=True)):
        via = tuple(Replicate() if d.is_partial() and s != d else s for s, d in zip(x.placements, dst, strict=True))
        x = _ReplicateToPartial.apply(x.redistribute(x.device_mesh, via), dst)
    return x.redistribute(x.device_mesh, dst)


class _ReplicateToPartial(torch.autograd.Function):
    """Replicate -> Partial on the axes where `dst` is Partial, which DTensor's public redistribute
    refuses: the value stays on coordinate 0 of each such axis and the other ranks hold zeros (a sum
    that is exactly the value). Backward: the output's gradient, whatever its placement, made
    Replicate on those axes (the gradient of a replicated tensor)."""

    @staticmethod
    def forward(ctx: Any, x: DTensor, dst: Spec) -> DTensor:  # noqa: D102
        mesh, axes = x.device_mesh, [i for i, d in enumerate(dst) if d.is_partial() and x.placements[i] != d]
        ctx.source, ctx.mesh = x.placements, mesh
        local = x.to_local()
        if any(mesh.get_local_rank(i) != 0 for i in axes):
            local = torch.zeros_like(local)
        placements = tuple(dst[i] if i in axes else p for i, p in enumerate(x.placements))
        return DTensor.from_local(local, mesh, placements, run_check=False)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> tuple[DTensor, None]:  # noqa: D102
        return grad.redistribute(ctx.mesh, ctx.source), None


class _GradTo(torch.autograd.Function):
    """Identity forward; backward brings the gradient to `placements` (a reduction DTensor would defer)."""

    @staticmethod
    def forward(ctx: Any, x: DTensor, placements: str) -> DTensor:  # type: ignore[override]
        ctx.placements = placements
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> tuple[Any, None]:  # type: ignore[override]
        spec = _spec(ctx.placements)
        if isinstance(grad, DTensor) and tuple(grad.placements) != spec:
            grad = grad.redistribute(grad.device_mesh, spec)
        return grad, None


@torch.fx.wrap
def grad_to(x: DTensor, placements: str) -> DTensor:
    """`x` unchanged; its gradient is brought to `placements` where it flows back through this edge.

    DTensor's autograd keeps a gradient Partial as long as the ops allow and reduces it only where a
    forward redistribution's backward (or the gradient fix-up after backward) forces it, so where the
    plan reduces the gradient of an activation early (a replicated position embedding added to a
    batch-sharded stream: all-reduce T x C, not the V x C table gradient later) DTensor would reduce a
    different, often bigger, tensor. This node makes the planned reduction happen where planned.
    """
    if not isinstance(x, DTensor) or not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _GradTo.apply(x, placements)


@torch.fx.wrap
def write_back(target: DTensor, moved: DTensor) -> DTensor:
    """Copy `moved` into `target` at `target`'s placements; returns `target`.

    The plan moved `target` (with `redistribute`) before an in-place op, which wrote into the moved
    copy; eager would have written into `target` itself (T5's `shifted[:, 1:] = labels[:, :-1]` fills a
    slice of a new tensor). This writes the result back, so every later reader of `target`, or of the
    tensor it is a view of, sees the write.
    """
    placements = tuple(target.placements)
    target.copy_(moved if tuple(moved.placements) == placements else moved.redistribute(target.device_mesh, placements))
    return target


@torch.fx.wrap
def as_dtensor(x: torch.Tensor, placements: str) -> DTensor:
    """A factory op's plain output (the same on every rank) as a DTensor with its planned placement."""
    mesh = _MESH.value
    if mesh is None:
        raise InputError(
            "expected a device mesh while running generated code, found none; "
            "run the graph through CompiledModel or inside `autoshard.passes.use_mesh(mesh)`"
        )
    spec = _spec(placements)
    if all(isinstance(p, Replicate) for p in spec):
        return DTensor.from_local(x, mesh, spec, run_check=False)
    return distribute_tensor(x, mesh, spec, src_data_rank=None)  # every rank holds x: slice locally


@contextlib.contextmanager
def evaluating(on: bool = True) -> Iterator[None]:
    """Run generated code as the model runs in `model.eval()`: its dropouts pass their input through."""
    with _EVALUATING.set_to(on):
        yield


@torch.fx.wrap
def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """`aten.dropout` in generated code: as captured (training mode), except inside `evaluating()`, where
    it is the identity, as `nn.Dropout` and `F.dropout(training=self.training)` are in eval mode. The
    output keeps the input's placement either way (dropout is elementwise)."""
    if train and not _EVALUATING.value:
        return _DROPOUT(x, p, train)
    return x


@torch.fx.wrap
def local_chunk(x: DTensor, chunks: int, dim: int, placements: str) -> tuple[DTensor, ...]:
    """chunk of a `_StridedShard(dim, chunks)` tensor: each rank's piece i is its shard of chunk i.

    `_StridedShard(d, k)` lays each of the k chunks out sharded across its axis, so the local tensor
    is k local pieces side by side; cutting it gives every chunk as a plain `Shard(d)` with no
    communication (DTensor itself would gather first). `to_local`/`from_local` carry autograd.
    """
    spec = _spec(placements)
    pieces = x.to_local().chunk(chunks, dim % x.ndim)
    # global shape and stride derived from each piece's real (strided) layout, not claimed contiguous
    return tuple(DTensor.from_local(p, x.device_mesh, spec, run_check=False) for p in pieces)


@torch.fx.wrap
def local_attention(q: DTensor, k: DTensor, v: DTensor, *args: Any, **kwargs: Any) -> DTensor:
    """scaled_dot_product_attention computed on the local shards.

    On CPU, DTensor runs SDPA through its math decomposition, which builds the causal mask as a plain
    tensor and then refuses to add it to a DTensor. Attention is independent per batch element and per
    head, so when q, k and v share one placement that is replicated or sharded on batch (dim 0) or
    heads (dim 1), each rank's local attention is its shard of the result. Any other layout (and a
    DTensor mask) is replicated first: correct, though it gathers.
    """
    spec = tuple(q.placements)
    local = all(tuple(t.placements) == spec for t in (k, v)) and all(
        isinstance(p, Replicate) or (type(p) is Shard and p.dim in (0, 1)) for p in spec
    )
    if not local or any(isinstance(a, DTensor) for a in (*args, *kwargs.values())):
        spec = tuple(Replicate() for _ in spec)
        q, k, v = (t.redistribute(t.device_mesh, spec) for t in (q, k, v))
        args = tuple(a.full_tensor() if isinstance(a, DTensor) else a for a in args)
        kwargs = {n: a.full_tensor() if isinstance(a, DTensor) else a for n, a in kwargs.items()}
    out = torch.ops.aten.scaled_dot_product_attention.default(q.to_local(), k.to_local(), v.to_local(), *args, **kwargs)
    # no shape/stride given: DTensor derives the global ones from the local output's real layout (the
    # local kernel's layout is its own, not the one the capture recorded; claiming contiguous would lie)
    return DTensor.from_local(out, q.device_mesh, spec, run_check=False)


@torch.fx.wrap
def run_replicated(op: Any, *args: Any, **kwargs: Any) -> Any:
    """`op` on the local values of replicated DTensors, its tensor results as replicated DTensors.

    For ops DTensor has no sharding rule for (strategies/options.runs_locally_replicated): the plan
    holds their inputs and outputs replicated, so every rank computes the whole result from the same
    values. `to_local` / `from_local` carry autograd (the gradient comes back replicated).
    """
    meshes = [a.device_mesh for a in tree_leaves((args, kwargs)) if isinstance(a, DTensor)]
    mesh = meshes[0] if meshes else _MESH.value
    if mesh is None:
        raise InputError(f"expected a device mesh to run {op} replicated, found no DTensor input and no mesh set")

    def local(x: Any) -> Any:
        if not isinstance(x, DTensor):
            return x
        if not all(isinstance(p, Replicate) for p in x.placements):
            raise InputError(
                f"expected the inputs of {op} (no DTensor rule, run replicated) to be replicated, found "
                f"{spec_str(tuple(x.placements))}; the plan must hold them replicated"
            )
        return x.to_local()

    out = op(*tree_map(local, args), **tree_map(local, kwargs))
    replicated = (Replicate(),) * mesh.ndim
    return tree_map(
        lambda t: DTensor.from_local(t, mesh, replicated, run_check=False) if isinstance(t, torch.Tensor) else t, out
    )


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of `shape`: the stride a DTensor built from local pieces gets (runtime/fsdp.py, runtime/stage.py)."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


# ---- the pass ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgeRedistribution:
    """One inserted `redistribute` node: which edge, from what to what, and the collectives priced."""

    node: str  # the inserted node's name
    src: str
    dst: str
    src_spec: str
    dst_spec: str
    collectives: tuple[str, ...]  # e.g. ("all_reduce over tp, 32.0 MiB",)


def codegen(ir: GraphIR, plan: Plan, *, device: str = "cpu") -> GraphModule:
    """A GraphModule running `plan` on DTensors: explicit redistributions, hints dropped, local chunks.

    The module's `meta["redistributions"]` lists every inserted node (`EdgeRedistribution`); its
    `.code` shows each with a comment naming its collectives.
    """
    if ir.exported is None:
        raise InputError(
            "expected a GraphIR that keeps its ExportedProgram, found one without (`exported` is None); "
            "capture the model with autoshard.capture"
        )
    plan.check_graph(ir)
    _check_executable(ir, plan)
    gm = copy.deepcopy(ir.exported.graph_module)
    graph = gm.graph
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional forward(params..., inputs...)
    decisions = {d.node: d for d in plan.nodes}
    param_spec = {n: plan.params[p.name] for p in ir.params if p.name in plan.params for n in p.nodes}
    comments: dict[str, str] = {}
    inserted: list[EdgeRedistribution] = []
    moved: dict[Node, tuple[Node, str]] = {}  # inserted redistribute node -> (its source, the source's spec)

    def produced(node: Node) -> str | None:
        if node.name in param_spec:
            return param_spec[node.name]
        d = decisions.get(node.name)
        return d.output[0] if d is not None and len(d.output) == 1 else None

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        d = decisions.get(node.name)
        if d is None:
            continue
        cache: dict[tuple[str, str], Node] = {}
        for src, want in zip(node.all_input_nodes, d.inputs, strict=False):
            have = produced(src)
            if want is None or have is None:
                continue
            want = _without_replicate_to_partial(have, want)
            if want == have:
                if src.name not in param_spec:
                    _force_planned_gradient(graph, node, src, have, plan, comments)
                continue
            key = (src.name, want)
            if key not in cache:
                with graph.inserting_before(node):
                    cache[key] = graph.call_function(redistribute, (src, want))
                cache[key].meta["val"] = src.meta.get("val")
                notes = _collective_notes(plan.collectives, src.name, node.name)
                comments[cache[key].name] = f"{have} -> {want}: " + ("; ".join(notes) or "local, no collective")
                inserted.append(
                    EdgeRedistribution(
                        node=cache[key].name, src=src.name, dst=node.name, src_spec=have, dst_spec=want,
                        collectives=tuple(notes),
                    )
                )
                moved[cache[key]] = (src, have)
            node.replace_input_with(src, cache[key])

    keep_views = _write_back_mutations(graph, moved, comments, inserted)
    _finish_outputs(graph, produced, comments, plan)
    _rewrite_special_nodes(graph, decisions, device, comments, keep_views)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    graph.lint()
    graph.on_generate_code(lambda previous: _commenter(graph, comments, previous))
    gm.recompile()
    if modes := block_modes(plan.training):
        outline_blocks(
            gm,
            modes,
            {n.name: n.module for n in ir.nodes},
            on_generate_code=lambda sub: sub.on_generate_code(lambda previous: _commenter(sub, comments, previous)),
        )
    gm.meta["redistributions"] = tuple(inserted)
    gm.meta["plan_mesh"] = dict(plan.mesh)
    return gm


def _write_back_mutations(
    graph: Graph, moved: dict[Node, tuple[Node, str]], comments: dict[str, str], inserted: list[EdgeRedistribution]
) -> set[Node]:
    """After each in-place op that writes into a moved copy, write the copy back where eager wrote.

    An in-place op mutates its argument and every tensor that argument is a view of. Where the plan
    redistributed the argument, or the base of a view chain leading to it, the op writes into the
    copy the redistribution made, and the tensor the rest of the program reads never sees the write
    (a silently lost write: T5's label shift under tp). Walking from the mutated argument back through
    views and redistributions, each redistribution passed gets a `write_back` right after the op,
    innermost first, so the write reaches the original storage. These write-backs are not priced by the
    planner (they are rare and small: a label shift, a mask fill); each one is listed with the
    redistributions and named in the generated code. Returns the views on such chains, which must stay
    views (the `view` -> `reshape` rewrite may copy).
    """
    keep_views: set[Node] = set()
    for node in list(graph.nodes):
        anchor = node
        for arg in _mutated_args(node):
            t: Any = arg
            chain: list[Node] = []
            while isinstance(t, Node):
                if t in moved:
                    chain.append(t)
                    t = moved[t][0]
                elif _is_view(t):
                    keep_views.add(t)
                    t = t.args[0]
                else:
                    break
            for copy_node in chain:
                target, have = moved[copy_node]
                if any(p.is_partial() for p in spec_from_str(have)):
                    raise InputError(
                        f"the plan moves {target.name} from {have} before the in-place {node.target} "
                        f"({node.name}), which writes into it; a write into a partial sum cannot be written "
                        "back exactly. Plan with another mesh, or write the model's update out of place"
                    )
                with graph.inserting_after(anchor):
                    anchor = graph.call_function(write_back, (target, copy_node))
                anchor.meta["val"] = target.meta.get("val")
                comments[anchor.name] = (
                    f"{node.name} wrote into {copy_node.name}, a moved copy of {target.name}: write it back at {have}"
                )
                inserted.append(
                    EdgeRedistribution(
                        node=anchor.name, src=copy_node.name, dst=target.name, src_spec=copy_node.args[1],
                        dst_spec=have, collectives=("write-back of an in-place op (not priced)",),
                    )
                )
    return keep_views


def _mutated_args(node: Node) -> list[Any]:
    """The arguments an in-place op writes into (none for a pure op)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, formal in enumerate(schema.arguments):
        if formal.alias_info is None or not formal.alias_info.is_write:
            continue
        arg = node.args[i] if i < len(node.args) else node.kwargs.get(formal.name)
        out.extend(a for a in tree_leaves(arg) if isinstance(a, Node))
    return out


def _is_view(node: Node) -> bool:
    """Does `node` return a view of its first argument (whose storage a write into it reaches)?"""
    if node.op != "call_function" or not node.args:
        return False
    if node.target is operator.getitem or node.target is grad_to:
        return isinstance(node.args[0], Node) and (node.target is grad_to or _is_view(node.args[0]))
    return bool(getattr(node.target, "is_view", False))


def _is_impure(node: Node) -> bool:
    """FX's impurity, and an in-place op run through `run_replicated` (its result may be unused: the
    mutation is the point, as in T5's `shifted[:, 0].fill_(start_token)`)."""
    if node.target is run_replicated:
        return node.args[0]._schema.is_mutable
    if node.target is write_back:
        return True
    return node.is_impure()


def _check_executable(ir: GraphIR, plan: Plan) -> None:
    """Refuse a plan holding an option DTensor's dispatch cannot run (the planner never offers one; a
    hand-edited or stale plan might)."""
    nodes = {n.name: n for n in ir.exported.graph_module.graph.nodes}
    for d in plan.nodes:
        node = nodes.get(d.node)
        if node is None or node.op != "call_function":
            continue
        specs = tuple(None if s is None else spec_from_str(s) for s in d.inputs)
        reason = unexecutable_reason(node.target, specs)
        if reason is not None:
            raise InputError(
                f"plan node {d.node} ({d.op}) takes inputs {list(d.inputs)}: {reason}; expected a plan the "
                "runtime can execute: plan again with this version of autoshard"
            )


def _force_planned_gradient(graph: Graph, node: Node, src: Node, have: str, plan: Plan, comments: dict[str, str]) -> None:
    """On an edge with no forward redistribution but planned backward collectives, insert `grad_to`
    so the gradient is reduced on this edge as planned. Parameter edges are left to the gradient
    fix-up after backward: DTensor accumulates a parameter's partial gradients from every use and
    reduces the sum once, which is cheaper than the planner's price for a parameter used twice (GPT's
    tied wte/lm_head: one reduction priced per use; see tests/test_runtime_comm.py)."""
    notes = [n for n in _collective_notes(plan.collectives, src.name, node.name) if n.startswith("backward")]
    if not notes:
        return
    target = spec_str(tuple(Replicate() if p.is_partial() else p for p in spec_from_str(have)))
    with graph.inserting_before(node):
        new = graph.call_function(grad_to, (src, target))
    new.meta["val"] = src.meta.get("val")
    comments[new.name] = f"gradient -> {target}: " + "; ".join(notes)
    node.replace_input_with(src, new)


def _finish_outputs(graph: Graph, produced: Any, comments: dict[str, str], plan: Plan) -> None:
    """Every graph output leaves replicated: the caller gets whole values (the loss, or logits)."""
    output = next(n for n in graph.nodes if n.op == "output")
    for src in list(output.all_input_nodes):
        have = produced(src)
        if have is None:
            continue
        want = plan.replicated_spec()
        if have == want:
            continue
        with graph.inserting_before(output):
            new = graph.call_function(redistribute, (src, want))
        new.meta["val"] = src.meta.get("val")
        notes = _collective_notes(plan.collectives, src.name, "output")
        comments[new.name] = f"{have} -> {want}: " + ("; ".join(notes) or "local, no collective")
        output.replace_input_with(src, new)


def _rewrite_special_nodes(
    graph: Graph, decisions: dict, device: str, comments: dict[str, str], keep_views: set[Node]
) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _ASSERT_META:
            graph.erase_node(node)
        elif node.target is SHARD_OP:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target is _SDPA:
            node.target = local_attention
        elif node.target is _DROPOUT:
            node.target = dropout
        elif node.target in _STRIDE_BOUND_VIEWS and node not in keep_views:
            node.target = _RESHAPE  # same values; no reliance on the eager run's strides
        elif runs_locally_replicated(node):
            comments[node.name] = f"no DTensor rule for {node.target}: runs on the local replicated tensors"
            node.args = (node.target, *node.args)
            node.target = run_replicated
        elif node.target is _CHUNK and _is_strided_chunk(decisions.get(node.name)):
            d = decisions[node.name]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = local_chunk
            node.args = (node.args[0], int(node.args[1]), int(dim), d.output[0])
            node.kwargs = {}
        elif not node.all_input_nodes and isinstance(node.meta.get("val"), torch.Tensor):
            if node.kwargs.get("device") is not None:
                node.kwargs = {**node.kwargs, "device": torch.device(device)}
            d = decisions.get(node.name)
            spec = d.output[0] if d is not None else None
            if spec is None:
                continue
            with graph.inserting_after(node):
                wrapped = graph.call_function(as_dtensor, (node, spec))
            wrapped.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(wrapped, delete_user_cb=lambda user: user is not wrapped)


def _without_replicate_to_partial(have: str, want: str) -> str:
    """`want` with each axis that goes R -> P kept R.

    R -> P is local (no collective) and DTensor refuses it as a user redistribution ("for internal use
    only"), but its ops take a replicated operand where the plan has a partial one (a row-parallel
    linear's bias is added to the partial product this way), so leaving those axes R runs the plan.
    """
    src, dst = spec_from_str(have), spec_from_str(want)
    if len(src) != len(dst):
        return want
    kept = tuple(s if isinstance(s, Replicate) and d.is_partial() else d for s, d in zip(src, dst, strict=True))
    return spec_str(kept)


def _is_strided_chunk(d: Any) -> bool:
    return d is not None and bool(d.inputs) and d.inputs[0] is not None and "SS(" in d.inputs[0]


def _collective_notes(collectives: Sequence[PlannedCollective], src: str, dst: str) -> list[str]:
    notes = []
    for c in collectives:
        if c.src == src and c.dst == dst:
            size = format_count(c.full_bytes, unit="B")
            phase = "" if c.phase == "forward" else f"{c.phase}: "
            notes.append(f"{phase}{c.collective} over {c.axis}, {size}")
    return notes


def _commenter(graph: Graph, comments: dict[str, str], previous: Any) -> Any:
    """A body transformer that writes each redistribution's collectives as a comment line above it."""
    def transform(body: list[str]) -> list[str]:
        if previous is not None:
            body = previous(body)
        out: list[str] = []
        for line in body:
            stripped = line.lstrip()
            name = stripped.split(" = ", 1)[0].strip() if " = " in stripped else ""
            if name in comments:
                out.append(f"# {comments[name]}\n")
            out.append(line)
        return out

    return transform
