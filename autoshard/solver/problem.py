"""The plan-selection problem the ILP solves, independent of torch, and the pricing of one assignment.

A :class:`Problem` is a graph whose nodes each pick exactly one option. Node ``v`` with multiplicity
``m_v`` (it stands for ``m_v`` identical copies, e.g. repeated transformer blocks) costs
``m_v * costs_v[s]`` seconds and ``m_v * memory_v[s]`` bytes per device when it picks option ``s``;
an edge ``e = (u, v)`` with multiplicity ``m_e`` adds ``m_e * costs_e[s_u][s_v]`` seconds of resharding.
A plan picks one allowed option per node, fits ``memory_limit`` and minimises the total seconds.

Both totals of an assignment are defined as the correctly rounded sum (:func:`math.fsum`) of the per-node
and per-edge terms, so they do not depend on the order of the nodes, and the memory total only grows when
one node's term grows. :func:`evaluate` computes them; the solver reports exactly these numbers.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from autoshard.errors import AutoshardError, InputError
from autoshard.report.table import format_count

__all__ = [
    "EdgeCosts",
    "Evaluation",
    "NoFeasiblePlan",
    "NodeChoices",
    "Problem",
    "Solution",
    "evaluate",
    "infeasibility",
    "minimum_memory",
]


class NoFeasiblePlan(AutoshardError):
    """No assignment of allowed options fits the memory limit (or some node allows no option at all)."""

    def __init__(self, message: str, *, minimum_memory: float, memory_limit: float | None) -> None:
        super().__init__(message)
        self.minimum_memory = minimum_memory  # bytes per device the leanest assignment needs (inf: none)
        self.memory_limit = memory_limit  # bytes per device that were asked for


# --------------------------------------------------------------------------------------- validation


def _floats(values: object, what: str, *, nonnegative_what: str) -> tuple[float, ...]:
    """`values` as a tuple of finite non-negative floats, or an InputError saying which entry is bad."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"expected {what} as a sequence of numbers, found {type(values).__name__}.")
    out: list[float] = []
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(
                f"expected {what}[{i}] to be a number, found {value!r} ({type(value).__name__})."
            ) from None
        if not math.isfinite(number) or number < 0:
            raise InputError(
                f"expected {what}[{i}] to be finite and >= 0 ({nonnegative_what}), found {number!r}; "
                "price an impossible option by leaving it out of `allowed` rather than with inf."
            )
        out.append(number)
    return tuple(out)


def _multiplicity(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(
            f"expected {what}.multiplicity to be an int >= 1 (the number of identical copies this "
            f"stands for), found {value!r}."
        )
    return value


def _option_index(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"expected {what} to be an option index (int), found the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise InputError(
            f"expected {what} to be an option index (int), found {value!r} ({type(value).__name__})."
        ) from None


# ------------------------------------------------------------------------------------------ problem


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeChoices:
    """One node of the (possibly deduplicated) graph and what each of its options costs."""

    name: str
    costs: tuple[float, ...]  # seconds per option (compute + communication attributable to the node)
    memory: tuple[float, ...]  # bytes per device per option
    multiplicity: int = 1  # this node stands for `multiplicity` identical copies (repeated blocks)
    allowed: frozenset[int] | None = None  # hints: only these options (None = all)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"expected NodeChoices.name as a non-empty str, found {self.name!r}.")
        where = f"node {self.name!r}"
        costs = _floats(self.costs, f"{where} costs", nonnegative_what="seconds")
        memory = _floats(self.memory, f"{where} memory", nonnegative_what="bytes per device")
        if not costs or len(costs) != len(memory):
            raise InputError(
                f"expected {where} to have one cost and one memory figure per option (at least one "
                f"option), found {len(costs)} costs and {len(memory)} memory figures; pass both "
                "tuples in the same option order."
            )
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "memory", memory)
        _multiplicity(self.multiplicity, where)
        if self.allowed is not None:
            if isinstance(self.allowed, (str, bytes)) or not isinstance(self.allowed, Iterable):
                raise InputError(
                    f"expected {where} allowed as a set of option indices or None, found "
                    f"{type(self.allowed).__name__}."
                )
            allowed = frozenset(_option_index(s, f"an entry of {where} allowed") for s in self.allowed)
            bad = sorted(s for s in allowed if not 0 <= s < len(costs))
            if bad:
                raise InputError(
                    f"expected {where} allowed to name options 0..{len(costs) - 1}, found {bad}; "
                    "drop the indices that do not exist (an empty set makes the problem infeasible)."
                )
            object.__setattr__(self, "allowed", allowed)

    @property
    def num_options(self) -> int:
        return len(self.costs)

    def allowed_options(self) -> tuple[int, ...]:
        """The options this node may pick, ascending."""
        if self.allowed is None:
            return tuple(range(len(self.costs)))
        return tuple(sorted(self.allowed))

    def memory_term(self, option: int) -> float:
        """Bytes per device this node adds to a plan that picks `option` (multiplicity included)."""
        return float(self.multiplicity * self.memory[option])


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgeCosts:
    """Resharding seconds between two nodes, for every pair of their options."""

    src: str
    dst: str
    costs: tuple[tuple[float, ...], ...]  # [option of src][option of dst] resharding seconds
    multiplicity: int = 1

    def __post_init__(self) -> None:
        where = f"edge {self.src!r} -> {self.dst!r}"
        if not isinstance(self.src, str) or not isinstance(self.dst, str):
            raise InputError(
                f"expected {where} to join two node names (str), found {self.src!r}, {self.dst!r}."
            )
        if self.src == self.dst:
            raise InputError(
                f"expected {where} to join two different nodes, found a self-loop; fold a node's cost "
                "on itself into its NodeChoices.costs."
            )
        if isinstance(self.costs, (str, bytes)) or not isinstance(self.costs, Iterable):
            raise InputError(
                f"expected {where} costs as a matrix (rows of numbers), found {type(self.costs).__name__}."
            )
        rows = tuple(
            _floats(row, f"{where} costs[{i}]", nonnegative_what="seconds")
            for i, row in enumerate(self.costs)
        )
        widths = {len(row) for row in rows}
        if not rows or len(widths) != 1 or 0 in widths:
            raise InputError(
                f"expected {where} costs as a non-empty rectangular matrix [option of src][option of dst], "
                f"found {len(rows)} rows of lengths {sorted(widths)}."
            )
        object.__setattr__(self, "costs", rows)
        _multiplicity(self.multiplicity, where)


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """Nodes that each pick one option, resharding edges between them and a per-device memory budget."""

    nodes: tuple[NodeChoices, ...]
    edges: tuple[EdgeCosts, ...]
    memory_limit: float | None = (
        None  # bytes per device; sum of multiplicity*memory of chosen options <= limit
    )

    def __post_init__(self) -> None:
        nodes = tuple(self.nodes)
        edges = tuple(self.edges)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "edges", edges)
        by_name: dict[str, NodeChoices] = {}
        for node in nodes:
            if not isinstance(node, NodeChoices):
                raise InputError(f"expected Problem.nodes to hold NodeChoices, found {type(node).__name__}.")
            if node.name in by_name:
                raise InputError(
                    f"expected unique node names, found {node.name!r} twice; give each node its own name "
                    "(merge repeated copies into one node with a multiplicity instead)."
                )
            by_name[node.name] = node
        for edge in edges:
            if not isinstance(edge, EdgeCosts):
                raise InputError(f"expected Problem.edges to hold EdgeCosts, found {type(edge).__name__}.")
            missing = [n for n in (edge.src, edge.dst) if n not in by_name]
            if missing:
                raise InputError(
                    f"expected edge {edge.src!r} -> {edge.dst!r} to join nodes of the problem, found no "
                    f"node named {', '.join(map(repr, missing))}; add the node or drop the edge."
                )
            shape = (by_name[edge.src].num_options, by_name[edge.dst].num_options)
            found = (len(edge.costs), len(edge.costs[0]))
            if shape != found:
                raise InputError(
                    f"expected edge {edge.src!r} -> {edge.dst!r} costs of shape {shape[0]}x{shape[1]} "
                    f"(options of src x options of dst), found {found[0]}x{found[1]}."
                )
        limit = self.memory_limit
        if limit is not None:
            if (
                isinstance(limit, bool)
                or not isinstance(limit, (int, float))
                or math.isnan(limit)
                or limit < 0
            ):
                raise InputError(
                    f"expected memory_limit as bytes per device (a number >= 0) or None for no limit, "
                    f"found {limit!r}."
                )
            object.__setattr__(self, "memory_limit", float(limit))

    def node(self, name: str) -> NodeChoices:
        """The node called `name`."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in the problem")


# -------------------------------------------------------------------------------- solution, pricing


@dataclass(frozen=True, kw_only=True, slots=True)
class Solution:
    """The plan the solver picked and how sure it is of it."""

    choices: Mapping[str, int]  # node name -> chosen option index, in the problem's node order
    objective: float  # seconds: sum of m_v*costs_v[s_v] + sum of m_e*costs_e[s_src][s_dst]
    memory: float  # bytes per device: sum of m_v*memory_v[s_v]
    status: str  # "optimal" (proven within relative_gap) or "feasible" (time limit hit, best found)
    gap: float  # proven relative gap (objective - bound) / objective (HiGHS's own figure when it closed)
    bound: float  # proven lower bound on the objective of every feasible plan
    seconds: float  # wall-clock seconds spent in solve(), reductions and model building included
    num_variables: int  # of the ILP after the reductions (0: the reductions alone decided the plan)
    num_constraints: int


class Evaluation(NamedTuple):
    """What one assignment costs."""

    objective: float  # seconds
    memory: float  # bytes per device


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first few names, quoted, and "..." when there are more."""
    more = " ..." if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def _checked_choices(problem: Problem, choices: Mapping[str, int]) -> list[int]:
    """`choices` as one option index per node in node order, or an InputError naming what is wrong."""
    if not isinstance(choices, Mapping):
        raise InputError(
            f"expected choices as a mapping node name -> option index, found {type(choices).__name__}."
        )
    names = {node.name for node in problem.nodes}
    unknown = sorted(set(choices) - names, key=str)
    missing = [node.name for node in problem.nodes if node.name not in choices]
    if unknown or missing:
        found = []
        if missing:
            found.append(f"no choice for {_some(missing)}")
        if unknown:
            found.append(f"choices for unknown nodes {_some(unknown)}")
        raise InputError(
            f"expected one choice for every node of the problem and nothing else, found {'; '.join(found)}."
        )
    picked: list[int] = []
    for node in problem.nodes:
        option = _option_index(choices[node.name], f"the choice of node {node.name!r}")
        if not 0 <= option < node.num_options:
            raise InputError(
                f"expected the choice of node {node.name!r} in 0..{node.num_options - 1}, found {option}."
            )
        if node.allowed is not None and option not in node.allowed:
            raise InputError(
                f"node {node.name!r} may only pick options {sorted(node.allowed)} (its `allowed` hint), "
                f"found {option}; pick an allowed option or widen the hint."
            )
        picked.append(option)
    return picked


def evaluate(problem: Problem, choices: Mapping[str, int]) -> Evaluation:
    """Price an assignment (e.g. a hand-written plan): total seconds and bytes per device.

    The memory limit is not enforced here (a manual plan may exceed it; compare ``memory`` with it).
    """
    picked = _checked_choices(problem, choices)
    index = {node.name: i for i, node in enumerate(problem.nodes)}
    terms = [node.multiplicity * node.costs[s] for node, s in zip(problem.nodes, picked, strict=True)]
    terms += [
        edge.multiplicity * edge.costs[picked[index[edge.src]]][picked[index[edge.dst]]]
        for edge in problem.edges
    ]
    memory = math.fsum(node.memory_term(s) for node, s in zip(problem.nodes, picked, strict=True))
    return Evaluation(objective=math.fsum(terms), memory=memory)


def minimum_memory(problem: Problem) -> float:
    """Bytes per device of the leanest assignment: every node at its least-memory allowed option.

    Exact, because memory is a sum of per-node terms. ``inf`` when some node allows no option.
    """
    terms: list[float] = []
    for node in problem.nodes:
        options = node.allowed_options()
        if not options:
            return math.inf
        terms.append(min(node.memory_term(s) for s in options))
    return math.fsum(terms)


def infeasibility(problem: Problem) -> NoFeasiblePlan | None:
    """The NoFeasiblePlan to raise for `problem`, or None when some assignment is feasible."""
    limit = problem.memory_limit
    empty = [node.name for node in problem.nodes if not node.allowed_options()]
    if empty:
        return NoFeasiblePlan(
            f"expected every node to allow at least one option, found an empty `allowed` set on "
            f"{_some(empty)}; "
            "the hints contradict each other or every candidate was filtered out: widen the hints.",
            minimum_memory=math.inf,
            memory_limit=limit,
        )
    least = minimum_memory(problem)
    if limit is None or least <= limit:
        return None
    heaviest = sorted(
        ((min(node.memory_term(s) for s in node.allowed_options()), node.name) for node in problem.nodes),
        key=lambda item: (-item[0], item[1]),
    )[:3]
    biggest = ", ".join(f"{name!r} {format_count(term, 'B')}" for term, name in heaviest)
    return NoFeasiblePlan(
        f"no plan fits the memory limit: expected at most {format_count(limit, 'B')} ({limit:.0f} bytes) "
        f"per device, found that the leanest assignment of allowed options needs "
        f"{format_count(least, 'B')} ({least:.0f} bytes) per device (largest: {biggest}). Raise the limit "
        "to at least that, use more devices, or widen the `allowed` hints to admit more sharded options.",
        minimum_memory=least,
        memory_limit=limit,
    )
