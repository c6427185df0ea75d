"""ZeRO over the `dp` mesh axis, executed by FSDP2 (`fully_shard`) on the generated program's parameters.

The runtime's parameters are DTensors on the plan's operator mesh (dp, tp ...), Replicate on dp. That is
the input torch's `fully_shard` takes in its SPMD-mesh mode (`dp_mesh_dims`): it stores each parameter
sharded over dp, all-gathers it back to the planned placement before its module's forward, and
reduce-scatters its gradient, which the generated backward leaves Partial over dp, after backward. The
optimizer then steps the shards, so its state is sharded too. ZeRO's stages (Rajbhandari et al. 2020)
map onto FSDP2's settings:

- 1, optimizer state: parameters stay gathered from the first forward to the last backward of a step
  (`reshard_after_forward=False`, no reshard after a micro-batch's backward but the last) and full
  gradients accumulate over the micro-batches: the reduce-scatter runs after the last one.
- 2, + gradients: as 1, but each micro-batch's gradient is reduce-scattered at once
  (`before_micro_batch`).
- 3, + parameters: `reshard_after_forward=True`: a block's parameters are gathered for its forward,
  freed, and gathered again for its backward.

FSDP2 groups parameters by module, and the generated program is one flat graph; so `scoped_program`
outlines every block (`plan.training.blocks`) into a `BlockScope`, a module that owns the parameters only
that block reads and runs the block's graph (through checkpoint when it recomputes). The `ProgramScope`
around the graph owns the rest (embeddings, the head, a parameter two blocks share, a parameter no node
reads). Each scope is one
FSDP group: one all-gather and one reduce-scatter per block, as FSDP is used on hand-written models.

Two settings differ from FSDP's defaults, both for exactness: the generated backward's gradients are
partial *sums* over the dp replicas (the loss is the global mean, not a per-replica mean), so FSDP must
sum, not average (divide factor 1); and gloo has no PREMUL_SUM, so the sum is a plain SUM.

Under torch's pipelining the schedule drives FSDP itself (PipelineStage): no gradient sync and no
resharding after any micro-batch's backward but the last, then one reduce-scatter. So with pp > 1
gradients accumulate unsharded whatever the stage, and ZeRO-3 keeps a stage's parameters gathered from
its first backward on (solver/training.py prices it so).

A parameter the plan itself shards over dp (not Replicate on dp) is the plan's business: FSDP ignores it
and its gradient settles to its placement as without ZeRO.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import DataParallelMeshDims, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.fx import GraphModule, Node

from autoshard.cost_model.collectives import Collective, collective_bytes_per_device
from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan, PlannedCollective, Training
from autoshard.passes.codegen import contiguous_strides
from autoshard.passes.recompute import block_modes, checkpoint_block, outline_blocks
from autoshard.strategies.mesh import spec_from_str, spec_str

__all__ = [
    "DP_AXIS",
    "BlockScope",
    "ProgramScope",
    "before_micro_batch",
    "check_zero_mesh",
    "full_value",
    "replicated_over_dp",
    "scoped_program",
    "shard_with_fsdp",
    "unread_parameters",
    "zero_collectives",
]

DP_AXIS = "dp"


def check_zero_mesh(mesh: Mapping[str, int], stage: int) -> int:
    """The index of the dp axis in `mesh`; an error where ZeRO has no dp axis to shard over."""
    if DP_AXIS not in mesh or int(mesh[DP_AXIS]) < 2:
        raise InputError(
            f"zero_stage={stage} shards over the {DP_AXIS!r} mesh axis; the plan's mesh {dict(mesh)} has "
            f"{'no such axis' if DP_AXIS not in mesh else 'it of size 1'}. Plan on a mesh with dp >= 2 "
            "or set zero_stage=0"
        )
    return list(mesh).index(DP_AXIS)


def replicated_over_dp(plan: Plan) -> Plan:
    """`plan` with every parameter's dp placement made Replicate.

    The planner prices ZeRO-3 with parameters stored sharded over dp and gathered at use. At run time
    FSDP2 does that storing and gathering, so the program itself takes them replicated over dp (as
    FSDP hands them to it); the gathers codegen would insert are FSDP's."""
    dp_index = check_zero_mesh(plan.mesh, 3)
    params = {}
    for name, placement in plan.params.items():
        spec = list(spec_from_str(placement))
        spec[dp_index] = Replicate()
        params[name] = spec_str(tuple(spec))
    return dataclasses.replace(plan, params=params)


def unread_parameters(ir: GraphIR) -> frozenset[str]:
    """Canonical names of the parameters no node of the captured graph reads (a GPT-J-style parallel
    block's second norm, a head a model builds but does not call).

    Eager training gives them no gradient and optimizers leave them as they are, but they are part of the
    model's state: the runtime places them replicated (nothing reads them, so no placement is cheaper to
    compute with, and a replica is what every checkpoint writer can read), keeps them in the program (the
    ProgramScope holds them under ZeRO, a pipeline's first stage holds them) and writes them to every
    state dict."""
    readers = {n.name for n in ir.exported.graph.nodes if n.op == "placeholder" and n.users}
    return frozenset(info.name for info in ir.params if not any(n in readers for n in info.nodes))


class _PartialOverDp(torch.autograd.Function):
    """Identity on a parameter whose backward hands FSDP a gradient Partial over dp.

    FSDP reduce-scatters the gradient's dp partials. Where DTensor already reduced it (a gradient that
    arrives Replicate over dp, as the position embedding's does under dp), summing again would count it
    dp times; such a gradient is turned into dp partials first (each rank's 1/dp: local, exact for the
    powers of two meshes use)."""

    @staticmethod
    def forward(ctx: Any, param: torch.Tensor, dp_index: int) -> torch.Tensor:
        ctx.dp_index = dp_index
        return param.view_as(param)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if isinstance(grad, DTensor) and isinstance(grad.placements[ctx.dp_index], Replicate):
            placements = list(grad.placements)
            placements[ctx.dp_index] = Partial()
            dp = grad.device_mesh.shape[ctx.dp_index]
            grad = DTensor.from_local(
                grad.to_local() / dp, grad.device_mesh, placements, run_check=False, shape=grad.shape, stride=grad.stride()
            )
        return grad, None


def _read(scope: nn.Module, attr: str) -> torch.Tensor:
    p = getattr(scope, attr)
    dp_index = getattr(scope, "dp_index", None)
    if dp_index is None or not isinstance(p, DTensor) or not p.requires_grad:
        return p
    return _PartialOverDp.apply(p, dp_index)


class BlockScope(nn.Module):
    """One block of the generated program as a module: it owns the parameters only this block reads
    (FSDP2 swaps them between shards and gathered values around `forward`) and runs the block's graph,
    through checkpoint when the block recomputes."""

    def __init__(self, body: GraphModule, mode: str, slots: Sequence[str | None], params: Mapping[str, nn.Parameter]):
        super().__init__()
        self.body = body
        self.mode = mode
        self.slots = tuple(slots)  # per placeholder of `body`: an owned parameter's attribute, or None (passed in)
        for attr, p in params.items():
            self.register_parameter(attr, p)

    def forward(self, *inputs: Any) -> Any:
        given = iter(inputs)
        args = [_read(self, s) if s is not None else next(given) for s in self.slots]
        return checkpoint_block(self.body, self.mode, *args)


class ProgramScope(nn.Module):
    """The generated program as a module: it owns the parameters no single block owns (those two blocks
    share, those outside blocks, and those nothing reads: FSDP shards and gathers them as the rest) and
    calls the graph with them and with `values` (buffers, constants and inputs, by placeholder name)."""

    def __init__(self, program: GraphModule, slots: Sequence[tuple[str, str | None]], params: Mapping[str, nn.Parameter]):
        super().__init__()
        self.program = program
        self.slots = tuple(slots)  # per placeholder: (name, owned parameter's attribute or None)
        for attr, p in params.items():
            self.register_parameter(attr, p)
        self.owner: dict[str, tuple[nn.Module, str]] = {}  # canonical parameter -> (scope, attribute)

    def forward(self, values: Mapping[str, Any]) -> Any:
        return self.program(*(_read(self, attr) if attr else values[name] for name, attr in self.slots))

    def parameter(self, canonical: str) -> nn.Parameter:
        """The parameter `canonical` as registered now (after `fully_shard`, FSDP's sharded one)."""
        scope, attr = self.owner[canonical]
        return getattr(scope, attr)

    def blocks(self) -> list[BlockScope]:
        return [m for m in self.program.children() if isinstance(m, BlockScope)]

    def code(self) -> str:
        """The program's source, then each block's body under a header saying how the block runs it."""
        parts = [self.program.code]
        for name, m in self.program.named_children():
            if isinstance(m, BlockScope):
                runs = f"checkpoint_block({name}.body, {m.mode!r}, ...)" if m.mode != "none" else f"{name}.body(...)"
                parts.append(f"# ---- {name}: one FSDP group; forward = {runs} ----\n{m.body.code}")
        return "\n".join(parts)


def scoped_program(
    gm: GraphModule,
    ir: GraphIR,
    training: Training,
    params: Mapping[str, nn.Parameter],
    blocks: Iterable[int] | None = None,
) -> ProgramScope:
    """Outline the blocks numbered `blocks` (default: all) of codegen's `gm` (generated without
    recomputation) into BlockScopes and wrap the rest in a ProgramScope.

    `params` maps canonical parameter names to the runtime's parameters. A parameter belongs to a block
    when only that block reads it (under any of its names); otherwise to the program, which also holds
    the parameters no node of `gm` reads (`unread_parameters`; a stage's extra ones): they take no
    gradient, and are in the state all the same."""
    outline_blocks(gm, block_modes(training, blocks, every=True), {info.name: info.module for info in ir.nodes})
    canonical = {n: info.name for info in ir.params for n in info.nodes}
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is checkpoint_block]

    def scope_of(user: Node) -> str:
        return user.args[0].target if user in calls else ""  # "" is the program

    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in canonical:
            readers.setdefault(canonical[node.name], set()).update(scope_of(u) for u in node.users)
    home = {c: next(iter(s)) if len(s) == 1 else "" for c, s in readers.items()}
    attr = {c: c.replace(".", "__") for c in readers}
    owner: dict[str, str] = {}
    for call in calls:
        name, mode, inputs = call.args[0].target, call.args[1], call.args[2:]
        slots, owned, passed = [], {}, []
        for src in inputs:
            c = canonical.get(src.name) if isinstance(src, Node) and src.op == "placeholder" else None
            if c is not None and home[c] == name:
                slots.append(attr[c])
                owned[attr[c]] = params[c]
                owner[c] = name
            else:
                slots.append(None)
                passed.append(src)
        body = getattr(gm, name)
        delattr(gm, name)
        gm.add_submodule(name, BlockScope(body, mode, slots, owned))
        with graph.inserting_before(call):
            new = graph.call_module(name, tuple(passed))
        new.meta = dict(call.meta)
        call.replace_all_uses_with(new)
        get = call.args[0]
        graph.erase_node(call)
        graph.erase_node(get)
    slots, owned = [], {}
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        c = canonical.get(node.name)
        if c is None:
            slots.append((node.name, None))
        elif not node.users:  # read by one block only (that block owns it) or by none (held below)
            graph.erase_node(node)
        else:
            slots.append((node.name, attr[c]))
            owned[attr[c]] = params[c]
            owner.setdefault(c, "")
    graph.lint()
    gm.recompile()
    for c in params:  # read by no node: held by the program, outside its slots
        if c not in owner:
            attr.setdefault(c, c.replace(".", "__"))
            owned[attr[c]] = params[c]
            owner[c] = ""
    program = ProgramScope(gm, slots, owned)
    for c, scope in owner.items():
        program.owner[c] = (getattr(gm, scope) if scope else program, attr[c])
    return program


def shard_with_fsdp(root: nn.Module, blocks: Sequence[nn.Module], mesh: DeviceMesh, stage: int) -> list[FSDPModule]:
    """Apply FSDP2 over the dp axis of `mesh` (the parameters' own mesh) for ZeRO `stage`: each block, then
    `root` (the parameters left). Returns the FSDP modules, root last."""
    if stage not in (1, 2, 3):
        raise InputError(f"expected zero_stage 1, 2 or 3 for FSDP, found {stage}")
    names = tuple(mesh.mesh_dim_names or ())
    dp_index = check_zero_mesh(dict(zip(names, mesh.shape, strict=True)), stage)
    # a parameter the plan shards over dp itself stays as planned, and so does a scalar
    ignored = {p for p in root.parameters() if not isinstance(p.placements[dp_index], Replicate) or p.ndim == 0}
    options = {
        "mesh": mesh,
        "dp_mesh_dims": DataParallelMeshDims(shard=DP_AXIS),
        "reshard_after_forward": stage == 3,
        "ignored_params": ignored,
    }
    for scope in root.modules():  # FSDP's gradients: partial over dp (_PartialOverDp)
        if isinstance(scope, (BlockScope, ProgramScope)):
            scope.dp_index = dp_index
    modules = [fully_shard(b, **options) for b in blocks]
    modules.append(fully_shard(root, **options))
    root.fsdp_ignored = ignored  # what zero_collectives leaves out
    for m in modules:
        m.set_gradient_divide_factor(1.0)  # the replicas' partial gradients are summed, not averaged
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return modules


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor parameter or gradient, on every rank (collective).

    DTensor's `full_tensor` inverts `distribute_tensor`, which is how the plan's placements are made, and
    is used for them: on a dim several axes shard, DTensor splits over the first axis first and over each
    later axis inside those pieces, and gathers in the reverse order. FSDP2's dp shards are the one
    exception: FSDP splits dp *inside* what the later axes leave and marks it `_StridedShard(dim, s)`,
    s the later axes' split of that dim, and `full_tensor` in torch 2.13 gathers that wrongly beside a
    tp `_StridedShard` (a fused qkv under ZeRO + tp: measured off by 2e-2 on gpt-tiny while training was
    exact). So such a dp entry, the innermost split, is gathered first, on the 1-D dp sub-mesh, and
    DTensor does the rest. Gathering dp first for every dp shard would be wrong for a plain Shard on dp
    beside a shard of the same dim on a later axis: there dp is the outer split (measured off by 8e-2 on
    gpt-tiny's position table placed (S(1), S(1)))."""
    if not isinstance(t, DTensor):
        return t
    names = tuple(t.device_mesh.mesh_dim_names or ())
    if DP_AXIS in names and _is_inner_split(t, names.index(DP_AXIS)):
        i = names.index(DP_AXIS)
        sub = t.device_mesh[DP_AXIS]
        # over dp the local tensors split the tensor every other axis leaves this rank
        shape = _dp_shape(t, i)
        on_dp = Shard(t.placements[i].dim)
        local = DTensor.from_local(t.to_local(), sub, (on_dp,), run_check=False, shape=shape, stride=contiguous_strides(shape))
        gathered = local.full_tensor()
        placements = tuple(Replicate() if k == i else p for k, p in enumerate(t.placements))
        t = DTensor.from_local(gathered, t.device_mesh, placements, run_check=False, shape=t.shape, stride=t.stride())
    return t.full_tensor()


def _is_inner_split(t: DTensor, axis: int) -> bool:
    """Whether `t`'s placement on `axis` is FSDP's: a `_StridedShard` whose split factor is exactly the
    split the later axes make of its dim (its shards are then pieces of what those axes leave). A plan's
    fused-projection `_StridedShard(dim, k)` has the projection's chunk count k instead."""
    p = t.placements[axis]
    if not isinstance(p, _StridedShard):
        return False
    later = 1
    for k in range(axis + 1, t.device_mesh.ndim):
        q = t.placements[k]
        if isinstance(q, (Shard, _StridedShard)) and q.dim == p.dim:
            later *= t.device_mesh.size(k)
    return later > 1 and p.split_factor == later


def _dp_shape(t: DTensor, dp_index: int) -> torch.Size:
    """The shape of `t`'s local tensors joined over dp alone (every other axis' split kept)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    others = [Replicate() if k == dp_index else p for k, p in enumerate(t.placements)]
    shape, _ = compute_local_shape_and_global_offset(t.shape, t.device_mesh, others)
    return torch.Size(shape)


def before_micro_batch(modules: Sequence[FSDPModule], stage: int, last: bool) -> None:
    """Set FSDP for the next micro-batch's backward under ZeRO `stage` (gradient accumulation).

    ZeRO-1 and 2 keep parameters gathered until the last micro-batch's backward (they are replicated in
    ZeRO's terms; re-gathering them per micro-batch would only cost communication). ZeRO-1 accumulates
    full gradients and reduce-scatters once, after the last; ZeRO-2 reduce-scatters every micro-batch's
    gradient at once and keeps only the shard. ZeRO-3 gathers and frees per use (FSDP's default)."""
    for m in modules:
        if stage in (1, 2):
            m.set_reshard_after_backward(last, recurse=False)
        if stage == 1:
            m.set_requires_gradient_sync(last, recurse=False)


def zero_collectives(plan: Plan, ir: GraphIR, modules: Sequence[nn.Module]) -> list[PlannedCollective]:
    """The collectives one step of `plan` issues with ZeRO run by FSDP2 over `modules` (shard_with_fsdp's,
    root last): the plan's own, but for its parameters' dp traffic, then FSDP's per group.

    Per group and step, with m micro-batches: ZeRO-1 one all-gather (first forward) and one
    reduce-scatter (last backward); ZeRO-2 one all-gather and m reduce-scatters; ZeRO-3 m all-gathers in
    forward, m in backward and m reduce-scatters. A group's buffer is its parameters as this rank holds
    them without ZeRO (tp shards whole over dp), unpadded. Seconds are left to the step model
    (solver/training.py prices the same collectives)."""
    stage, m = plan.training.zero_stage, plan.training.num_micro_batches
    param_nodes = {n for info in ir.params for n in info.nodes}
    out = [c for c in plan.collectives if not (c.axis == DP_AXIS and c.src in param_nodes)]
    root = modules[-1]
    ignored = {id(p) for p in getattr(root, "fsdp_ignored", ())}
    owned: set[int] = set()
    counts = {
        1: {("forward", "all_gather"): 1, ("backward", "reduce_scatter"): 1},
        2: {("forward", "all_gather"): 1, ("backward", "reduce_scatter"): m},
        3: {("forward", "all_gather"): m, ("backward", "all_gather"): m, ("backward", "reduce_scatter"): m},
    }[stage]
    for i, module in enumerate(modules):
        params = [p for p in module.parameters() if id(p) not in ignored and id(p) not in owned]
        owned.update(id(p) for p in params)
        if not params:
            continue
        mesh = params[0].device_mesh
        dp_index = list(mesh.mesh_dim_names).index(DP_AXIS)
        dp = mesh.shape[dp_index]
        nbytes = sum(math.prod(_dp_shape(p, dp_index)) * p.element_size() for p in params)
        for (phase, kind), n in counts.items():
            collective = Collective.ALL_GATHER if kind == "all_gather" else Collective.REDUCE_SCATTER
            per_device = collective_bytes_per_device(collective, nbytes, dp)
            out += [
                PlannedCollective(
                    src=f"fsdp group {i}", dst="", phase=phase, axis=DP_AXIS, collective=kind,
                    full_bytes=int(nbytes), bytes_per_device=per_device, seconds=0.0,
                )
            ] * n
    return out
