"""`autoshard.plan`: capture, then search device meshes, solving the ILP on each.

The outer search tries every factorisation of the device count into dp x tp with tp inside one node
(tensor parallelism crossing nodes rarely pays: its collectives sit on the critical path of every
layer). Each mesh is planned by planner.plan_on_mesh; the fastest plan that fits wins and the others
are kept as `plan.alternatives` with the reason each lost.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torch.distributed.tensor import Placement

from autoshard.capture import capture
from autoshard.cost_model import Cluster
from autoshard.errors import InputError
from autoshard.hints import hints_in_graph
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan
from autoshard.report.table import format_count
from autoshard.solver.planner import plan_on_mesh
from autoshard.solver.problem import NoFeasiblePlan
from autoshard.strategies import MeshSpec

__all__ = ["candidate_meshes", "plan", "plan_graph"]

log = logging.getLogger(__name__)

KNOWN_AXES = ("dp", "tp")


def plan(
    model: nn.Module,
    example_inputs: Any,
    cluster: Cluster | str,
    *,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    mesh: Mapping[str, int] | None = None,
    param_placements: Mapping[str, Sequence[Placement]] | None = None,
    time_limit_s: float = 30.0,
) -> Plan:
    """Plan `model` for `cluster`: the fastest predicted training step that fits in memory.

    `example_inputs` is one global batch (meta tensors are fine). `mesh` fixes the axes, e.g.
    `{"dp": 2, "tp": 4}`; without it every dp x tp split is searched. `memory_limit` is bytes per
    device (default: the device's memory). `param_placements` fixes parameters by name pattern
    (a manual strategy such as Megatron's, priced by the same model).
    """
    return plan_graph(
        capture(model, example_inputs),
        cluster,
        optimizer=optimizer,
        memory_limit=memory_limit,
        mesh=mesh,
        param_placements=param_placements,
        time_limit_s=time_limit_s,
    )


def plan_graph(
    ir: GraphIR,
    cluster: Cluster | str,
    *,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    mesh: Mapping[str, int] | None = None,
    param_placements: Mapping[str, Sequence[Placement]] | None = None,
    time_limit_s: float = 30.0,
) -> Plan:
    """`plan` for an already captured graph."""
    cluster = Cluster.parse(cluster) if isinstance(cluster, str) else cluster
    if not isinstance(cluster, Cluster):
        raise InputError(
            f"expected cluster as a Cluster or a string like 'a100-80g:16x8', found {type(cluster).__name__}"
        )
    meshes = [_checked_mesh(mesh, cluster)] if mesh is not None else candidate_meshes(cluster)
    hints = hints_in_graph(ir.exported) if ir.exported is not None else {}
    results: list[Plan] = []
    failures: list[tuple[MeshSpec, NoFeasiblePlan]] = []
    for candidate in meshes:
        log.info("planning %s on mesh %s", ir.model_type, candidate)
        try:
            results.append(
                plan_on_mesh(
                    ir,
                    cluster,
                    candidate,
                    optimizer=optimizer,
                    memory_limit=memory_limit,
                    param_placements=param_placements,
                    hints=hints,
                    time_limit_s=time_limit_s,
                )
            )
        except NoFeasiblePlan as exc:
            failures.append((candidate, exc))
    if not results:
        smallest = min(exc.minimum_memory for _, exc in failures)
        tried = ", ".join(str(m) for m, _ in failures)
        raise NoFeasiblePlan(
            f"no plan of {ir.model_type} fits in {format_count(failures[0][1].memory_limit or 0, unit='B')} "
            f"per device on {cluster} (meshes tried: {tried}); the smallest memory per device that would "
            f"fit is {format_count(smallest, unit='B')}. Use more devices or devices with more memory.",
            minimum_memory=smallest,
            memory_limit=failures[0][1].memory_limit,
        )
    results.sort(key=lambda p: p.predicted.step_time_s)
    best = results[0]
    alternatives = [_alternative(p, best) for p in results[1:]] + [
        {"mesh": dict(m.axes), "reason": f"does not fit: needs at least {format_count(e.minimum_memory, unit='B')}"}
        for m, e in failures
    ]
    return dataclasses.replace(best, alternatives=tuple(alternatives))


def candidate_meshes(cluster: Cluster) -> list[MeshSpec]:
    """dp x tp for every tp that divides both the device count and the devices of one node."""
    n = cluster.num_devices
    per_node = min(cluster.devices_per_node, n)
    meshes = []
    for tp in range(1, per_node + 1):
        if per_node % tp or n % tp or (tp == n and n > 1):
            continue  # tp == n would be the 1-D mesh {"dp": n} again: the solver uses an axis either way
        axes = {"dp": n // tp, "tp": tp}
        meshes.append(MeshSpec.of({k: v for k, v in axes.items() if v > 1} or {"dp": 1}))
    return meshes


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


def _alternative(candidate: Plan, best: Plan) -> dict[str, Any]:
    slower = candidate.predicted.step_time_s / best.predicted.step_time_s - 1
    return {
        "mesh": dict(candidate.mesh),
        "step_time_s": candidate.predicted.step_time_s,
        "peak_memory_bytes": candidate.predicted.peak_memory_bytes,
        "reason": f"{slower:.1%} slower than mesh {dict(best.mesh)}",
    }
