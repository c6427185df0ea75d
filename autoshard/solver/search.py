"""`autoshard.plan`: capture, then search how to run the step, solving operator sharding by ILP.

Two modes:
- the full search (step_search.search_step): dp x tp x pp with tp inside one node (tensor parallelism
  crossing nodes rarely pays: its collectives sit on the critical path of every layer), micro-batch
  size, pipeline schedule, ZeRO stage and recomputation. It runs unless the caller pins an operator
  mesh without pp and none of the step decisions;
- operator sharding alone on a given mesh {dp, tp} (`mesh=` and nothing else): the ILP on the whole
  mesh at the given batch in one micro-batch, parameters free to shard over dp as well. Tests and
  manual strategies (`param_placements`) use it; it is exact for what it covers.
The full search keeps the configurations that lost as `plan.alternatives`, with the reason each lost.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.distributed.tensor import Placement

from autoshard.capture import capture
from autoshard.cost_model import Cluster
from autoshard.errors import InputError
from autoshard.hints import hints_in_graph
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import PRECISIONS, RECOMPUTE, SCHEDULES, Plan
from autoshard.report.table import format_count
from autoshard.solver.planner import plan_on_mesh
from autoshard.solver.step_search import Fixed, check_dp_divides_batch, search_step
from autoshard.solver.problem import NoFeasiblePlan
from autoshard.strategies import MeshSpec

__all__ = ["plan", "plan_graph"]

log = logging.getLogger(__name__)

KNOWN_AXES = ("pp", "dp", "tp")


def plan(
    model: nn.Module,
    example_inputs: Any,
    cluster: Cluster | str,
    *,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    mesh: Mapping[str, int] | None = None,
    param_placements: Mapping[str, Sequence[Placement]] | None = None,
    time_limit_s: float | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    recompute: str | None = None,
    schedule: str | None = None,
    micro_batch_size: int | None = None,
    progress: bool | Callable[[str], None] = False,
    loss_reduction: str | None = None,
) -> Plan:
    """Plan `model` for `cluster`: the fastest predicted training step that fits in memory.

    `example_inputs` is one global batch (meta tensors are fine), batched along dim 0. `mesh` fixes
    the axes, e.g. `{"pp": 4, "dp": 2, "tp": 8}`; without it every dp x tp x pp split is searched.
    `zero_stage` (0-3), `recompute` ("none", "selective", "full"), `schedule` ("gpipe", "1f1b",
    "interleaved-1f1b") and `micro_batch_size` (per replica) pin those decisions; otherwise the
    search makes them. `precision` is "bf16-mixed" (default on GPU clusters) or "fp32" (default on
    cpu). `memory_limit` is bytes per device (default: the device's memory). `param_placements`
    fixes parameters by name pattern (a manual strategy such as Megatron's, priced by the same
    model). `progress=True` prints what the search is doing to stderr (or pass a callable).
    `loss_reduction` ("mean" or "sum") declares how the loss reduces the batch where the graph cannot
    tell (capture/loss_reduction.py); a loss of unknown reduction is planned without the splits that
    would change it.
    """
    return plan_graph(
        capture(model, example_inputs, loss_reduction=loss_reduction),
        cluster,
        optimizer=optimizer,
        memory_limit=memory_limit,
        mesh=mesh,
        param_placements=param_placements,
        time_limit_s=time_limit_s,
        precision=precision,
        zero_stage=zero_stage,
        recompute=recompute,
        schedule=schedule,
        micro_batch_size=micro_batch_size,
        progress=progress,
    )


def plan_graph(
    ir: GraphIR,
    cluster: Cluster | str,
    *,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    mesh: Mapping[str, int] | None = None,
    param_placements: Mapping[str, Sequence[Placement]] | None = None,
    time_limit_s: float | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    recompute: str | None = None,
    schedule: str | None = None,
    micro_batch_size: int | None = None,
    progress: bool | Callable[[str], None] = False,
) -> Plan:
    """`plan` for an already captured graph."""
    plan = _plan_graph(
        ir, cluster, optimizer=optimizer, memory_limit=memory_limit, mesh=mesh, param_placements=param_placements,
        time_limit_s=time_limit_s, precision=precision, zero_stage=zero_stage, recompute=recompute,
        schedule=schedule, micro_batch_size=micro_batch_size, progress=progress,
    )  # fmt: skip
    reduction = ir.loss.reduction if ir.loss is not None else None
    if reduction is None:
        return plan
    return dataclasses.replace(plan, training=dataclasses.replace(plan.training, loss_reduction=reduction.describe()))


def _plan_graph(
    ir: GraphIR,
    cluster: Cluster | str,
    *,
    optimizer: str,
    memory_limit: float | None,
    mesh: Mapping[str, int] | None,
    param_placements: Mapping[str, Sequence[Placement]] | None,
    time_limit_s: float | None,
    precision: str | None,
    zero_stage: int | None,
    recompute: str | None,
    schedule: str | None,
    micro_batch_size: int | None,
    progress: bool | Callable[[str], None],
) -> Plan:
    cluster = Cluster.parse(cluster) if isinstance(cluster, str) else cluster
    if not isinstance(cluster, Cluster):
        raise InputError(
            f"expected cluster as a Cluster or a string like 'a100-80g:16x8', found {type(cluster).__name__}"
        )
    precision = _checked_choice("precision", precision, PRECISIONS) or (
        "fp32" if cluster.hardware.name == "cpu" else "bf16-mixed"
    )
    _checked_choice("recompute", recompute, RECOMPUTE)
    _checked_choice("schedule", schedule, SCHEDULES)
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        raise InputError(f"expected zero_stage 0, 1, 2 or 3, found {zero_stage!r}")
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
        raise InputError(f"expected micro_batch_size a positive int, found {micro_batch_size!r}")
    step_decisions = (zero_stage, recompute, schedule, micro_batch_size)
    if mesh is None or "pp" in mesh or any(d is not None for d in step_decisions):
        if mesh is not None:
            _checked_mesh(mesh, cluster)
        return search_step(
            ir,
            cluster,
            optimizer=optimizer,
            memory_limit=memory_limit,
            precision=precision,
            fixed=Fixed(mesh=mesh, zero_stage=zero_stage, recompute=recompute, schedule=schedule,
                        micro_batch_size=micro_batch_size),
            param_placements=param_placements,
            time_limit_s=time_limit_s,
            progress=progress,
        )
    operator_mesh = _checked_mesh(mesh, cluster)
    if ir.step_hints:
        hinted = ", ".join(f"{' and '.join(e)} on {path or 'the model'}" for path, e in ir.step_hints.items())
        raise InputError(
            f"the {hinted} hint(s) cannot be honoured on the operator-only mesh {dict(mesh)}: such a plan "
            "shards operators alone, with one micro-batch, no pipeline stages and no recomputation. Add a "
            "'pp' axis to the mesh (or pin a step decision such as recompute=...), leave the mesh to the "
            "search, or remove the hints"
        )
    if ir.batch_size is not None:
        check_dp_divides_batch(ir.batch_size, mesh)
    if ir.loss is not None and ir.loss.reduction is not None:  # one micro-batch: only dp splits the batch
        ir.loss.reduction.check_split(dp=mesh.get("dp", 1), pp=1, micro_batches=1)
    log.info("planning %s on mesh %s", ir.model_type, operator_mesh)
    try:
        return plan_on_mesh(
            ir,
            cluster,
            operator_mesh,
            optimizer=optimizer,
            memory_limit=memory_limit,
            param_placements=param_placements,
            hints=hints_in_graph(ir.exported) if ir.exported is not None else {},
            time_limit_s=time_limit_s,
            precision=precision,
        )
    except NoFeasiblePlan as exc:
        raise NoFeasiblePlan(
            f"no plan of {ir.model_type} fits in {format_count(exc.memory_limit or 0, unit='B')} per device on "
            f"{cluster} (mesh {operator_mesh}); the smallest memory per device that would fit is "
            f"{format_count(exc.minimum_memory, unit='B')}. Use more devices or devices with more memory, or "
            "leave the mesh to the search (it can add ZeRO, recomputation and pipeline stages).",
            minimum_memory=exc.minimum_memory,
            memory_limit=exc.memory_limit,
        ) from exc


def _checked_choice(name: str, value: str | None, allowed: Sequence[str]) -> str | None:
    if value is not None and value not in allowed:
        raise InputError(f"expected {name} among {list(allowed)}, found {value!r}")
    return value


def _checked_mesh(mesh: Mapping[str, int], cluster: Cluster) -> MeshSpec:
    if not isinstance(mesh, Mapping) or not mesh:
        raise InputError(f"expected mesh as a mapping of axis name to size, e.g. {{'dp': 2, 'tp': 4}}, found {mesh!r}")
    unknown = [a for a in mesh if a not in KNOWN_AXES]
    if unknown:
        raise InputError(f"unknown mesh axes {unknown}; expected names from {list(KNOWN_AXES)}")
    total = 1
    for axis, size in mesh.items():
        if not isinstance(size, int) or size < 1:
            raise InputError(f"mesh axis {axis!r} has size {size!r}; expected a positive int")
        total *= size
    if total != cluster.num_devices:
        raise InputError(
            f"mesh {dict(mesh)} has {total} devices; the cluster {cluster} has {cluster.num_devices}. "
            "Make the axis sizes multiply to the device count."
        )
    return MeshSpec.of(mesh)
