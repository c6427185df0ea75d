"""CompiledModel: any plan, run as DTensor training on the current process group.

One runtime for every plan: the generated DTensor program (passes/codegen.py) runs as stages
(runtime/stage.py) on the plan's operator mesh (every axis but pp), driven by a schedule
(runtime/schedule.py). A plan without pipelining is a pipeline of one stage, holding the whole program,
run over its micro-batches by gradient accumulation. A pipelined plan (`training.pp > 1`) is cut at
block boundaries into `len(training.stages)` stages (passes/stages.py); this rank runs stages
r, r + pp, ... on its pp coordinate, under torch.distributed.pipelining's schedule. The device mesh is
`(pp, *operator axes)`, pp outermost.

What the construction does, for every plan:
- placements are parsed once into a typed `Layout` (runtime/layout.py);
- each parameter this rank's stages read is sharded as planned: from the model's full CPU values with
  `distribute_tensor` (rank 0's values are scattered, so ranks that initialised differently still agree),
  or, for a model built on meta, materialised shard by shard from its own initialisation and a seed
  (runtime/materialize.py). A parameter read by stages on two pp ranks gets a copy on each; the
  parameters no node reads are replicated and held by stage 0 (runtime/fsdp.py `unread_parameters`);
- buffers and lifted constants become the program's own DTensors: in-place updates (BatchNorm's running
  statistics) land there, never in the user's module;
- under ZeRO each stage's blocks and the stage are FSDP2 groups over dp (runtime/fsdp.py); recomputed
  blocks are outlined into their stage's graph (passes/recompute.py).

Batch convention (shared with the solver): the graph is captured, and the plan made, for one micro-batch
of every data-parallel replica (`micro_batch_size * dp` rows along dim 0). `step` and `train_step` take
the global batch, `num_micro_batches` times that; a forward takes one micro-batch of every replica.
Inputs are passed identically on every rank and distributed per the plan.

Rank semantics: `parameters()` holds the parameters of this rank's stages (one copy each); `forward`
returns the model's outputs, whole, on every rank; `full_state_dict()` is collective and returns every
stage's parameters, unsharded, on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Node
from torch.utils._pytree import tree_unflatten

from autoshard.capture.calls import flatten_call
from autoshard.capture.loss_reduction import loss_reduction_of
from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan, Training
from autoshard.passes.codegen import as_dtensor, codegen, evaluating, grad_to, redistribute
from autoshard.passes.recompute import block_modes, outline_blocks
from autoshard.passes.stages import StageGraph, split_stages, whole_program
from autoshard.runtime.fsdp import (
    check_zero_mesh,
    full_value,
    replicated_over_dp,
    scoped_program,
    shard_with_fsdp,
    unread_parameters,
)
from autoshard.runtime.layout import Layout, Placements
from autoshard.runtime.materialize import materialize_shards
from autoshard.runtime.grad_sync import OverlappedSync
from autoshard.runtime.stage import check_same_batch
from autoshard.runtime.micro_batches import BatchLayout, split_micro_batches
from autoshard.runtime.precision import autocast
from autoshard.runtime.module import ShardedModule, build_mesh, optimizer_factory, owned_copy, submesh
from autoshard.runtime.schedule import SCHEDULES, Accumulation, Phase, Pipeline, no_phase
from autoshard.runtime.stage import Boundary, LossTail, Stage
from autoshard.strategies.mesh import spec_from_str

if TYPE_CHECKING:
    from autoshard.runtime.comm import CommReport

__all__ = ["CompiledModel", "check_plan"]


class CompiledModel(ShardedModule):
    """A model sharded per `plan`: an nn.Module under the model's names (runtime/module.py), with
    forward, step, train_step, clip_grad_norm_ and full_state_dict, for every plan."""

    def __init__(
        self,
        model: nn.Module,
        ir: GraphIR,
        plan: Plan,
        *,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        seed: int | None = None,
        torch_compile: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__()
        t: Training = plan.training
        check_plan(plan)
        if torch_compile and (t.zero_stage or any(m != "none" for m in t.recompute)):
            raise InputError(
                "expected a plan without ZeRO and recomputation for torch_compile=True, found "
                f"zero_stage={t.zero_stage}, recompute={sorted(set(t.recompute))}: FSDP2's hooks run inside the "
                "program, and torch 2.13's AOTAutograd cannot save the checkpointed blocks' device mesh; "
                "compile without torch_compile, or plan with zero_stage=0 and recompute='none'"
            )
        if t.pp > 1 and loss_fn is not None:
            raise InputError(
                "a pipelined plan (training.pp > 1) takes no loss_fn: its loss is the model's own, cut off the "
                "graph as the last stage's loss function; return the loss from the model"
            )
        self.plan, self.ir, self.loss_fn, self._training = plan, ir, loss_fn, t
        self.mesh = build_mesh(plan)
        pipelined = t.pp > 1
        self.operator_mesh: DeviceMesh = submesh(self.mesh, tuple(plan.operator_mesh)) if "pp" in plan.mesh else self.mesh
        # the operator plan every stage runs. ZeRO runs as FSDP2 (runtime/fsdp.py): under ZeRO-3 the program
        # takes parameters replicated over dp (FSDP stores the shards and gathers them). Recomputation is
        # outlined after the cut (a checkpointed block is one call node the split could not look inside),
        # or, under ZeRO, by scoped_program
        run_plan = dataclasses.replace(plan, mesh=plan.operator_mesh)
        if t.zero_stage:
            check_zero_mesh(run_plan.mesh, t.zero_stage)
            if t.zero_stage == 3:
                run_plan = replicated_over_dp(run_plan)
        if t.zero_stage or pipelined:
            run_plan = dataclasses.replace(run_plan, training=dataclasses.replace(t, recompute=()))
        self._hold(graph_module=codegen(ir, run_plan, device=self.mesh.device_type))
        unread = unread_parameters(ir)
        self.layout = layout = Layout.of(run_plan, ir, replicated_params=unread)

        if pipelined:
            self.pp_group = self.mesh.get_group("pp")
            pp_rank = self.mesh.get_local_rank("pp")
            self.split = split_stages(self.graph_module, ir, t)
            pieces = self.split.stages
            self.stage_ids = tuple(range(pp_rank, len(t.stages), t.pp))
            if not t.zero_stage:
                module_of = {info.name: info.module for info in ir.nodes}
                for sid in self.stage_ids:
                    outline_blocks(pieces[sid].graph_module, block_modes(t, t.stage_blocks(sid)), module_of)
        else:
            self.split = None
            pieces = (whole_program(self.graph_module, ir),)
            self.stage_ids = (0,)
        canonical = {n: info.name for info in ir.params for n in info.nodes}
        self._names = {info.name: info.names for info in ir.params}
        reads = {sid: [canonical[n] for n in pieces[sid].state if n in canonical] for sid in self.stage_ids}
        held = sorted(unread) if pipelined and 0 in self.stage_ids else []  # read by no stage: stage 0 holds them
        self._check_zero_sharing(reads)
        wanted = {c for cs in reads.values() for c in cs} | set(held)
        self._params: dict[str, nn.Parameter] = self._shard_parameters(model, wanted, seed)
        self._tensors, buffers, self._persistent = self._state_tensors(model)
        # the buffers this rank's stages read (a buffer no stage reads: stage 0's), by the model's name
        targets = {s.arg.name: s.target for s in ir.exported.graph_signature.input_specs if s.kind is InputKind.BUFFER}
        read = {n for sid in self.stage_ids for n in pieces[sid].state}
        if 0 in self.stage_ids:
            read |= set(targets) - {n for piece in pieces for n in piece.state}
        self._program_buffers = {targets[n]: buffers[targets[n]] for n in sorted(read) if n in targets}
        self._user_outputs = [
            i for i, o in enumerate(ir.exported.graph_signature.output_specs) if o.kind is OutputKind.USER_OUTPUT
        ]
        self._user_inputs = [s.arg.name for s in ir.exported.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
        self._batch_checked = False  # the first call checks every rank passes the same batch
        self._batch = BatchLayout.of(ir, plan)  # which inputs carry the batch, and the rows the plan runs
        self._reduction = loss_reduction_of(ir)
        self._make_builtin = optimizer_factory(optimizer, lr, **optimizer_kwargs)

        # the stages this rank runs; under ZeRO each stage's blocks and then the stage are FSDP2 groups
        boundary = _Boundaries(self.graph_module, layout, canonical)
        self.stages: list[Stage] = []
        self.stage_params: dict[int, dict[str, nn.Parameter]] = {}
        self.fsdp: list[FSDPModule] = []
        for sid in self.stage_ids:
            piece = pieces[sid]
            mine = {c: self._params[c] for c in [*reads[sid], *(held if sid == 0 else [])]}
            if pipelined:
                inputs = [layout.of_node(n) if sid == 0 else boundary(n) for n in piece.inputs]
                outputs: list[Boundary] | None = [boundary(n) for n in piece.outputs]
            else:
                inputs, outputs = [layout.of_node(n) for n in piece.inputs], None
            scope = None
            if t.zero_stage:
                blocks = t.stage_blocks(sid) if pipelined else None
                scope = scoped_program(piece.graph_module, ir, t, mine, blocks)
            stage = Stage(
                piece,
                self.operator_mesh,
                {n: self._params[canonical[n]] for n in piece.state if n in canonical},
                self._tensors,
                inputs,
                outputs,
                t.precision,
                scope,
                {c: mine[c] for c in (held if sid == 0 else [])},
                torch_compile=torch_compile,
            )
            if scope is not None:
                self.fsdp += shard_with_fsdp(stage, scope.blocks(), self.operator_mesh, t.zero_stage)
                mine = {c: scope.parameter(c) for c in mine}  # FSDP's dp shards
            self.stage_params[sid] = mine
            self.stages.append(stage)
        for sid in self.stage_ids:  # the runtime's parameters as the optimizer steps them (under ZeRO: shards)
            self._params.update(self.stage_params[sid])

        if pipelined:
            tail_inputs = [boundary(n) for n in self.split.loss.inputs[:-1]]
            self.loss_tail = LossTail(
                self.split.loss, self.operator_mesh, tail_inputs, layout.of_node(self.split.target), t.precision
            )
            self.schedule: Accumulation | Pipeline = Pipeline(
                self.stages, self.stage_ids, self.split, self.loss_tail, schedule=t.schedule,
                num_micro_batches=t.num_micro_batches, pp_group=self.pp_group,
                device=torch.device(self.mesh.device_type),
            )  # fmt: skip
            self._pipeline_parameters(pieces, canonical)
            nodes = {n.name: n for n in self.graph_module.graph.nodes}
            self._micro_shapes = {
                n: tuple(nodes[n].meta["val"].shape)
                for n in self._user_inputs
                if n in nodes and isinstance(nodes[n].meta.get("val"), torch.Tensor)
            }
        else:
            self._shared, self._counted = [], sorted(self._params)
            managed = {id(p) for m in self.fsdp for p in m.parameters()} - {
                id(p) for m in self.fsdp for p in getattr(m, "fsdp_ignored", ())}
            self._grad_sync = OverlappedSync([p for p in self._params.values() if id(p) not in managed])
            self.schedule = Accumulation(self.stages[0], self._loss, self.fsdp, t.zero_stage, self._grad_sync)
        # last: the model's names must not meet an attribute set after them. Under ZeRO these are FSDP's
        # dp shards, so an optimizer over them keeps its state sharded with them
        self._adopt(self._names, self._params, self._program_buffers, self._persistent)

    # ---- running ------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Forward without gradients on one micro-batch of every replica (the global batch when the plan
        runs one micro-batch), called as the model is; the model's outputs come back whole (unsharded), in
        its own structure (a ModelOutput, a tuple, a tensor), on every rank. The loss is the batch's. In
        eval mode the dropouts are off, as in the model's own eval mode.

        Under pipelining the batch runs through the stages in order and the outputs come from the last
        stage (a model output made on an earlier stage is refused); the targets are needed, as for `step`."""
        if not self.training and (norms := self.ir.train_batch_norms()):
            raise InputError(
                f"expected a model whose eval-mode forward the runtime can run, found {len(norms)} BatchNorm(s) "
                f"captured in training mode ({', '.join(norms[:3])}), which normalise by the batch's "
                "statistics, not the running ones; evaluate the single-device model on the exported weights "
                "(autoshard.export_checkpoint), or call model.train() for a training-mode forward"
            )
        inputs = self._flat(args, kwargs)
        self._batch.check(inputs, entry="forward", micro_batches=1)
        with torch.no_grad(), evaluating(not self.training):  # eval mode: dropouts pass their input through
            if isinstance(self.schedule, Pipeline):
                by_name = dict(zip(self._user_inputs, inputs, strict=True))
                user = self.schedule.forward([by_name[n] for n in self.split.stages[0].inputs], by_name[self.split.target])
            else:
                full = self.schedule.forward(inputs)
                user = [full[i] for i in self._user_outputs]
        i = self._loss_index()
        loss_at = self._user_outputs.index(i) if i is not None and self.loss_fn is None else None
        if loss_at is not None:  # the graph returns the loss's numerator (capture/loss_reduction.py)
            user[loss_at] = user[loss_at] / self._reduction.denominator([inputs])
        return tree_unflatten(list(user), self.ir.exported.call_spec.out_spec)

    def _forward_backward(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        return self._step(self._flat(args, kwargs))

    def _step(self, inputs: Sequence[Any], *, phase: Phase | None = None) -> float:
        """`step` on the flat global batch, with `phase(name)` entered around forward and backward where
        the schedule runs them apart (communication accounting attributes each collective to its phase)."""
        chunks = split_micro_batches(inputs, self._batch)
        # each micro-batch's loss is a numerator over the global batch's denominator (the count of its
        # real labels, its elements, 1 for a sum), so the accumulated gradients are the global batch's
        denominator = self._reduction.denominator(chunks)
        if isinstance(self.schedule, Pipeline):
            args, target = self._pipeline_inputs(inputs)
            loss = self.schedule.step(args, target, denominator)
            self._settle_gradients()
            self.schedule.sum_shared_gradients(self._shared, self._params, self._shared_shapes)
            return loss
        phase = phase or no_phase
        loss = self.schedule.step(chunks, denominator, phase)
        with phase("backward"):
            self._settle_gradients()
        return loss

    def comm_report(self, *args: Any, **kwargs: Any) -> CommReport:
        """Run one training step (it updates the parameters) and return the collectives it issued next to
        the plan's, per phase, kind and mesh axis (`print(report)` shows the table)."""
        if isinstance(self.schedule, Pipeline):
            raise InputError(
                "expected a plan without pipeline stages for comm_report, found pp="
                f"{self._training.pp}: the pipeline's point-to-point traffic is not recorded yet"
            )
        from autoshard.runtime.comm import measure_comm

        return measure_comm(self, *self._flat(args, kwargs))

    def _flat(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """A call as the graph's flat user inputs (capture/calls.py refuses a call of another shape)."""
        inputs = flatten_call(self.ir.exported, args, kwargs)
        if len(inputs) != len(self._user_inputs):
            raise InputError(
                f"expected {len(self._user_inputs)} inputs ({', '.join(self._user_inputs)}), found {len(inputs)}; "
                "pass the same arguments as the example inputs given to autoshard.compile"
            )
        if not self._batch_checked:
            check_same_batch(inputs)  # each rank then takes its rows of its own copy, no scatter
            self._batch_checked = True
        return inputs

    def _loss_index(self) -> int | None:
        return self.ir.loss.index if self.ir.loss is not None else None

    def _loss(self, outputs: Sequence[Any]) -> Any:
        if self.loss_fn is not None:  # under the plan's precision, as the model's own loss
            with autocast(self._training.precision, self.mesh.device_type):
                return self.loss_fn(*(outputs[i] for i in self._user_outputs))
        i = self._loss_index()
        return outputs[i if i is not None else 0]

    def _pipeline_inputs(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]:
        """Stage 0's inputs and the target, from the flat global batch (its dims beyond the batch checked)."""
        n = self._training.num_micro_batches
        for name, x in zip(self._user_inputs, inputs, strict=True):
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
        return [by_name[name] for name in self.split.stages[0].inputs], by_name[self.split.target]

    # ---- the global gradient norm -----------------------------------------------------------------

    def _norm_parameters(self) -> list[nn.Parameter]:
        return [self._params[c] for c in self._counted]

    def _combine_norms(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        if isinstance(self.schedule, Pipeline):
            return self.schedule.combine_norms(local, norm_type)
        return local

    # ---- inspection -----------------------------------------------------------------------------------

    @property
    def code(self) -> str:
        """The generated program's Python source, with the collectives of each redistribution as comments
        (under ZeRO each block's source follows; under pipelining each of this rank's stages, headed)."""
        if not isinstance(self.schedule, Pipeline):
            return self.stages[0].code()
        return "\n".join(
            f"# ---- stage {sid} ----\n{stage.code()}" for sid, stage in zip(self.stage_ids, self.stages, strict=True)
        )

    def save_code(self, directory: str | Path) -> Path:
        """Write the generated source to `directory/<model>_<mesh>.py` and return the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        mesh = "x".join(f"{axis}{size}" for axis, size in self.plan.mesh.items())
        path = directory / f"{self.ir.model_type.lower()}_{mesh}.py"
        header = f"# autoshard: {self.plan.model} on {self.plan.cluster}, mesh {dict(self.plan.mesh)}\n"
        path.write_text(header + self.code)
        return path

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded, under every name the model uses (tied weights appear under each),
        and the persistent buffers as training has updated them (BatchNorm's running statistics): the keys
        of the model's own `state_dict()`, on every rank (collective; under pipelining, over every stage)."""
        params = {c: full_value(p.detach()) for c, p in sorted(self._params.items())}
        buffers = {name: full_value(b.detach()) for name, b in sorted(self._program_buffers.items()) if name in self._persistent}
        parts = [(params, buffers)]
        if isinstance(self.schedule, Pipeline):
            parts = self.schedule.gather(parts[0])
        out: dict[str, torch.Tensor] = {}
        for part_params, _ in parts:
            for c, full in part_params.items():
                for name in self._names[c]:
                    out.setdefault(name, full)
        for _, part_buffers in parts:
            for name, full in part_buffers.items():
                out.setdefault(name, full)
        return out

    # ---- setup helpers -----------------------------------------------------------------------------------

    def _check_zero_sharing(self, reads: Mapping[int, Sequence[str]]) -> None:
        """Under ZeRO each stage is its own FSDP2 group: a parameter two stages of one rank read is refused."""
        if not self._training.zero_stage:
            return
        first: dict[str, int] = {}
        for sid, cs in reads.items():
            for c in cs:
                if c in first and first[c] != sid:
                    raise InputError(
                        f"parameter {c} is read by stages {first[c]} and {sid}, which run on one pp rank; "
                        "under ZeRO each stage is its own FSDP2 group and a parameter can belong to one "
                        "only; plan without ZeRO, without interleaving (virtual stages), or with "
                        "pipeline_stage hints that keep the readers on one stage"
                    )
                first.setdefault(c, sid)

    def _shard_parameters(self, model: nn.Module, wanted: set[str], seed: int | None) -> dict[str, nn.Parameter]:
        """The parameters in `wanted` (canonical names) as DTensor parameters in their planned placements."""
        specs = self.layout.params
        if any(p.is_meta for p in model.parameters()):
            if seed is None:
                raise InputError("expected seed=... for a model on the meta device; see autoshard.compile")
            shards = materialize_shards(
                model, self.operator_mesh, specs, seed=seed, owned=owned_copy, wanted=wanted
            )
        else:
            shards = {
                c: distribute_tensor(owned_copy(model.get_parameter(c).detach()), self.operator_mesh, specs[c])
                for c in sorted(wanted)
            }
        order = [info.name for info in self.ir.params if info.name in wanted]  # the model's order
        return {c: nn.Parameter(shards[c], requires_grad=model.get_parameter(c).requires_grad) for c in order}

    def _state_tensors(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], set[str]]:
        """Buffers and lifted constants in their planned placements: (by placeholder, buffers by the
        model's name, the persistent buffers' names). Every stage may read them."""
        ep = self.ir.exported
        by_placeholder: dict[str, Any] = {}
        buffers: dict[str, torch.Tensor] = {}
        persistent: set[str] = set()
        for spec in ep.graph_signature.input_specs:
            name = spec.arg.name
            if spec.kind is InputKind.BUFFER:
                # the program's own copy, kept across steps: in-place updates (BatchNorm's running
                # statistics) land here, never in the user's module
                if spec.target not in buffers:
                    value = owned_copy(model.get_buffer(spec.target).detach())
                    buffers[spec.target] = distribute_tensor(value, self.operator_mesh, self.layout.of_node(name))
                if spec.persistent:
                    persistent.add(spec.target)
                by_placeholder[name] = buffers[spec.target]
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                value = ep.constants[spec.target]
                if isinstance(value, torch.Tensor):
                    value = distribute_tensor(value, self.operator_mesh, self.layout.of_node(name))
                by_placeholder[name] = value
        return by_placeholder, buffers, persistent

    def _pipeline_parameters(self, pieces: Sequence[StageGraph], canonical: Mapping[str, str]) -> None:
        """Which parameters several stages read (their gradients are summed over pp), and which this rank
        counts in the global norm: each parameter once, on the rank of the first stage reading it (stage 0
        for one no stage reads: stage 0 holds it)."""
        readers: dict[str, list[int]] = {}
        for sid, piece in enumerate(pieces):
            for c in {canonical[n] for n in piece.state if n in canonical}:
                readers.setdefault(c, []).append(sid)
        self._shared = sorted(c for c, k in readers.items() if len(k) > 1)  # the same list on every rank
        first_reader = {info.name: readers.get(info.name, [0])[0] for info in self.ir.params}
        self._counted = sorted(c for c in self._params if first_reader[c] in self.stage_ids)
        # the local gradient shape and dtype of each shared parameter (FSDP's shard under ZeRO), from the
        # pp ranks that hold a copy, for those that hold none (they add zeros to the sum)
        mine = {c: (tuple(self._params[c].to_local().shape), self._params[c].dtype) for c in self._shared if c in self._params}
        self._shared_shapes = {c: v for part in self.schedule.gather(mine) for c, v in part.items()}


class _Boundaries:
    """`boundary(name)`: how the value of node `name` crosses a stage boundary: the placement the plan
    gives it (Partial reduced to Replicate: a partial sum means nothing on another rank), its shape."""

    def __init__(self, gm: torch.fx.GraphModule, layout: Layout, canonical: Mapping[str, str]) -> None:
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.layout, self.canonical = layout, canonical

    def __call__(self, name: str) -> Boundary:
        node = self.nodes[name]
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InputError(f"value {name} crosses a stage boundary but is not a tensor ({type(val).__name__})")
        produced = self.produced(node) or self.layout.replicated
        spec = tuple(Replicate() if p.is_partial() else p for p in produced)
        return Boundary(spec, val.shape)

    def produced(self, node: Node) -> Placements | None:
        """The placement the plan gives the value of `node` (codegen's nodes: the placement they produce,
        written in their arguments); None where the plan says nothing (the sender then replicates it)."""
        if node.op == "call_function" and node.target in (redistribute, as_dtensor):
            return spec_from_str(node.args[1])
        if node.op == "call_function" and node.target is grad_to:
            return self.produced(node.args[0])
        if node.name in self.canonical:
            return self.layout.params[self.canonical[node.name]]
        return self.layout.outputs.get(node.name)


def check_plan(plan: Plan) -> None:
    """Refuse a plan whose pipeline this runtime cannot run, saying why (a plan without pp passes)."""
    t: Training = plan.training
    if t.pp <= 1:
        if "pp" in plan.mesh and plan.axis_size("pp") != 1:
            raise InputError(f"the mesh {dict(plan.mesh)} has a pp axis but training.pp is {t.pp}; plan again")
        return
    problems = []
    if plan.axis_size("pp") != t.pp or next(iter(plan.mesh), None) != "pp":
        problems.append(f"the mesh {dict(plan.mesh)} must have 'pp' as its first axis with size training.pp={t.pp}")
    if not plan.operator_mesh:
        problems.append("the operator mesh (the mesh without pp) is empty; plan the operator part on e.g. {'dp': 1}")
    if t.schedule not in SCHEDULES:
        problems.append(f"schedule {t.schedule!r} is not one of {sorted(SCHEDULES)}")
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
