"""PipelinedModel: a plan with pipeline stages (`plan.training.pp > 1`) run with torch.distributed.pipelining.

The device mesh is `(pp, *operator axes)`, pp outermost. Every pp rank runs its stages' share of the
generated DTensor graph (passes/codegen.py, cut by passes/stages.py) on its operator sub-mesh (dp, tp ...)
exactly as CompiledModel runs the whole graph; between stages torch's `PipelineStage` sends plain local
tensors, so each stage module turns its received local tensors into DTensors with the planned placements
(`DTensor.from_local`) and its outputs back into local tensors (`to_local`); both carry autograd, so the
gradients that travel back are the local shards of the true gradients. A boundary value the plan leaves
Partial is reduced (to Replicate) before it is sent: a partial sum has no meaning on another rank.

Batch convention (shared with the solver): the graph is captured, and the plan made, for one micro-batch
of every data-parallel replica, `micro_batch_size * dp` sequences. `train_step` takes the global batch,
`num_micro_batches` times that, and the schedule splits it along dim 0.

The loss: the model's forward(inputs..., targets) returns the loss. The nodes that read the targets
(the loss tail) become the schedule's `loss_fn(output, target)` on the last stage, so targets never travel
through the pipeline. The graph returns each micro-batch's loss numerator (its sum; capture/loss_reduction.py)
and `loss_fn` divides it by the global batch's denominator (the count of real labels, of elements, 1 for a
sum), which every rank computes from the global batch when the step starts, as CompiledModel's gradient
accumulation does, so the accumulated gradients equal the single-device gradients of the global batch.
(Not the schedule's `scale_grads`: it divides `p.grad` afterwards, which ZeRO-2 has already moved into
its shard.) `train_step` returns the sum of the scaled micro-batch losses, the global loss, broadcast
from the last stage to every rank.

ZeRO, recomputation and mixed precision work per stage as in CompiledModel: under ZeRO each stage's
blocks and the stage module are FSDP2 groups over the operator mesh's dp axis (runtime/fsdp.py), which
torch's pipelining drives itself: gradients accumulate unsharded over the micro-batches and are
reduce-scattered once after the last (so ZeRO-2 acts as ZeRO-1 here, and ZeRO-3 keeps a stage's
parameters gathered across its micro-batches' backward); a recomputed block is outlined into its stage's
graph after the cut (passes/recompute.py); bf16-mixed runs each stage's forward and the loss under
autocast, and what crosses a stage boundary keeps the dtype autocast gave it.

Shared parameters: a parameter read by two stages (GPT's tied wte / lm_head) gets a copy on each. After
backward the copies' gradients are summed (over the pp axis; Megatron's embedding all-reduce), so every
copy takes the same optimizer step and the copies stay equal.

Rank semantics: `parameters` holds the parameters of this rank's stages (for a shared one, its first copy;
the parameters no node reads are stage 0's);
`full_state_dict()` is collective and returns every stage's parameters, unsharded, on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Placement, Replicate, distribute_tensor
from torch.export.graph_signature import InputKind
from torch.fx import Node

from autoshard.capture.loss_reduction import loss_reduction_of
from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan, Training
from autoshard.passes.codegen import _contiguous, as_dtensor, codegen, grad_to, redistribute, use_mesh
from autoshard.passes.recompute import block_modes, outline_blocks
from autoshard.passes.stages import StageGraph, StageSplit, split_stages
from autoshard.capture.calls import flatten_call
from autoshard.runtime.micro_batches import BatchLayout, first_micro_batch, split_micro_batches
from autoshard.runtime.precision import autocast
from autoshard.runtime.module import ShardedModule, build_mesh, optimizer_factory, owned_copy, param_spec, submesh
from autoshard.runtime.fsdp import (
    ProgramScope,
    check_zero_mesh,
    full_value,
    replicated_over_dp,
    scoped_program,
    shard_with_fsdp,
    unread_parameters,
)
from autoshard.strategies.mesh import spec_from_str

__all__ = ["PipelinedModel", "first_micro_batch"]

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}


@dataclasses.dataclass(frozen=True, slots=True)
class _Boundary:
    """How a value crosses a stage boundary: its placement (no Partial) and global shape."""

    spec: tuple[Placement, ...]
    shape: torch.Size

    def enter(self, local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
        stride = _contiguous(self.shape)
        return DTensor.from_local(local, mesh, self.spec, run_check=False, shape=self.shape, stride=stride)

    def leave(self, value: Any, mesh: DeviceMesh) -> torch.Tensor:
        if not isinstance(value, DTensor):
            raise InputError(f"expected a DTensor at a stage boundary, found {type(value).__name__}")
        if tuple(value.placements) != self.spec:
            value = value.redistribute(mesh, self.spec)
        return value.to_local().contiguous()


class _StageModule(nn.Module):
    """One pipeline stage: local tensors in, the stage's share of the DTensor graph, local tensors out."""

    def __init__(
        self,
        piece: StageGraph,
        mesh: DeviceMesh,
        params: Mapping[str, nn.Parameter],
        tensors: Mapping[str, DTensor],
        inputs: Sequence[_Boundary | tuple[Placement, ...]],
        outputs: Sequence[_Boundary],
        precision: str,
        scope: ProgramScope | None = None,
        held: Mapping[str, nn.Parameter] | None = None,
    ) -> None:
        super().__init__()
        held = dict(held or {})
        self.graph_module = piece.graph_module
        self.mesh = mesh
        self.precision = precision
        self.scope = scope  # under ZeRO: the stage's program as FSDP2 modules, owning its parameters
        if scope is None:
            for name in piece.state:
                if name in params:
                    self.register_parameter(name, params[name])
            for c, p in held.items():  # read by no node: held here so the stage's state has them
                self.register_parameter(c.replace(".", "__"), p)
        self._state = [params[n] if n in params else tensors[n] for n in piece.state]  # graph order
        self._tensors = {n: tensors[n] for n in piece.state if n not in params}
        self._input_names = piece.inputs
        self._inputs = list(inputs)
        self._outputs = list(outputs)

    def forward(self, *values: torch.Tensor) -> Any:
        args = [
            b.enter(v, self.mesh) if isinstance(b, _Boundary) else distribute_tensor(v, self.mesh, b)
            for b, v in zip(self._inputs, values, strict=True)
        ]
        with use_mesh(self.mesh), autocast(self.precision, self.mesh.device_type):
            if self.scope is not None:
                out = self.scope({**self._tensors, **dict(zip(self._input_names, args, strict=True))})
            else:
                out = self.graph_module(*self._state, *args)
        locals_ = tuple(b.leave(v, self.mesh) for b, v in zip(self._outputs, out, strict=True))
        return locals_[0] if len(locals_) == 1 else locals_


class _LossFn:
    """The loss tail as the schedule's `loss_fn(output, target)`: the micro-batch's loss numerator
    (capture/loss_reduction.py) divided by the global batch's denominator, as a plain tensor."""

    def __init__(
        self,
        piece: StageGraph,
        mesh: DeviceMesh,
        inputs: Sequence[_Boundary],
        target: tuple,
        precision: str,
        num_micro_batches: int,
    ) -> None:
        self.piece, self.mesh, self.inputs, self.target, self.precision = piece, mesh, list(inputs), target, precision
        self.denominator = float(num_micro_batches)  # the global batch's, set by each step

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        args = [b.enter(v, self.mesh) for b, v in zip(self.inputs, outputs, strict=True)]
        args.append(distribute_tensor(target, self.mesh, self.target))
        with use_mesh(self.mesh), autocast(self.precision, self.mesh.device_type):
            (loss,) = self.piece.graph_module(*args)
        if loss.numel() != 1:
            raise InputError(f"expected a scalar loss, found shape {tuple(loss.shape)}; the model must return the loss")
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        return loss / self.denominator


class PipelinedModel(ShardedModule):
    """A plan with pipeline stages: an nn.Module holding this rank's stages' parameters under the
    model's names, with `step`, `train_step`, `clip_grad_norm_` and `full_state_dict` (runtime/module.py)."""

    def __init__(
        self,
        model: nn.Module,
        ir: GraphIR,
        plan: Plan,
        *,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__()
        t = plan.training
        _check_plan(plan)
        # the operator plan every stage runs on the (dp, tp ...) sub-mesh; ZeRO-3 stores parameters
        # sharded over its dp axis (gathered at use), ZeRO-1/2 shard the optimizer below
        op_plan = dataclasses.replace(plan, mesh=plan.operator_mesh)
        if t.zero_stage:  # FSDP2 on each stage (runtime/fsdp.py): the program takes parameters replicated over dp
            check_zero_mesh(op_plan.mesh, t.zero_stage)
            if t.zero_stage == 3:
                op_plan = replicated_over_dp(op_plan)
        self.plan, self.ir, self._training = plan, ir, t
        self.mesh = build_mesh(plan)
        self.operator_mesh: DeviceMesh = submesh(self.mesh, tuple(plan.operator_mesh))
        self.pp_group = self.mesh.get_group("pp")
        self.pp_rank = self.mesh.get_local_rank("pp")
        # recomputation is applied per stage, after the cut: a checkpointed block is one call node that
        # the split could not look inside
        whole = dataclasses.replace(op_plan, training=dataclasses.replace(t, recompute=()))
        self._hold(graph_module=codegen(ir, whole, device=self.mesh.device_type))
        self.split: StageSplit = split_stages(self.graph_module, ir, t)
        self.stage_ids = tuple(range(self.pp_rank, len(t.stages), t.pp))
        module_of = {info.name: info.module for info in ir.nodes}
        if not t.zero_stage:  # under ZeRO, scoped_program outlines every block below
            for sid in self.stage_ids:
                outline_blocks(self.split.stages[sid].graph_module, block_modes(t, t.stage_blocks(sid)), module_of)

        nodes = {n.name: n for n in self.graph_module.graph.nodes}
        decisions = {d.node: d for d in op_plan.nodes}
        canonical = {n: info.name for info in ir.params for n in info.nodes}
        self._names = {info.name: info.names for info in ir.params}
        # parameters no node reads are replicated and held by stage 0, so they are trained (not at all, as
        # in eager) and checkpointed as the rest (runtime/fsdp.py unread_parameters)
        unread = unread_parameters(ir)
        placements = {
            info.name: param_spec(
                info.name,
                op_plan.replicated_spec() if info.name in unread else op_plan.params.get(info.name) or op_plan.replicated_spec(),
            )
            for info in ir.params
        }
        tensors = self._tensors = self._state_tensors(model, nodes, decisions)
        user_inputs = [s.arg.name for s in ir.exported.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
        self._user_inputs = user_inputs
        self._micro_shapes = {n: tuple(nodes[n].meta["val"].shape) for n in user_inputs if _is_tensor(nodes[n])}
        self._batch = BatchLayout.of(ir, plan)  # the rows a step takes, checked as CompiledModel checks them
        self._reduction = loss_reduction_of(ir)

        def boundary(name: str) -> _Boundary:
            node = nodes[name]
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise InputError(f"value {name} crosses a stage boundary but is not a tensor ({type(val).__name__})")
            produced = _produced(node, decisions, placements, canonical) or (Replicate(),) * len(op_plan.mesh)
            spec = tuple(Replicate() if p.is_partial() else p for p in produced)
            return _Boundary(spec, val.shape)

        # one copy of each parameter per pp rank whose stages read it (stages of one rank share it: an
        # optimizer over `parameters()` steps every copy); the copies of a shared parameter on several pp
        # ranks have their gradients summed after backward
        self.stage_params: dict[int, dict[str, nn.Parameter]] = {}
        self.stage_modules: list[_StageModule] = []
        on_rank: dict[str, int] = {}  # canonical -> the first of this rank's stages that reads it
        for sid in self.stage_ids:
            piece = self.split.stages[sid]
            by_canonical: dict[str, nn.Parameter] = {}
            held = sorted(unread) if sid == 0 else []  # read by no placeholder of any stage
            for c in [*(canonical[n] for n in piece.state if n in canonical), *held]:
                if c in by_canonical:
                    continue
                if c in on_rank:
                    if t.zero_stage:
                        raise InputError(
                            f"parameter {c} is read by stages {on_rank[c]} and {sid}, which run on one pp rank; "
                            "under ZeRO each stage is its own FSDP2 group and a parameter can belong to one "
                            "only; plan without ZeRO, without interleaving (virtual stages), or with "
                            "pipeline_stage hints that keep the readers on one stage"
                        )
                    by_canonical[c] = self.stage_params[on_rank[c]][c]
                    continue
                on_rank[c] = sid
                full = owned_copy(model.get_parameter(c).detach())
                by_canonical[c] = nn.Parameter(
                    distribute_tensor(full, self.operator_mesh, placements[c]),
                    requires_grad=model.get_parameter(c).requires_grad,
                )
            params = {n: by_canonical[canonical[n]] for n in piece.state if n in canonical}
            self.stage_params[sid] = by_canonical
            inputs = [
                spec_from_str(_placement(decisions, n, op_plan)) if sid == 0 else boundary(n) for n in piece.inputs
            ]
            outputs = [boundary(n) for n in piece.outputs]
            scope = None
            if t.zero_stage:
                scope = scoped_program(piece.graph_module, ir, t, by_canonical, t.stage_blocks(sid))
            held_params = {c: by_canonical[c] for c in held}
            module = _StageModule(
                piece, self.operator_mesh, params, tensors, inputs, outputs, t.precision, scope, held_params
            )
            if scope is not None:  # each block, then the stage: FSDP groups; the stage is what pipelining sees
                shard_with_fsdp(module, scope.blocks(), self.operator_mesh, t.zero_stage)
                self.stage_params[sid] = {c: scope.parameter(c) for c in by_canonical}
            self.stage_modules.append(module)
        self._params: dict[str, nn.Parameter] = {}  # this rank's first copy of each, by canonical name
        for sid in self.stage_ids:
            for c, p in self.stage_params[sid].items():
                self._params.setdefault(c, p)
        readers: dict[str, list[int]] = {}  # canonical -> the stages that read it, in order
        for sid, piece in enumerate(self.split.stages):
            for c in {canonical[n] for n in piece.state if n in canonical}:
                readers.setdefault(c, []).append(sid)
        self._shared = sorted(c for c, k in readers.items() if len(k) > 1)  # the same list on every rank
        # the global gradient norm counts each parameter once: on the rank of the first stage reading it
        # (stage 0 for a parameter no stage reads: stage 0 holds it)
        first_reader = {info.name: readers.get(info.name, [0])[0] for info in ir.params}
        self._counted = sorted(c for c in self._params if first_reader[c] in self.stage_ids)
        self._placements = placements
        self._shapes = {info.name: (info.meta.shape, info.meta.dtype) for info in ir.params}

        loss_inputs = [boundary(n) for n in self.split.loss.inputs[:-1]]
        target_spec = spec_from_str(_placement(decisions, self.split.target, op_plan))
        self.loss_fn = _LossFn(
            self.split.loss, self.operator_mesh, loss_inputs, target_spec, t.precision, t.num_micro_batches
        )
        device = torch.device(self.mesh.device_type)
        self.stages = [
            PipelineStage(m, sid, len(t.stages), device, group=self.pp_group)
            for m, sid in zip(self.stage_modules, self.stage_ids, strict=True)
        ]
        # loss_fn scales each micro-batch's loss; the schedule's scale_grads would divide `p.grad`, which
        # ZeRO-2 has already moved into the dp shard
        schedule = _SCHEDULES[t.schedule]
        first = self.stages if t.schedule == "interleaved-1f1b" else self.stages[0]
        self.schedule = schedule(first, t.num_micro_batches, loss_fn=self.loss_fn, scale_grads=False)

        # every copy of a parameter is stepped (the copies of a shared one take equal, summed gradients);
        # under ZeRO the copies are FSDP's dp shards, so the optimizer state is sharded with them
        self._make_builtin = optimizer_factory(optimizer, lr, **optimizer_kwargs)
        self._shared_shapes = self._exchange_shared_shapes()
        read = {n for sid in self.stage_ids for n in self.split.stages[sid].state}
        self._adopt(  # last: the model's names must not meet an attribute set after them
            self._names,
            self._params,
            {self._buffer_names[n]: self._tensors[n] for n in sorted(read) if n in self._buffer_names},
            persistent=self._buffer_names.values(),
        )

    # ---- running ------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not built for pipelined plans: each rank holds some stages, and no rank has the model's outputs."""
        raise InputError(
            "expected a plan without pipeline stages for a forward (evaluation) call, found "
            f"pp={self._training.pp}; evaluate the single-device model on the exported weights "
            "(autoshard.export_checkpoint), or compile a plan with pp=1 for evaluation"
        )

    def _forward_backward(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        """`step` on the global batch (identical on every rank): the schedule's forward and backward over
        `num_micro_batches` micro-batches, gradients to their parameters' placements, shared parameters'
        gradients summed. Returns the mean loss over the global batch on every rank."""
        flat = flatten_call(self.ir.exported, args, kwargs)
        args, target = self._micro_batched(flat)
        self.loss_fn.denominator = self._reduction.denominator(split_micro_batches(flat, self._batch))
        losses: list[torch.Tensor] = []
        has_first = 0 in self.stage_ids
        has_last = len(self._training.stages) - 1 in self.stage_ids
        self.schedule.step(
            *(args if has_first else ()),
            target=target if has_last else None,
            losses=losses if has_last else None,
            return_outputs=False,
        )
        self._settle_gradients()
        self._sum_shared_gradients()
        loss = torch.stack([x.detach() for x in losses]).sum() if has_last else torch.zeros(())
        loss = loss.reshape(()).to(torch.float32).clone()
        src = dist.get_global_rank(self.pp_group, self._training.pp - 1)
        dist.broadcast(loss, src=src, group=self.pp_group)
        return float(loss)

    def _micro_batched(self, inputs: Sequence[Any]) -> tuple[list[Any], torch.Tensor]:
        if len(inputs) != len(self._user_inputs):
            raise InputError(
                f"expected {len(self._user_inputs)} inputs ({', '.join(self._user_inputs)}), found {len(inputs)}; "
                "pass the global batch of the same arguments as the example inputs"
            )
        self._batch.check(inputs, entry="train_step")
        n = self._training.num_micro_batches
        for name, x in zip(self._user_inputs, inputs, strict=True):  # the dims beyond the batch
            micro = self._micro_shapes.get(name)
            if micro is None or not isinstance(x, torch.Tensor):
                continue
            want = (micro[0] * n, *micro[1:])
            if tuple(x.shape) != want:
                raise InputError(
                    f"expected input {name} of shape {want} ({n} micro-batches of {micro[0]}, the batch the plan "
                    f"was made for), found {tuple(x.shape)}; pass a global batch of num_micro_batches x "
                    "micro_batch_size x dp sequences"
                )
        by_name = dict(zip(self._user_inputs, inputs, strict=True))
        target = by_name[self.split.target]
        args = [by_name[n] for n in self.split.stages[0].inputs]
        return args, target

    def _exchange_shared_shapes(self) -> dict[str, tuple[int, ...]]:
        """The local shape of each shared parameter's gradient (FSDP's shard under ZeRO), from the pp ranks
        that hold a copy, for the ranks that hold none (they add zeros to the sum)."""
        mine = {
            c: tuple(self.stage_params[sid][c].to_local().shape)
            for sid in self.stage_ids
            for c in self._shared
            if c in self.stage_params[sid]
        }
        every: list[Any] = [None] * self._training.pp
        dist.all_gather_object(every, mine, group=self.pp_group)
        return {c: shape for part in every for c, shape in part.items()}

    def _sum_shared_gradients(self) -> None:
        """Sum the gradients of a parameter's copies on every stage that reads it (over the pp axis)."""
        for c in self._shared:
            holders = [self._params[c]] if c in self._params else []  # one copy per rank (its stages share it)
            if holders and not holders[0].requires_grad:
                continue
            if holders:
                total = torch.zeros_like(holders[0].detach().to_local())
            else:  # this pp rank holds no copy; it still takes part in the reduction, with zeros
                total = torch.zeros(self._shared_shapes[c], dtype=self._shapes[c][1])
            for h in holders:
                if h.grad is not None:
                    total += h.grad.to_local()
            dist.all_reduce(total, group=self.pp_group)
            for h in holders:
                h.grad = DTensor.from_local(
                    total.clone(), h.device_mesh, h.placements, run_check=False, shape=h.shape, stride=h.stride()
                )

    def _norm_parameters(self) -> list[nn.Parameter]:
        return [self._params[c] for c in self._counted]

    def _combine_norms(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The norm over every pp rank's counted parameters (each rank's operator mesh already agrees)."""
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.pp_group)
            return local
        power = local.pow(norm_type)
        dist.all_reduce(power, group=self.pp_group)
        return power.pow(1.0 / norm_type)

    # ---- inspection -----------------------------------------------------------------------------------

    @property
    def code(self) -> str:
        """Each of this rank's stages' generated source, under a header naming the stage."""
        return "\n".join(
            f"# ---- stage {sid} ----\n{m.scope.code() if m.scope is not None else m.graph_module.code}"
            for sid, m in zip(self.stage_ids, self.stage_modules, strict=True)
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters, unsharded, under every name the model uses, and the persistent
        buffers as the stage that reads them holds them, on every rank (collective)."""
        mine = {c: full_value(p.detach()) for c, p in sorted(self._params.items())}
        read = {n for sid in self.stage_ids for n in self.split.stages[sid].state}
        buffers = {self._buffer_names[n]: full_value(self._tensors[n].detach()) for n in sorted(read) if n in self._buffer_names}
        gathered_buffers: list[Any] = [None] * self._training.pp
        dist.all_gather_object(gathered_buffers, buffers, group=self.pp_group)
        gathered: list[Any] = [None] * self._training.pp
        dist.all_gather_object(gathered, mine, group=self.pp_group)
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            for c, full in part.items():
                for name in self._names[c]:
                    out.setdefault(name, full)
        for part in gathered_buffers:
            for name, full in part.items():
                out.setdefault(name, full)
        return out

    # ---- setup helpers ------------------------------------------------------------------------------

    def _state_tensors(self, model: nn.Module, nodes: Mapping[str, Node], decisions: Mapping[str, Any]) -> dict[str, DTensor]:
        """Buffers and lifted constants as DTensors with their planned placements (every stage may read them)."""
        ep = self.ir.exported
        out: dict[str, DTensor] = {}
        self._buffer_names: dict[str, str] = {}  # placeholder -> the model's name, persistent buffers only
        for spec in ep.graph_signature.input_specs:
            if spec.kind is InputKind.BUFFER:
                # the program's own copy: in-place updates (BatchNorm's running statistics) land here
                value = owned_copy(model.get_buffer(spec.target).detach())
                if spec.persistent:
                    self._buffer_names[spec.arg.name] = spec.target
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                value = ep.constants[spec.target]
            else:
                continue
            place = spec_from_str(_placement(decisions, spec.arg.name, self.plan))
            out[spec.arg.name] = distribute_tensor(value, self.operator_mesh, place)
        return out


def _check_plan(plan: Plan) -> None:
    t: Training = plan.training
    problems = []
    if t.pp <= 1:
        problems.append(f"training.pp is {t.pp}; a plan without pipeline stages runs as CompiledModel")
    if plan.axis_size("pp") != t.pp or next(iter(plan.mesh), None) != "pp":
        problems.append(f"the mesh {dict(plan.mesh)} must have 'pp' as its first axis with size training.pp={t.pp}")
    if not plan.operator_mesh:
        problems.append("the operator mesh (the mesh without pp) is empty; plan the operator part on e.g. {'dp': 1}")
    if t.schedule not in _SCHEDULES:
        problems.append(f"schedule {t.schedule!r} is not one of {sorted(_SCHEDULES)}")
    if t.schedule == "1f1b" and t.num_micro_batches < t.pp:
        problems.append(f"1f1b needs at least pp={t.pp} micro-batches, found {t.num_micro_batches}")
    if t.schedule == "interleaved-1f1b":
        rounds = max(1, t.num_micro_batches // t.pp)
        if t.num_micro_batches % rounds:
            problems.append(
                f"interleaved-1f1b needs num_micro_batches ({t.num_micro_batches}) to be a multiple of "
                f"max(1, num_micro_batches // pp) = {rounds}"
            )
    if problems:
        raise InputError("cannot run this pipelined plan: " + "; ".join(problems))


def _placement(decisions: Mapping[str, Any], node: str, plan: Plan) -> str:
    d = decisions.get(node)
    if d is None or not d.output or d.output[0] is None:
        return plan.replicated_spec()
    return d.output[0]


def _produced(
    node: Node, decisions: Mapping[str, Any], params: Mapping[str, Any], canonical: Mapping[str, str]
) -> tuple[Placement, ...] | None:
    """The placement the plan gives the value of `node` (codegen's nodes: the placement they produce);
    None where the plan says nothing (the sender then makes it replicated)."""
    if node.op == "call_function" and node.target in (redistribute, as_dtensor):
        return spec_from_str(node.args[1])
    if node.op == "call_function" and node.target is grad_to:
        return _produced(node.args[0], decisions, params, canonical)
    if node.name in canonical:
        return params[canonical[node.name]]
    d = decisions.get(node.name)
    if d is not None and len(d.output) == 1 and d.output[0] is not None:
        return spec_from_str(d.output[0])
    return None


def _is_tensor(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)
