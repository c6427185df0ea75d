"""`autoshard.compile`: capture, plan and shard a model over the current process group.

Every rank runs the same script: `autoshard.compile(model, example_inputs)` captures the model, plans it
on rank 0 (or takes the given plan), checks the plan against the graph and the loss, and returns the
CompiledModel that runs it (runtime/model.py): one runtime for every plan, pipelined or not.
`compiled(*inputs)` runs forward, `compiled.step(*inputs)` runs forward and backward, leaving the
gradients on the DTensor parameters for the user's optimizer (runtime/module.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoshard.capture import capture
from autoshard.capture.calls import as_call
from autoshard.cost_model import Cluster
from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan
from autoshard.runtime.micro_batches import first_micro_batch
from autoshard.runtime.model import CompiledModel
from autoshard.runtime.module import optimizer_factory
from autoshard.runtime.world import DEFAULT_TIMEOUT_S, ensure_process_group
from autoshard.strategies._dtensor import outside_local_tensor_mode

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
    torch_compile: bool = False,
    **optimizer_kwargs: Any,
) -> CompiledModel:
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

    Example inputs may be the global batch or one micro-batch of every replica (the graph is captured
    for the latter: a global batch is cut to its first); `step` takes the global batch. A plan with
    pipeline stages (`plan.training.pp > 1`) takes no `loss_fn`: its loss must be the model's own.

    With no process group, one is started (runtime/world.py): torchrun's, or a one-process group, with a
    collective timeout of `timeout_s`.

    A model built on the meta device (too big for one device) needs `seed`: only each rank's shards are
    materialised, equal to the model built on cpu after `torch.manual_seed(seed)` (runtime/materialize.py).

    `torch_compile=True` runs the generated program through `torch.compile` (backend "aot_eager"):
    AOTAutograd traces DTensor's dispatch once into local ops and collectives, so the steps after the
    first skip it (runtime/stage.py). The first step pays the tracing (seconds). Plans with ZeRO or
    recomputation are refused: FSDP2's hooks run inside the program, and torch 2.13's AOTAutograd
    fails on the checkpointed blocks.
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
    return CompiledModel(
        model, ir, plan, optimizer=optimizer, lr=lr, loss_fn=loss_fn, seed=seed, torch_compile=torch_compile,
        **optimizer_kwargs,
    )


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
