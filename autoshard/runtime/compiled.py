"""CompiledModel: a plan run as DTensor training on the current process group.

Every rank runs the same script: `autoshard.compile(model, example_inputs)` captures the model, plans it
(or takes the given plan), generates the DTensor graph (passes/codegen.py), builds the DeviceMesh the plan
names and shards the parameters as planned. `compiled(*inputs)` runs forward, `compiled.step(*inputs)`
runs forward and backward (DTensor autograd), leaving the gradients on the DTensor parameters for the
user's optimizer (runtime/module.py).

A model with values is sharded from its full CPU tensors with `distribute_tensor` (rank 0's values are
scattered, so ranks that initialised differently still agree). A model built on meta is materialised
shard by shard from its own initialisation and a seed (runtime/materialize.py): no rank ever holds it.
Inputs are the global batch, passed identically on every rank, and distributed per the plan
(the batch split over dp, typically).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.export.graph_signature import InputKind, OutputKind

from autoshard.capture import capture
from autoshard.capture.calls import as_call, flatten_call
from autoshard.capture.loss_reduction import loss_reduction_of
from autoshard.cost_model import Cluster
from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan
from autoshard.passes.codegen import codegen, use_mesh
from autoshard.runtime.materialize import materialize_shards
from autoshard.runtime.precision import autocast
from autoshard.runtime.world import DEFAULT_TIMEOUT_S, ensure_process_group
from autoshard.runtime.micro_batches import BatchLayout, first_micro_batch, split_micro_batches
from autoshard.runtime.fsdp import (
    ProgramScope,
    before_micro_batch,
    check_zero_mesh,
    full_value,
    replicated_over_dp,
    scoped_program,
    shard_with_fsdp,
    unread_parameters,
)
from autoshard.runtime.module import ShardedModule, as_float, build_mesh, optimizer_factory, owned_copy, param_spec
from autoshard.strategies._dtensor import outside_local_tensor_mode
from autoshard.strategies.mesh import spec_from_str

if TYPE_CHECKING:
    from autoshard.runtime.comm import CommReport
    from autoshard.runtime.pipeline import PipelinedModel

__all__ = ["CompiledModel", "compile"]

def compile(  # noqa: A001 - `autoshard.compile` mirrors `torch.compile`
    model: nn.Module,
    example_inputs: Any,
    *,
    plan: Plan | None = None,
    cluster: Cluster | str | None = None,
    mesh: Mapping[str, int] | None = None,
    optimizer: str = "sgd",
    lr: float = 1e-3,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    loss_reduction: str | None = None,
    seed: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **optimizer_kwargs: Any,
) -> CompiledModel | PipelinedModel:
    """Capture, plan (unless `plan` is given), generate code and shard `model` over the process group.

    `cluster` defaults to `"cpu:<world size>"`; `mesh` fixes the axes as in `autoshard.plan`. A plan solved
    here is solved on rank 0 alone and sent to every rank, so all run the same one. `example_inputs` is what the model is called
    with: a tuple of positional arguments, a dict of keyword arguments (`{"input_ids": ..., "labels":
    ...}`), or a tensor; `train_step` and the forward take the same. The loss is found among the
    model's outputs (a scalar output, a ModelOutput's `.loss`, the single scalar of a tuple;
    capture/calls.py); `loss_fn(*outputs)` overrides that, turning the outputs into the scalar loss.
    How the loss reduces the batch is read from the graph (capture/loss_reduction.py: a token mean over
    non-ignored labels, a mean, a sum, sum / count), and a step over micro-batches and ranks computes
    the loss and gradients of the whole global batch; where it cannot be read (a `loss_fn`, a sum of
    two terms), `loss_reduction="mean"` or `"sum"` declares it, else the splits that could change it
    are refused.

    A plan with pipeline stages (`plan.training.pp > 1`) returns a `PipelinedModel` (runtime/pipeline.py): its
    example inputs are one micro-batch (the global batch is cut to its first), `train_step` takes the global batch.

    With no process group, one is started (runtime/world.py): torchrun's, or a one-process group, with a
    collective timeout of `timeout_s`.

    A model built on the meta device (too big for one device) needs `seed`: only each rank's shards are
    materialised, equal to the model built on cpu after `torch.manual_seed(seed)` (runtime/materialize.py).
    """
    optimizer_factory(optimizer, lr)  # a bad name is refused before anything is captured or planned
    ensure_process_group(timeout_s)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and seed is None:
        raise InputError(
            f"expected seed=... for a model on the meta device ({len(meta)} meta parameters, first: {meta[0]}); "
            "its shards are initialised as the model built on cpu after torch.manual_seed(seed) would be, "
            "and every rank must use the same seed"
        )
    call = as_call(example_inputs)
    world = dist.get_world_size()
    how_loss = {"loss_reduction": loss_reduction, "loss_in_graph": loss_fn is None}
    if plan is None:
        from autoshard.solver.search import plan_graph

        with outside_local_tensor_mode():  # capture is pure tracing, on fake tensors, whatever the world
            full = capture(model, call.args, call.kwargs, **how_loss)
        _check_loss(full, loss_fn)  # before planning: a model whose loss cannot be found is refused at once
        plan = _planned_on_rank_0(lambda: plan_graph(full, cluster or f"cpu:{world}", mesh=mesh, optimizer=optimizer))
    # a plan is made for one micro-batch of every replica: global-batch example inputs are cut to it
    args, kwargs = first_micro_batch((call.args, dict(call.kwargs)), plan)
    with outside_local_tensor_mode():
        ir = capture(model, args, kwargs, **how_loss)
    plan.check_graph(ir)
    _check_loss(ir, loss_fn)
    t = plan.training
    if ir.loss is not None and ir.loss.reduction is not None:  # a plan made elsewhere may split what it must not
        ir.loss.reduction.check_split(dp=plan.axis_size("dp"), pp=t.pp, micro_batches=t.num_micro_batches)
    if batch_norms := ir.train_batch_norms():
        from autoshard.solver.step_search import refuse_micro_batches

        refuse_micro_batches(batch_norms, t.pp, t.num_micro_batches)
    if plan.training.pp > 1:
        return _pipelined(model, ir, plan, optimizer=optimizer, lr=lr, loss_fn=loss_fn, seed=seed, **optimizer_kwargs)
    return CompiledModel(
        model, ir, plan, optimizer=optimizer, lr=lr, loss_fn=loss_fn, seed=seed, **optimizer_kwargs
    )


def _pipelined(
    model: nn.Module, ir: GraphIR, plan: Plan, *, loss_fn: Callable[..., Any] | None, seed: int | None, **kwargs: Any
) -> PipelinedModel:
    if loss_fn is not None or seed is not None:
        raise InputError(
            "a pipelined plan (training.pp > 1) takes neither loss_fn nor seed yet: the model must return its loss "
            "and be built on cpu"
        )
    from autoshard.runtime.pipeline import PipelinedModel

    return PipelinedModel(model, ir, plan, **kwargs)


def _check_loss(ir: GraphIR, loss_fn: Callable[..., Any] | None) -> None:
    """Refuse a model whose loss cannot be found among its outputs (unless `loss_fn` says how)."""
    if loss_fn is None and ir.loss is not None and ir.loss.index is None:
        raise InputError(
            f"expected the model to return its loss (a scalar, a ModelOutput or dict with `loss`, or a tuple "
            f"holding one scalar); found {ir.loss.found}: {ir.loss.how}; return the loss (e.g. pass the labels), "
            "or pass loss_fn=lambda *outputs: ... to autoshard.compile"
        )


def _planned_on_rank_0(make_plan: Callable[[], Plan]) -> Plan:
    """The plan `make_plan` solves on rank 0, sent to every rank.

    Only rank 0 plans: the solver is deterministic, so the other ranks would spend the same CPU on the
    same answer (on a shared host they slow rank 0 down), and one plan sent to all makes "every rank runs
    the same program" a guarantee. A refusal on rank 0 (an InputError: no plan fits, a hint cannot be
    met) is raised on every rank with the same message, so no rank waits forever for a plan."""
    if dist.get_world_size() == 1:
        return make_plan()
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("plan", make_plan().to_json())]
        except InputError as exc:
            box = [("refused", str(exc))]
            dist.broadcast_object_list(box, src=0)
            raise
        except BaseException as exc:
            box = [("failed", f"{type(exc).__name__}: {exc}")]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]  # type: ignore[misc]
    if kind == "plan":
        return Plan.from_json(payload)
    if kind == "refused":
        raise InputError(payload)
    raise RuntimeError(f"planning failed on rank 0 ({payload}); see rank 0's traceback")


class CompiledModel(ShardedModule):
    """A model sharded per `plan`: an nn.Module under the model's names (runtime/module.py), with
    forward, step, train_step, clip_grad_norm_ and full_state_dict."""

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
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self._training = t = plan.training
        self.plan = plan
        self.ir = ir
        self.loss_fn = loss_fn
        self.mesh = build_mesh(plan)
        # ZeRO runs as FSDP2 (runtime/fsdp.py): the program takes parameters replicated over dp (FSDP
        # stores the shards and gathers them), and recomputation is applied when the blocks are outlined
        run_plan = plan
        if t.zero_stage:
            check_zero_mesh(plan.mesh, t.zero_stage)
            if t.zero_stage == 3:
                run_plan = replicated_over_dp(plan)
            run_plan = dataclasses.replace(run_plan, training=dataclasses.replace(t, recompute=()))
        self._hold(graph_module=codegen(ir, run_plan, device=self.mesh.device_type))
        self._decisions = {d.node: d for d in plan.nodes}
        self._names: dict[str, tuple[str, ...]] = {}  # canonical parameter name -> every name (tied weights)
        self._params: dict[str, nn.Parameter] = {}  # by canonical name, as the program reads them
        unread = unread_parameters(ir)  # replicated, held by the program, in the state dict (runtime/fsdp.py)
        specs = {
            info.name: param_spec(
                info.name,
                plan.replicated_spec() if info.name in unread
                else run_plan.params.get(info.name) or self._placement_of(info.nodes[0] if info.nodes else ""),
            )
            for info in ir.params
        }
        if any(p.is_meta for p in model.parameters()):
            if seed is None:
                raise InputError("expected seed=... for a model on the meta device; see autoshard.compile")
            shards = materialize_shards(model, self.mesh, specs, seed=seed, owned=owned_copy)
        else:
            shards = {
                name: distribute_tensor(owned_copy(model.get_parameter(name).detach()), self.mesh, spec)
                for name, spec in specs.items()
            }
        for info in ir.params:
            self._params[info.name] = nn.Parameter(
                shards[info.name], requires_grad=model.get_parameter(info.name).requires_grad
            )
            self._names[info.name] = info.names
        self._program_buffers: dict[str, torch.Tensor] = {}  # by the model's buffer name
        self._persistent: set[str] = set()
        self._signature = self._placeholder_sources(model, ir)
        # the model's own outputs among the graph's (in-place buffer updates may be outputs too)
        self._user_outputs = [
            i for i, o in enumerate(ir.exported.graph_signature.output_specs) if o.kind is OutputKind.USER_OUTPUT
        ]
        self._batch = BatchLayout.of(ir, plan)  # which inputs carry the batch, and the rows the plan runs
        self._reduction = loss_reduction_of(ir)
        self._make_builtin = optimizer_factory(optimizer, lr, **optimizer_kwargs)

        self.program: ProgramScope | None = None  # the program as FSDP2 modules, under ZeRO
        self.fsdp: list[FSDPModule] = []
        if t.zero_stage:
            program = scoped_program(self.graph_module, ir, t, self._params)
            self._hold(program=program, fsdp=shard_with_fsdp(program, program.blocks(), self.mesh, t.zero_stage))
            self._params = {c: program.parameter(c) for c in self._params}  # FSDP's shards
        # last: the model's names must not meet an attribute set after them. Under ZeRO these are FSDP's
        # dp shards, so an optimizer over them keeps its state sharded with them
        self._adopt(self._names, self._params, self._program_buffers, self._persistent)

    # ---- running ------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Forward on one micro-batch of every replica (the global batch when the plan runs one), called
        as the model is; the model's outputs come back as full (unsharded) tensors, in the model's own
        structure (a ModelOutput, a tuple, a tensor)."""
        if not self.training and (ops := self.ir.train_mode_ops()):
            raise InputError(
                f"expected a model whose forward is the same in eval mode, found {len(ops)} node(s) that "
                f"compute otherwise there ({', '.join(ops[:3])}: dropout or BatchNorm, captured in training "
                "mode); evaluate the single-device model on the exported weights "
                "(autoshard.export_checkpoint), or call model.train() for a training-mode forward"
            )
        inputs = self._flat(args, kwargs)
        self._batch.check(inputs, entry="forward", micro_batches=1)
        with torch.no_grad(), self._autocast():
            outputs = self._run(inputs)
        full = [o.full_tensor() if isinstance(o, DTensor) else o for o in outputs]
        if self.loss_fn is None and self.ir.loss is not None and self.ir.loss.index is not None:
            i = self.ir.loss.index  # the graph returns the loss's numerator (capture/loss_reduction.py)
            full[i] = full[i] / self._reduction.denominator([inputs])
        return torch.utils._pytree.tree_unflatten([full[i] for i in self._user_outputs], self.ir.exported.call_spec.out_spec)

    def _forward_backward(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        return self._step(self._flat(args, kwargs))

    def comm_report(self, *args: Any, **kwargs: Any) -> CommReport:
        """Run one training step (it updates the parameters) and return the collectives it issued next to
        the plan's, per phase, kind and mesh axis (`print(report)` shows the table)."""
        from autoshard.runtime.comm import measure_comm

        return measure_comm(self, *self._flat(args, kwargs))

    def _flat(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """A call as the graph's flat user inputs (capture/calls.py refuses a call of another shape)."""
        return flatten_call(self.ir.exported, args, kwargs)

    def _loss(self, outputs: Sequence[Any]) -> Any:
        if self.loss_fn is not None:
            return self.loss_fn(*(outputs[i] for i in self._user_outputs))
        return outputs[self.ir.loss.index if self.ir.loss is not None and self.ir.loss.index is not None else 0]

    def _step(self, inputs: Sequence[Any], *, phase: Callable[[str], ContextManager[None]] | None = None) -> float:
        """`step`, with `phase(name)` entered around forward and backward (so communication accounting
        can attribute each collective to its phase)."""
        phase = phase or (lambda _name: contextlib.nullcontext())
        chunks = split_micro_batches(inputs, self._batch)
        # each micro-batch's loss is a numerator over the global batch's denominator (the count of its
        # real labels, its elements, 1 for a sum), so the accumulated gradients are the global batch's
        denominator = self._reduction.denominator(chunks)
        total = 0.0
        for k, chunk in enumerate(chunks):  # gradient accumulation: one backward per micro-batch
            if self.fsdp:  # when FSDP gathers, frees and reduce-scatters (ZeRO's stage)
                before_micro_batch(self.fsdp, self._training.zero_stage, last=k == len(chunks) - 1)
            with phase("forward"), self._autocast():
                outputs = self._run(chunk)
                loss = self._loss(outputs)
            if loss.numel() != 1:
                raise InputError(
                    f"expected a scalar loss, found shape {tuple(loss.shape)}; "
                    "pass loss_fn=... to autoshard.compile, or return the loss from the model"
                )
            loss = loss / denominator if denominator != 1 else loss
            with phase("backward"):
                loss.backward()
            value = loss.full_tensor() if isinstance(loss, DTensor) else loss
            total += as_float(value.detach())
        with phase("backward"):
            self._settle_gradients()
        return total

    def _autocast(self) -> ContextManager[Any]:
        return autocast(self._training.precision, self.mesh.device_type)

    def _run(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        if len(inputs) != len(self._user_inputs):
            raise InputError(
                f"expected {len(self._user_inputs)} inputs ({', '.join(self._user_inputs)}), found {len(inputs)}; "
                "pass the same arguments as the example inputs given to autoshard.compile"
            )
        by_name = dict(zip(self._user_inputs, inputs, strict=True))
        values = {}
        for name, kind, source in self._signature:
            if kind == "parameter":
                values[name] = self._params[source]
            elif kind == "buffer":
                values[name] = self._program_buffers[source]
            elif kind == "tensor":
                values[name] = self._distribute(name, source)
            else:
                values[name] = self._distribute(name, by_name[name])
        with use_mesh(self.mesh):
            if self.program is not None:  # FSDP2 modules: they read their own parameters
                out = self.program(values)
            else:
                out = self.graph_module(*values.values())
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _distribute(self, node: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
            return value
        return distribute_tensor(value, self.mesh, spec_from_str(self._placement_of(node)))

    # ---- inspection -----------------------------------------------------------------------------------

    @property
    def code(self) -> str:
        """The generated program's Python source, with the collectives of each redistribution as comments
        (under ZeRO, each block's source follows the program's)."""
        return self.program.code() if self.program is not None else self.graph_module.code

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
        """Unsharded parameters under every name the model uses (tied weights appear under each), and
        the persistent buffers (BatchNorm's running statistics, as training has updated them): the keys
        of the model's own `state_dict()`."""
        out: dict[str, torch.Tensor] = {}
        for canonical, p in self._params.items():
            full = full_value(p.detach())
            for name in self._names[canonical]:
                out[name] = full
        for name, b in self._program_buffers.items():
            if name in self._persistent:
                out[name] = full_value(b.detach())
        return out

    # ---- setup helpers -----------------------------------------------------------------------------------

    def _placement_of(self, node: str) -> str:
        d = self._decisions.get(node)
        if d is None or not d.output or d.output[0] is None:
            return self.plan.replicated_spec()
        return d.output[0]

    def _placeholder_sources(self, model: nn.Module, ir: GraphIR) -> list[tuple[str, str, Any]]:
        """(placeholder, kind, source) in graph order: a parameter's canonical name, a buffer or constant
        tensor, or a user input's name."""
        canonical = {n: info.name for info in ir.params for n in info.nodes}
        ep = ir.exported
        out: list[tuple[str, str, Any]] = []
        self._user_inputs: list[str] = []
        for spec in ep.graph_signature.input_specs:
            name = spec.arg.name
            if spec.kind is InputKind.PARAMETER:
                out.append((name, "parameter", canonical[name]))
            elif spec.kind is InputKind.BUFFER:
                # the program's own copy, kept across steps: in-place updates (BatchNorm's running
                # statistics) land here, never in the user's module
                if spec.target not in self._program_buffers:
                    value = owned_copy(model.get_buffer(spec.target).detach())
                    self._program_buffers[spec.target] = distribute_tensor(value, self.mesh, spec_from_str(self._placement_of(name)))
                    if spec.persistent:
                        self._persistent.add(spec.target)
                out.append((name, "buffer", spec.target))
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                out.append((name, "tensor", ep.constants[spec.target]))
            else:
                out.append((name, "input", None))
                self._user_inputs.append(name)
        return out
