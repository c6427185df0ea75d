"""Plan one captured graph on one mesh: options -> prices -> ILP -> Plan.

Steps, each a function below:
1. fold identical repeated blocks (blocks.fold_blocks): the ILP sees one block with multiplicity L;
2. list every unit's options (strategies.node_options) and which of them hints and defaults allow:
   graph inputs batch-sharded over dp, parameters matching `param_placements`, hint nodes matching
   their hint;
3. price options and edges (pricing.Pricer) into an ILP Problem;
4. solve, then expand the representative choices back to every node and edge of the graph.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard
from torch.fx import Node

from autoshard.cost_model import Cluster
from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR, NodeInfo, NodeKind, ParamInfo, TensorMeta
from autoshard.ir.plan import NodeDecision, Plan, PlannedCollective, Prediction, SolverStats, Training
from autoshard.solver.axis_choices import AxisChoices
from autoshard.solver.blocks import FoldedEdge, FoldedGraph, fold_blocks, repeated_blocks, unit_of
from autoshard.solver.followers import Follow, find_followers, resolve
from autoshard.solver.ilp import solve
from autoshard.solver.pricing import OptionPrice, Pricer, producer_output_index
from autoshard.solver.problem import EdgeCosts, NodeChoices, Problem
from autoshard.strategies import _dtensor
from autoshard.strategies.fused_split import is_sharded
from autoshard.strategies import CommStep, MeshSpec, ShardingOption, Spec, node_options, spec_str

__all__ = ["plan_on_mesh"]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Unit:
    """One ILP node: a computation, a graph input, or a parameter (all its tied placeholders)."""

    name: str
    info: NodeInfo  # the (first) graph node of the unit
    param: ParamInfo | None
    options: tuple[ShardingOption, ...]
    prices: tuple[OptionPrice, ...]
    output_costs: tuple[float, ...]  # bringing a graph output to Replicate, per option
    allowed: frozenset[int] | None


def plan_on_mesh(
    ir: GraphIR,
    cluster: Cluster,
    mesh: MeshSpec,
    *,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    param_placements: Mapping[str, Sequence[Placement]] | None = None,
    hints: Mapping[str, object] | None = None,
    fold: bool = True,
    time_limit_s: float | None = None,
    precision: str = "fp32",
    dp_params: str | None = None,
    keep: AxisChoices | None = None,
) -> Plan:
    """The cheapest plan for `ir` on `mesh` that fits `memory_limit` bytes per device.

    `dp_params` pins what parameters do on the dp axis when ZeRO is decided outside the ILP:
    "replicate" (data parallelism, ZeRO 0-2) or "shard" (ZeRO 3: stored split, gathered at use);
    None leaves it to the ILP. `keep` holds the placements of one axis already decided (the step
    search's replica plan): each node keeps them where it can (solver/axis_choices.py)."""
    if ir.exported is None:
        raise InputError("this GraphIR has no exported program; capture the model with autoshard.capture")
    with _dtensor.outside_local_tensor_mode():
        return _plan_on_mesh(ir, cluster, mesh, optimizer, memory_limit, param_placements, hints, fold,
                             time_limit_s, precision, dp_params, keep)


def _plan_on_mesh(
    ir: GraphIR,
    cluster: Cluster,
    mesh: MeshSpec,
    optimizer: str,
    memory_limit: float | None,
    param_placements: Mapping[str, Sequence[Placement]] | None,
    hints: Mapping[str, object] | None,
    fold: bool,
    time_limit_s: float | None,
    precision: str,
    dp_params: str | None,
    keep: AxisChoices | None,
) -> Plan:
    start = time.perf_counter()
    limit = float(memory_limit if memory_limit is not None else cluster.hardware.hbm_bytes)
    pricer = Pricer(cluster=cluster, mesh=mesh, optimizer=optimizer, precision=precision)
    fx_nodes = {n.name: n for n in ir.exported.graph.nodes}
    folded = fold_blocks(ir, fold=fold)
    units = _units(ir, folded, fx_nodes, pricer, mesh, param_placements or {}, hints or {}, dp_params, keep)
    follows = _followers(folded, units, fx_nodes)
    costs = {name: [p.compute_s + o for p, o in zip(u.prices, u.output_costs)] for name, u in units.items()}
    memory = {name: [p.memory_bytes for p in u.prices] for name, u in units.items()}
    edge_price = _EdgePricer(units, fx_nodes, pricer)
    for name, f in follows.items():  # a follower's cost, memory and input edge ride on its leader
        for i in range(len(units[f.leader].options)):
            j = f.options[i]
            src_option = _option_under(f.edge.src, f.leader, i, follows)
            costs[f.leader][i] += costs[name][j] + edge_price(f.edge, src_option, j)
            memory[f.leader][i] += memory[name][j]
    edges = _edges(folded, units, follows, edge_price, costs)
    problem = Problem(
        nodes=tuple(
            NodeChoices(
                name=name,
                costs=tuple(costs[name]),
                memory=tuple(memory[name]),
                multiplicity=folded.multiplicity[name],
                allowed=units[name].allowed,
            )
            for name in units
            if name not in follows
        ),
        edges=tuple(
            EdgeCosts(src=src, dst=dst, costs=matrix, multiplicity=m) for (src, dst, m), matrix in edges
        ),
        memory_limit=limit,
    )
    solution = solve(problem, time_limit_s=time_limit_s, started=start)  # the limit covers the pricing too
    index = dict(solution.choices)
    for name, f in follows.items():  # topological: a leader is decided before its followers
        index[name] = f.options[index[f.leader]]
    choice = {name: units[name].options[i] for name, i in index.items()}
    return _expand(
        ir,
        cluster,
        mesh,
        optimizer,
        limit,
        folded,
        units,
        choice,
        fx_nodes,
        pricer,
        stats=SolverStats(
            status=solution.status,
            gap=solution.gap,
            seconds=solution.seconds,
            total_seconds=time.perf_counter() - start,
            objective_s=solution.objective,
            variables=solution.num_variables,
            constraints=solution.num_constraints,
            folded_blocks=dict(folded.blocks),
        ),
    )


# ---- units and their options -------------------------------------------------------------------


def _units(
    ir: GraphIR,
    folded: FoldedGraph,
    fx_nodes: Mapping[str, Node],
    pricer: Pricer,
    mesh: MeshSpec,
    param_placements: Mapping[str, Sequence[Placement]],
    hints: Mapping[str, object],
    dp_params: str | None = None,
    keep: AxisChoices | None = None,
) -> dict[str, _Unit]:
    params = {p.name: p for p in ir.params}
    first_node: dict[str, NodeInfo] = {}
    unit_names = unit_of(ir)
    for node in ir.nodes:
        if node.name in unit_names:
            first_node.setdefault(unit_names[node.name], node)
    output_sources = _graph_output_sources(ir)
    # parameters the dp axis runs data-parallel (ZeRO decided outside): those the user did not pin
    data_parallel = dp_params is not None and "dp" in mesh.names
    whole_on_dp = {
        n for p in ir.params for n in p.nodes
        if not any(fnmatch.fnmatchcase(name, pattern) for name in p.names for pattern in param_placements)
    } if data_parallel else set()
    units: dict[str, _Unit] = {}
    for name in folded.units:
        info = first_node[name]
        param = params.get(name)
        options = tuple(node_options(fx_nodes[info.name], mesh))
        if keep is not None:
            options = keep.narrow(info.name, options, mesh)
        if data_parallel and param is None:
            options = _whole_params_on_dp(options, fx_nodes[info.name], whole_on_dp, mesh.names.index("dp"))
        if param is not None:
            trainable = info.requires_grad
            prices = tuple(pricer.parameter(param.meta, o.output[0], trainable=trainable) for o in options)
            allowed = _param_allowed(param, options, param_placements, mesh)
            if dp_params is not None and "dp" in mesh.names:
                allowed = _dp_param_allowed(options, allowed, mesh.names.index("dp"), dp_params)
        else:
            prices = tuple(pricer.computation(info, o) for o in options)
            allowed = None
            if info.kind is NodeKind.INPUT:
                allowed = _input_allowed(info, options, mesh)
            elif info.name in hints:
                allowed = _hint_allowed(info, options, hints[info.name], mesh)
        output_costs = tuple(
            _to_replicate_cost(pricer, info, o) if info.name in output_sources else 0.0 for o in options
        )
        units[name] = _Unit(
            name=name,
            info=info,
            param=param,
            options=options,
            prices=prices,
            output_costs=output_costs,
            allowed=allowed,
        )
    return units


def _whole_params_on_dp(
    options: Sequence[ShardingOption], node: Node, params: set[str], dp: int
) -> tuple[ShardingOption, ...]:
    """The options of `node` that read each parameter whole on the dp axis, else all.

    When ZeRO is decided outside the ILP (`dp_params`), the dp axis is data parallelism, as the step
    search priced it: a replica runs whole layers on its rows. Reading a replicated weight as a shard
    over dp would turn dp into a tensor-parallel axis the search never priced (and, at one sequence
    per replica, the ILP on a CPU cluster found that cheaper: the run then issued 6x the collectives)."""
    slots = [i for i, n in enumerate(node.all_input_nodes) if n.name in params]
    if not slots:
        return tuple(options)
    kept = tuple(
        o for o in options
        if all(i >= len(o.inputs) or o.inputs[i] is None or type(o.inputs[i][dp]) is Replicate for i in slots)
    )
    return kept or tuple(options)


def _graph_output_sources(ir: GraphIR) -> set[str]:
    return {src for n in ir.nodes if n.kind is NodeKind.OUTPUT for src in n.inputs}


def _to_replicate_cost(pricer: Pricer, info: NodeInfo, option: ShardingOption) -> float:
    """A graph output is returned whole on every rank, as the single-device model returns it."""
    total = 0.0
    for meta, spec in zip(info.outputs, option.output):
        if spec is None:
            continue
        price = pricer.edge(meta, spec, (Replicate(),) * pricer.mesh.ndim, None, requires_grad=False)
        total += price.seconds
    return total


def _input_allowed(info: NodeInfo, options: Sequence[ShardingOption], mesh: MeshSpec) -> frozenset[int]:
    """Graph inputs are split along the batch (dim 0) over dp and replicated on every other axis;
    inputs the dp axis does not divide, and scalars, stay replicated; a non-tensor input (a constant
    argument such as use_cache=False) has no placement."""
    if not info.outputs:
        return frozenset(range(len(options)))
    rank = len(info.outputs[0].shape) if info.outputs else 0
    wanted = tuple(
        Shard(0) if axis == "dp" and rank > 0 and info.outputs[0].shape[0] % size == 0 else Replicate()
        for axis, size in mesh.axes
    )
    replicated = tuple(Replicate() for _ in mesh.axes)
    for target in (wanted, replicated):
        found = frozenset(i for i, o in enumerate(options) if tuple(o.output[0]) == target)
        if found:
            return found
    raise InputError(f"graph input {info.name} has no replicated option on mesh {mesh}")


def _param_allowed(
    param: ParamInfo,
    options: Sequence[ShardingOption],
    fixed: Mapping[str, Sequence[Placement]],
    mesh: MeshSpec,
) -> frozenset[int] | None:
    """A manual strategy fixes parameters by name pattern (fnmatch, e.g. `*.c_attn.weight`)."""
    for pattern, spec in fixed.items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in param.names):
            wanted = tuple(spec)
            found = frozenset(i for i, o in enumerate(options) if tuple(o.output[0]) == wanted)
            if not found:
                raise InputError(
                    f"parameter {param.name} of shape {param.meta.shape} cannot take placement "
                    f"{spec_str(wanted)} on mesh {mesh} (pattern {pattern!r}); expected one of "
                    f"{', '.join(spec_str(o.output[0]) for o in options)}"
                )
            return found
    return None


def _dp_param_allowed(
    options: Sequence[ShardingOption], allowed: frozenset[int] | None, dp: int, mode: str
) -> frozenset[int]:
    """Options whose dp entry is Replicate ("replicate") or a shard ("shard"; a parameter no dp split
    divides stays replicated), within what `allowed` already permits."""
    candidates = [i for i in range(len(options)) if allowed is None or i in allowed]
    replicated = frozenset(i for i in candidates if type(options[i].output[0][dp]) is Replicate)
    if mode == "replicate":
        return replicated or frozenset(candidates)
    sharded = frozenset(i for i in candidates if is_sharded(options[i].output[0][dp]))
    return sharded or replicated or frozenset(candidates)


def _hint_allowed(
    info: NodeInfo, options: Sequence[ShardingOption], hint: object, mesh: MeshSpec
) -> frozenset[int]:
    """Options whose output shards each tensor dim over exactly the axes one reading of the hint names."""
    where = f"the sharding hint at {info.source or info.module or info.name}"
    hint.check_mesh(dict(mesh.axes), info.outputs[0].shape, where)  # type: ignore[attr-defined]
    assignments = hint.axis_assignments(dict(mesh.axes))  # type: ignore[attr-defined]
    ndim = len(info.outputs[0].shape)
    found = frozenset(
        i
        for i, o in enumerate(options)
        if not any(type(p) is Partial for p in o.output[0])  # a hinted tensor is materialised, not pending
        and _dims_to_axes(o.output[0], ndim, mesh) in set(assignments)
    )
    if not found:
        raise InputError(
            f"the sharding hint {hint} on node {info.name} ({info.source or info.module}) cannot hold on "
            f"mesh {mesh}: no sharding option of this op produces it"
        )
    return found


def _dims_to_axes(spec: Sequence[Placement] | None, ndim: int, mesh: MeshSpec) -> tuple[tuple[str, ...], ...]:
    per_dim: list[list[str]] = [[] for _ in range(ndim)]
    for axis, p in zip(mesh.names, spec or ()):
        if is_sharded(p):
            per_dim[p.dim % ndim].append(axis)
    return tuple(tuple(a) for a in per_dim)


# ---- edges ---------------------------------------------------------------------------------------


def _followers(folded: FoldedGraph, units: Mapping[str, _Unit], fx_nodes: Mapping[str, Node]) -> dict[str, Follow]:
    def may_follow(name: str) -> bool:
        u = units[name]
        return u.param is None and u.info.kind is NodeKind.CALL and u.allowed is None and not any(u.output_costs)

    def produced(edge: FoldedEdge, i: int) -> object:
        index = producer_output_index(fx_nodes[units[edge.dst].info.name], edge.slot)
        return units[edge.src].options[i].output[index]

    def accepts(edge: FoldedEdge, j: int) -> object:
        inputs = units[edge.dst].options[j].inputs
        return inputs[edge.slot] if edge.slot < len(inputs) else None

    options = {name: u.options for name, u in units.items()}
    return find_followers(folded, may_follow, options, produced, accepts)


def _option_under(unit: str, leader: str, i: int, follows: Mapping[str, Follow]) -> int:
    """The option `unit` takes when `leader` (unit itself, or the leader it follows) picks option i."""
    return i if unit == leader else follows[unit].options[i]


class _EdgePricer:
    """Seconds of one folded edge for one option of each end; identical edges priced once."""

    def __init__(self, units: Mapping[str, _Unit], fx_nodes: Mapping[str, Node], pricer: Pricer) -> None:
        self.units, self.fx_nodes, self.pricer = units, fx_nodes, pricer

    def __call__(self, edge: FoldedEdge, src_option: int, dst_option: int) -> float:
        src, dst = self.units[edge.src], self.units[edge.dst]
        index = producer_output_index(self.fx_nodes[dst.info.name], edge.slot)
        return _edge_seconds(
            self.pricer,
            src.info.outputs[index],
            src.options[src_option].output[index],
            dst.options[dst_option],
            edge.slot,
            src.info.requires_grad,
            src.param is not None,
        )

    def spec_of(self, edge: FoldedEdge, src_option: int) -> object:
        index = producer_output_index(self.fx_nodes[self.units[edge.dst].info.name], edge.slot)
        return self.units[edge.src].options[src_option].output[index]


def _edges(
    folded: FoldedGraph,
    units: Mapping[str, _Unit],
    follows: Mapping[str, Follow],
    edge_price: _EdgePricer,
    costs: dict[str, list[float]],
) -> list[tuple[tuple[str, str, int], tuple[tuple[float, ...], ...]]]:
    """ILP edges between leaders; an edge leaving a follower leaves from its leader. An edge that
    merging turns into a loop (a block feeding the next copy of itself) joins copies that make the same
    choice, so it costs its diagonal."""
    out = []
    matrices: dict[tuple[object, ...], tuple[tuple[float, ...], ...]] = {}  # identical edges priced once
    for e in folded.edges:
        if e.dst in follows:
            continue
        leader, _ = resolve(e.src, follows)
        sources = [_option_under(e.src, leader, i, follows) for i in range(len(units[leader].options))]
        src = units[e.src]
        key = (
            src.info.outputs[producer_output_index(edge_price.fx_nodes[units[e.dst].info.name], e.slot)],
            tuple(edge_price.spec_of(e, s) for s in sources),
            tuple(units[e.dst].options),
            e.slot,
            src.info.requires_grad,
            src.param is not None,
        )
        matrix = matrices.get(key)
        if matrix is None:
            matrix = matrices[key] = tuple(
                tuple(edge_price(e, s, j) for j in range(len(units[e.dst].options))) for s in sources
            )
        if leader == e.dst:
            for i in range(len(matrix)):
                costs[leader][i] += e.multiplicity / folded.multiplicity[leader] * matrix[i][i]
            continue
        out.append(((leader, e.dst, e.multiplicity), matrix))
    return out


def _edge_seconds(
    pricer: Pricer,
    meta: TensorMeta,
    src_spec: Spec | None,
    dst_option: ShardingOption,
    slot: int,
    grad: bool,
    bucketed: bool,
) -> float:
    dst_spec = dst_option.inputs[slot] if slot < len(dst_option.inputs) else None
    consumer_output = dst_option.output[0] if dst_option.output else None
    return pricer.edge(meta, src_spec, dst_spec, consumer_output, requires_grad=grad, bucketed=bucketed).seconds


# ---- from representative choices to a plan of the whole graph ----------------------------------


def _expand(
    ir: GraphIR,
    cluster: Cluster,
    mesh: MeshSpec,
    optimizer: str,
    limit: float,
    folded: FoldedGraph,
    units: Mapping[str, _Unit],
    choice: Mapping[str, ShardingOption],
    fx_nodes: Mapping[str, Node],
    pricer: Pricer,
    *,
    stats: SolverStats,
) -> Plan:
    unit_names = unit_of(ir)
    rep_of = {n: folded.representative[u] for n, u in unit_names.items()}
    infos = {n.name: n for n in ir.nodes}
    decisions: list[NodeDecision] = []
    collectives: list[PlannedCollective] = []
    comm_s = 0.0
    comm_bytes = 0.0
    param_bytes = grad_bytes = opt_bytes = act_bytes = 0.0
    compute_s = 0.0
    seen_params: set[str] = set()
    params: dict[str, str] = {}
    for node in ir.nodes:
        if node.kind is NodeKind.OUTPUT or node.name not in rep_of:
            continue
        unit = units[rep_of[node.name]]
        option = choice[unit.name]
        price = unit.prices[unit.options.index(option)]
        node_comm = 0.0
        for slot, src_name in enumerate(node.inputs):
            src_unit = units[rep_of[src_name]]
            src_option = choice[src_unit.name]
            index = producer_output_index(fx_nodes[node.name], slot)
            edge = pricer.edge(
                infos[src_name].outputs[index] if src_unit.param is None else src_unit.param.meta,
                src_option.output[index],
                option.inputs[slot] if slot < len(option.inputs) else None,
                option.output[0] if option.output else None,
                requires_grad=src_unit.info.requires_grad,
                bucketed=src_unit.param is not None,
            )
            node_comm += edge.seconds
            comm_bytes += edge.bytes_per_device
            collectives.extend(_planned(pricer, src_name, node.name, "forward", edge.forward, bucketed=False))
            collectives.extend(
                _planned(pricer, src_name, node.name, "backward", edge.backward, bucketed=src_unit.param is not None)
            )
        output_s = unit.output_costs[unit.options.index(option)]
        if output_s:
            for meta, spec in zip(node.outputs, option.output):
                if spec is not None:
                    steps = pricer.edge(meta, spec, (Replicate(),) * mesh.ndim, None, requires_grad=False).forward
                    collectives.extend(_planned(pricer, node.name, "output", "forward", steps, bucketed=False))
        comm_s += node_comm + output_s
        own = unit_names[node.name]  # this node's parameter (its representative may be another block's)
        first_copy = unit.param is None or own not in seen_params
        if unit.param is not None:
            params[own] = spec_str(option.output[0])
            seen_params.add(own)
        if first_copy:
            compute_s += price.compute_s
            param_bytes += price.parameter_bytes
            grad_bytes += price.gradient_bytes
            opt_bytes += price.optimizer_bytes
            act_bytes += price.activation_bytes
        decisions.append(
            NodeDecision(
                node=node.name,
                op=node.op,
                module=node.module if unit.param is None else own.rsplit(".", 1)[0],
                output=tuple(spec_str(s) if s is not None else None for s in option.output),
                inputs=tuple(spec_str(s) if s is not None else None for s in option.inputs),
                compute_s=price.compute_s if first_copy else 0.0,
                comm_s=node_comm + output_s,
                memory_bytes=price.memory_bytes if first_copy else 0.0,
            )
        )
    flops = 3 * sum(n.flops for n in ir.nodes)  # forward + backward (priced at 2x forward)
    inputs = [n for n in ir.nodes if n.kind is NodeKind.INPUT and n.outputs]
    predicted = Prediction(
        step_time_s=compute_s + comm_s,
        compute_s=compute_s,
        comm_s=comm_s,
        comm_bytes=comm_bytes,
        parameters_bytes=param_bytes,
        gradients_bytes=grad_bytes,
        optimizer_bytes=opt_bytes,
        activations_bytes=act_bytes,
        hardware_flops=flops,
        model_flops=flops,
        tokens=math.prod(inputs[0].outputs[0].shape) if inputs else 0,
        pipeline_s=compute_s + comm_s,
    )
    return Plan(
        fingerprint=ir.fingerprint,
        model=ir.model_type,
        cluster=str(cluster),
        mesh=dict(mesh.axes),
        optimizer=optimizer,
        memory_limit_bytes=limit,
        nodes=tuple(decisions),
        params=params,
        collectives=tuple(collectives),
        predicted=predicted,
        solver=stats,
        training=Training(
            blocks=repeated_blocks(ir), precision=pricer.precision, micro_batch_size=_replica_batch(ir, mesh)
        ),
        peak_flops=cluster.hardware.peak_flops_for(pricer.compute_dtype(torch.float32)),
    )


def _replica_batch(ir: GraphIR, mesh: MeshSpec) -> int:
    """Sequences each data-parallel replica runs: the batch over the dp axis."""
    dp = dict(mesh.axes).get("dp", 1)
    return ir.batch_size // dp if ir.batch_size and ir.batch_size % dp == 0 else 0


def _planned(
    pricer: Pricer, src: str, dst: str, phase: str, steps: Sequence[CommStep], *, bucketed: bool
) -> list[PlannedCollective]:
    return [
        PlannedCollective(
            src=src,
            dst=dst,
            phase=phase,
            axis=step.axis,
            collective=step.collective,
            full_bytes=int(step.full_bytes),
            bytes_per_device=pricer.step_bytes(step),
            seconds=pricer.step_seconds(step, bucketed=bucketed),
        )
        for step in steps
        if step.collective != "local"
    ]
