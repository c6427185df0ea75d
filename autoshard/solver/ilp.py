r"""Pick one option per node: an integer program solved by HiGHS through OR-Tools MathOpt.

Notation: node ``v`` picks option ``s`` from its allowed set ``S_v`` with node cost ``c_{v,s}`` (seconds,
multiplicity included) and memory ``M_{v,s}`` (bytes per device, multiplicity included); the merged
edge ``uv`` costs ``C_{uv}[s][t]`` when ``u`` picks ``s`` and ``v`` picks ``t``; ``L`` is the memory limit.

Reductions (:class:`_Reduction`, applied until none changes anything; each keeps the optimum exactly):

* ``s`` not in ``allowed_v``: dropped                                   -- ``_Reduction.__init__``
* parallel edges ``e_1..e_k`` between ``u, v``: ``C_{uv} = sum_i m_{e_i} C_{e_i}`` (transposed as needed)
                                                                        -- ``_merge_parallel_edges``
* ``M_{v,s} + sum_{w != v} min_t M_{w,t} > L``: ``s`` fits no plan, dropped
                                                                        -- ``_drop_options_that_cannot_fit``
* ``sum_v max_s M_{v,s} <= L``: the limit binds nothing, dropped        -- ``_relax_slack_memory_limit``
* separable edge, ``C_{uv}[s][t] = a_s + b_t`` exactly (all-zero edges and edges at a node left with one
  option included): ``c_{u,s} += a_s``, ``c_{v,t} += b_t``, edge dropped -- ``_fold_separable_edges``
* ``s`` dominated by ``s'``: identical rows in every remaining incident edge, ``c_{v,s'} <= c_{v,s}``,
  ``M_{v,s'} <= M_{v,s}`` (memory ignored without a binding limit), ties kept at the lower option index;
  ``s`` dropped                                                         -- ``_drop_dominated_options``

A node left with one option is a constant. The rest is the integer program (:class:`_IlpModel`) over the
nodes ``V'`` with two or more options and the edges ``E'`` that did not fold:

* ``x_{v,s} in {0, 1}``, exactly one option per node: ``sum_s x_{v,s} = 1``
                                                                        -- ``_add_choice_variables``
* ``y_{uv,s,t} in [0, 1]`` with the marginal (local-polytope) constraints
  ``sum_t y_{uv,s,t} = x_{u,s}`` for all ``s`` and ``sum_s y_{uv,s,t} = x_{v,t}`` for all ``t``;
  with binary ``x`` they force ``y_{uv,s,t} = x_{u,s} x_{v,t}``, and their LP relaxation is exact on
  trees (chains of layers solve at the root)                            -- ``_add_edge_marginals``
* memory: ``sum_{v in V'} sum_s (M_{v,s} - min_t M_{v,t}) x_{v,s} <= L - sum_v min_t M_{v,t}``
                                                                        -- ``_add_memory_limit``
* objective: ``min sum_{v,s} c_{v,s} x_{v,s} + sum_{uv,s,t} C_{uv}[s][t] y_{uv,s,t} + constant``
  (scaled to unit size for HiGHS's tolerances)                          -- ``_set_objective``

After the solve, ``_Reduction.polish`` moves one node at a time while that strictly lowers the exact
objective or keeps it equal and lowers the option index, within the memory limit. That takes back what
the solver's tolerances leave at single nodes and sends ties to the lowest option index without
perturbing any cost. The
same search from the leanest assignment gives the incumbent handed to HiGHS as a hint and returned if
HiGHS finds nothing in time. HiGHS runs single-threaded with a fixed seed, so equal input gives equal
output. Objective and memory of the result are recomputed exactly by
:func:`~autoshard.solver.problem.evaluate`.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import NamedTuple

from ortools.math_opt import model_pb2
from ortools.math_opt.python import mathopt

from autoshard.errors import InputError
from autoshard.solver.problem import Problem, Solution, evaluate, infeasibility

__all__ = ["ChoiceVar", "PairVar", "solve"]

SEED = 0  # HiGHS's random seed: fixed, so equal input gives equal output
MEMORY_RETRIES = 3  # re-solves with a tightened memory row when rounding overshoots the limit
# HiGHS prunes a branch whose bound is within its MIP feasibility tolerance of the incumbent, so that
# tolerance, relative to the largest (scaled to 1) cost coefficient, is the resolution of the objective:
# the default 1e-6 would let a 1 us choice hide next to a 1 s one. The rows are 0/1 (memory scaled to 1).
TOLERANCE = 1e-9
# The solver's wall-clock limit when the caller gives none (`time_limit_s=None`), read at each call;
# AUTOSHARD_TIME_LIMIT_S overrides it. The test suite sets it to inf (tests/conftest.py, inherited by the
# ranks it starts): no test result may depend on how fast the machine is.
DEFAULT_TIME_LIMIT_S = float(os.environ.get("AUTOSHARD_TIME_LIMIT_S", "30"))
POLISH_SWEEPS = 100  # cap on one-node improvement sweeps (each strictly improves, so this rarely binds)


class ChoiceVar(NamedTuple):
    """Key of the binary ``x``: node `node` picks its option `option` (an index into its costs)."""

    node: str
    option: int


class PairVar(NamedTuple):
    """Key of the continuous ``y``: the merged edge `src`-`dst` sees options `src_option`, `dst_option`.

    `src` is whichever end comes first in the problem's node order, whatever the original edges said.
    """

    src: str
    dst: str
    src_option: int
    dst_option: int


class _Pair(NamedTuple):
    """A merged edge between node positions `first` < `second`; its matrix is [first's][second's]."""

    first: int
    second: int


# ---------------------------------------------------------------------------------------- reduction


class _Reduction:
    """The problem with every exact simplification applied; positions index the surviving options."""

    def __init__(self, problem: Problem, deadline: float = math.inf) -> None:
        self.problem = problem
        self.names = [node.name for node in problem.nodes]
        self.options = [list(node.allowed_options()) for node in problem.nodes]
        self.cost = [
            [node.multiplicity * node.costs[s] for s in opts]
            for node, opts in zip(problem.nodes, self.options, strict=True)
        ]
        self.memory = [
            [node.memory_term(s) for s in opts]
            for node, opts in zip(problem.nodes, self.options, strict=True)
        ]
        limit = problem.memory_limit
        self.limit = limit if limit is not None and math.isfinite(limit) else None
        self.edges: dict[_Pair, list[list[float]]] = {}
        self.incident: list[dict[_Pair, None]] = [{} for _ in problem.nodes]  # ordered set per node
        self._merge_parallel_edges()
        self._drop_options_that_cannot_fit()
        changed = True
        while changed and time.perf_counter() < deadline:  # each step is exact: stopping early only leaves more to the ILP
            changed = self._relax_slack_memory_limit()
            changed |= self._fold_separable_edges()
            if time.perf_counter() < deadline:
                changed |= self._drop_dominated_options()

    @property
    def free(self) -> list[int]:
        """Positions of the nodes that still have a choice to make."""
        return [v for v, opts in enumerate(self.options) if len(opts) > 1]

    # -- reductions

    def _merge_parallel_edges(self) -> None:
        index = {name: v for v, name in enumerate(self.names)}
        for edge in self.problem.edges:
            u, v = index[edge.src], index[edge.dst]
            m = edge.multiplicity
            rows_u, rows_v = self.options[u], self.options[v]
            if u < v:
                pair = _Pair(u, v)
                add = [[m * edge.costs[s][t] for t in rows_v] for s in rows_u]
            else:
                pair = _Pair(v, u)
                add = [[m * edge.costs[s][t] for s in rows_u] for t in rows_v]
            matrix = self.edges.get(pair)
            if matrix is None:
                self.edges[pair] = add
                self.incident[pair.first][pair] = None
                self.incident[pair.second][pair] = None
            else:
                for row, extra in zip(matrix, add, strict=True):
                    for j, value in enumerate(extra):
                        row[j] += value

    def _drop_options_that_cannot_fit(self) -> None:
        if self.limit is None:
            return
        least = [min(mem) for mem in self.memory]
        total = sum(map(Fraction, least), Fraction(0))  # exact, so float() below is the fsum of the terms
        for v, mem in enumerate(self.memory):
            others = total - Fraction(least[v])
            keep = [
                i for i, m in enumerate(mem) if m == least[v] or float(others + Fraction(m)) <= self.limit
            ]
            self._keep(v, keep)

    def _relax_slack_memory_limit(self) -> bool:
        if self.limit is not None and math.fsum(max(mem) for mem in self.memory) <= self.limit:
            self.limit = None
            return True
        return False

    def _fold_separable_edges(self) -> bool:
        changed = False
        for pair, matrix in list(self.edges.items()):
            if len(matrix) == 1:  # an end left with one option: the other end takes the costs exactly
                a, b = [0.0], list(matrix[0])
            else:
                a = [row[0] for row in matrix]
                b = [0.0] if len(matrix[0]) == 1 else [value - matrix[0][0] for value in matrix[0]]
            if all(value == a[i] + b[j] for i, row in enumerate(matrix) for j, value in enumerate(row)):
                first, second = self.cost[pair.first], self.cost[pair.second]
                for i, value in enumerate(a):
                    first[i] += value
                for j, value in enumerate(b):
                    second[j] += value
                self._remove_edge(pair)
                changed = True
        return changed

    def _drop_dominated_options(self) -> bool:
        changed = False
        for v in self.free:
            groups: dict[tuple[tuple[float, ...], ...], list[int]] = {}
            for i in range(len(self.options[v])):
                groups.setdefault(self._signature(v, i), []).append(i)
            keep = [
                i
                for group in groups.values()
                for i in group
                if not any(j != i and self._dominates(v, j, i) for j in group)
            ]
            if len(keep) < len(self.options[v]):
                self._keep(v, sorted(keep))
                changed = True
        return changed

    def _dominates(self, v: int, j: int, i: int) -> bool:
        """Option j of node v is no worse than option i (same signature assumed), ties to the lower index."""
        cost, mem = self.cost[v], self.memory[v]
        no_worse = cost[j] <= cost[i] and (self.limit is None or mem[j] <= mem[i])
        return no_worse and (cost[j], mem[j], j) < (cost[i], mem[i], i)

    # -- bookkeeping

    def _signature(self, v: int, i: int) -> tuple[tuple[float, ...], ...]:
        """Option i of node v as its incident edges see it: its row (or column) in each."""
        return tuple(
            tuple(self.edges[p][i]) if p.first == v else tuple(row[i] for row in self.edges[p])
            for p in self.incident[v]
        )

    def _keep(self, v: int, keep: list[int]) -> None:
        if len(keep) == len(self.options[v]):
            return
        self.options[v] = [self.options[v][i] for i in keep]
        self.cost[v] = [self.cost[v][i] for i in keep]
        self.memory[v] = [self.memory[v][i] for i in keep]
        for pair in self.incident[v]:
            matrix = self.edges[pair]
            if pair.first == v:
                self.edges[pair] = [matrix[i] for i in keep]
            else:
                self.edges[pair] = [[row[i] for i in keep] for row in matrix]

    def _remove_edge(self, pair: _Pair) -> None:
        del self.edges[pair]
        del self.incident[pair.first][pair]
        del self.incident[pair.second][pair]

    # -- assignments (one position per node)

    def objective(self, pos: list[int]) -> float:
        terms = [cost[p] for cost, p in zip(self.cost, pos, strict=True)]
        terms += [matrix[pos[pair.first]][pos[pair.second]] for pair, matrix in self.edges.items()]
        return math.fsum(terms)

    def relaxed_bound(self) -> float:
        """A lower bound on every assignment's objective: each node and each edge at its own cheapest,
        consistency and the memory limit ignored. What a gap is measured against when the ILP gave none."""
        terms = [min(cost) for cost in self.cost]
        terms += [min(min(row) for row in matrix) for matrix in self.edges.values()]
        return math.fsum(terms)

    def ilp_size(self) -> tuple[int, int]:
        """(variables, constraints) of the ILP `_IlpModel` writes for this reduction, without writing it."""
        variables = sum(len(self.options[v]) for v in self.free)
        constraints = len(self.free)
        for matrix in self.edges.values():
            variables += len(matrix) * len(matrix[0])
            constraints += len(matrix) + len(matrix[0])
        least = [min(mem) for mem in self.memory]
        if self.limit is not None and any(m > least[v] for v in self.free for m in self.memory[v]):
            constraints += 1
        return variables, constraints

    def overshoot(self, pos: list[int]) -> float:
        """Bytes per device by which the assignment exceeds the limit; 0 when it fits."""
        if self.limit is None:
            return 0.0
        return max(0.0, math.fsum(mem[p] for mem, p in zip(self.memory, pos, strict=True)) - self.limit)

    def leanest(self) -> list[int]:
        """Every node at its least-memory option (cheapest among those); the cheapest without a limit."""
        if self.limit is None:
            return [min(range(len(c)), key=lambda i, c=c: (c[i], i)) for c in self.cost]
        return [
            min(range(len(c)), key=lambda i, c=c, m=m: (m[i], c[i], i))
            for c, m in zip(self.cost, self.memory, strict=True)
        ]

    def _move_delta(self, v: int, old: int, new: int, pos: list[int]) -> float:
        """Exact (correctly rounded) change of the objective when node v moves from old to new."""
        terms = [self.cost[v][new], -self.cost[v][old]]
        for pair in self.incident[v]:
            matrix = self.edges[pair]
            if pair.first == v:
                other = pos[pair.second]
                terms += [matrix[new][other], -matrix[old][other]]
            else:
                row = matrix[pos[pair.first]]
                terms += [row[new], -row[old]]
        return math.fsum(terms)

    def polish(self, pos: list[int]) -> list[int]:
        """One-node moves that lower the objective, or keep it and lower the option index, until none is left.

        Every move strictly decreases (exact objective, sum of positions), so this ends; moves that would
        break the memory limit are skipped, so a fitting assignment stays fitting.
        """
        pos = list(pos)
        total = sum((Fraction(mem[p]) for mem, p in zip(self.memory, pos, strict=True)), Fraction(0))

        def fits_after(v: int, new: int) -> bool:
            old, mem = pos[v], self.memory[v]
            if self.limit is None or mem[new] <= mem[old]:
                return True
            return float(total - Fraction(mem[old]) + Fraction(mem[new])) <= self.limit

        for _ in range(POLISH_SWEEPS):
            moved = False
            for v in self.free:
                current = best = pos[v]
                best_delta = 0.0
                for i in range(len(self.options[v])):
                    if i == current:
                        continue
                    delta = self._move_delta(v, current, i, pos)
                    if (delta < best_delta or (delta == best_delta and i < best)) and fits_after(v, i):
                        best, best_delta = i, delta
                if best != current:
                    total += Fraction(self.memory[v][best]) - Fraction(self.memory[v][current])
                    pos[v] = best
                    moved = True
            if not moved:
                break
        return pos

    def choices(self, pos: list[int]) -> dict[str, int]:
        return {name: opts[p] for name, opts, p in zip(self.names, self.options, pos, strict=True)}


# ------------------------------------------------------------------------------------------- model


class _MipOutcome(NamedTuple):
    positions: list[int] | None  # one option position per node; None when HiGHS found none
    bound: float  # lower bound on the objective (-inf when none was proven)
    gap: float  # HiGHS's own relative gap between its solution and its bound (1 when it has none)
    optimal: bool  # HiGHS proved optimality within the requested gap


class _Rows:
    """Linear constraints, accumulated as the row-major sparse arrays of a MathOpt ModelProto."""

    def __init__(self) -> None:
        self.row_ids: list[int] = []
        self.column_ids: list[int] = []  # ascending within each row, as the proto requires
        self.coefficients: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(
        self, columns: Sequence[int], coefficients: Sequence[float], *, lower: float, upper: float
    ) -> int:
        """lower <= sum coefficients[i] * variable[columns[i]] <= upper; returns the row's id."""
        row = len(self.lower)
        self.row_ids.extend([row] * len(columns))
        self.column_ids.extend(columns)
        self.coefficients.extend(coefficients)
        self.lower.append(lower)
        self.upper.append(upper)
        return row


class _IlpModel:
    """The MathOpt model of a reduced problem, with one method per constraint family.

    The model is written as a ModelProto (an order of magnitude faster to build than variable by
    variable from Python) and loaded once. ``x`` maps each :class:`ChoiceVar` to its variable id; the
    ``y`` of a merged edge form one block of consecutive ids, row-major, found by :meth:`y_id`.
    """

    def __init__(self, reduction: _Reduction, deadline: float = math.inf) -> None:
        self.r = reduction
        self.deadline = deadline
        self.free = reduction.free
        self.x: dict[ChoiceVar, int] = {}
        self.x_ids: dict[int, list[int]] = {}  # node position -> ids of its x, by option position
        self.y_blocks: dict[_Pair, int] = {}  # merged edge -> id of its first y
        self.memory_scale = 1.0
        self.objective_scale = 1.0
        self._integer: list[bool] = []
        self._rows = _Rows()
        self._memory_row: int | None = None
        self._add_choice_variables()
        self._add_edge_marginals()
        self._add_memory_limit()
        self._check_time()
        proto = self._set_objective(model_pb2.ModelProto(name="autoshard-plan"))
        self._write_variables_and_rows(proto)
        self._check_time()
        self.model = mathopt.Model.from_model_proto(proto)
        self.memory_row = (
            self.model.get_linear_constraint(self._memory_row) if self._memory_row is not None else None
        )
        self.x_vars = {v: [self.model.get_variable(i) for i in ids] for v, ids in self.x_ids.items()}

    @property
    def num_variables(self) -> int:
        return self.model.get_num_variables()

    @property
    def num_constraints(self) -> int:
        return self.model.get_num_linear_constraints()

    def y_id(self, key: PairVar) -> int:
        """Variable id of one ``y``."""
        names, options = self.r.names, self.r.options
        first, second = names.index(key.src), names.index(key.dst)
        block = self.y_blocks[_Pair(first, second)]
        cols = len(options[second])
        return block + options[first].index(key.src_option) * cols + options[second].index(key.dst_option)

    def _new_variables(self, count: int, *, integer: bool) -> int:
        first = len(self._integer)
        self._integer.extend([integer] * count)
        return first

    def _add_choice_variables(self) -> None:
        """x_{v,s} binary and sum_s x_{v,s} = 1 for every node with a choice."""
        for v in self.free:
            options = self.r.options[v]
            first = self._new_variables(len(options), integer=True)
            ids = list(range(first, first + len(options)))
            self.x_ids[v] = ids
            for option, var in zip(options, ids, strict=True):
                self.x[ChoiceVar(node=self.r.names[v], option=option)] = var
            self._rows.add(ids, [1.0] * len(ids), lower=1.0, upper=1.0)

    def _check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _OutOfTime

    def _add_edge_marginals(self) -> None:
        """y_{uv,s,t} in [0, 1]; sum_t y = x_{u,s} for every s and sum_s y = x_{v,t} for every t."""
        for k, (pair, matrix) in enumerate(self.r.edges.items()):
            if k % 1024 == 0:
                self._check_time()
            rows, cols = len(matrix), len(matrix[0])
            block = self.y_blocks[pair] = self._new_variables(rows * cols, integer=False)
            xu, xv = self.x_ids[pair.first], self.x_ids[pair.second]
            for i in range(rows):  # every x id is below every y id, so each row lists ascending ids
                ys = range(block + i * cols, block + (i + 1) * cols)
                self._rows.add([xu[i], *ys], [-1.0] + [1.0] * cols, lower=0.0, upper=0.0)
            for j in range(cols):
                ys = range(block + j, block + rows * cols, cols)
                self._rows.add([xv[j], *ys], [-1.0] + [1.0] * rows, lower=0.0, upper=0.0)

    def _add_memory_limit(self) -> None:
        """sum (M_{v,s} - min_t M_{v,t}) x_{v,s} <= L - sum_v min_t M_{v,t}, scaled to unit coefficients."""
        limit = self.r.limit
        if limit is None:
            return
        least = [min(mem) for mem in self.r.memory]
        spare = float(Fraction(limit) - sum(map(Fraction, least), Fraction(0)))
        extra = [
            (var, m - least[v])
            for v in self.free
            for var, m in zip(self.x_ids[v], self.r.memory[v], strict=True)
            if m > least[v]
        ]
        if not extra:
            return
        self.memory_scale = max(value for _, value in extra)
        self._memory_row = self._rows.add(
            [var for var, _ in extra],
            [value / self.memory_scale for _, value in extra],
            lower=-math.inf,
            upper=spare / self.memory_scale,
        )

    def _set_objective(self, proto: model_pb2.ModelProto) -> model_pb2.ModelProto:
        """min sum c x + sum C y + constant, divided by the largest coefficient."""
        fixed = [cost[0] for cost, opts in zip(self.r.cost, self.r.options, strict=True) if len(opts) == 1]
        base = {v: min(self.r.cost[v]) for v in self.free}  # moved into the constant: x coefficients >= 0
        ids: list[int] = []
        values: list[float] = []
        for v in self.free:  # ids ascending: x in allocation order, then the y blocks
            ids.extend(self.x_ids[v])
            values.extend(c - base[v] for c in self.r.cost[v])
        for pair, matrix in self.r.edges.items():
            ids.extend(range(self.y_blocks[pair], self.y_blocks[pair] + len(matrix) * len(matrix[0])))
            values.extend(value for row in matrix for value in row)
        largest = max(map(abs, values), default=0.0)
        self.objective_scale = largest if largest > 0 else 1.0
        kept = [(i, value / self.objective_scale) for i, value in zip(ids, values, strict=True) if value]
        proto.objective.maximize = False
        proto.objective.offset = math.fsum([*fixed, *base.values()]) / self.objective_scale
        proto.objective.linear_coefficients.ids.extend(i for i, _ in kept)
        proto.objective.linear_coefficients.values.extend(value for _, value in kept)
        return proto

    def _write_variables_and_rows(self, proto: model_pb2.ModelProto) -> None:
        count = len(self._integer)
        proto.variables.ids.extend(range(count))
        proto.variables.lower_bounds.extend([0.0] * count)
        proto.variables.upper_bounds.extend([1.0] * count)
        proto.variables.integers.extend(self._integer)
        rows = self._rows
        proto.linear_constraints.ids.extend(range(len(rows.lower)))
        proto.linear_constraints.lower_bounds.extend(rows.lower)
        proto.linear_constraints.upper_bounds.extend(rows.upper)
        proto.linear_constraint_matrix.row_ids.extend(rows.row_ids)
        proto.linear_constraint_matrix.column_ids.extend(rows.column_ids)
        proto.linear_constraint_matrix.coefficients.extend(rows.coefficients)

    # -- solving

    def hint(self, pos: list[int]) -> mathopt.SolutionHint:
        """The assignment as a MIP start: the x only; HiGHS completes the y with an LP."""
        values = {var: float(i == pos[v]) for v, xs in self.x_vars.items() for i, var in enumerate(xs)}
        return mathopt.SolutionHint(variable_values=values)

    def run(self, *, seconds: float, relative_gap: float, hint: list[int]) -> _MipOutcome:
        params = mathopt.SolveParameters(
            time_limit=datetime.timedelta(seconds=seconds) if math.isfinite(seconds) else None,
            random_seed=SEED,
            relative_gap_tolerance=relative_gap,
            absolute_gap_tolerance=0.0,
        )
        params.highs.int_options["threads"] = 1  # determinism; MathOpt refuses the generic `threads`
        for option in (
            "mip_feasibility_tolerance",
            "primal_feasibility_tolerance",
            "dual_feasibility_tolerance",
        ):
            params.highs.double_options[option] = TOLERANCE
        model_params = mathopt.ModelSolveParameters(solution_hints=[self.hint(hint)])
        result = mathopt.solve(self.model, mathopt.SolverType.HIGHS, params=params, model_params=model_params)
        reason = result.termination.reason
        bounds = result.termination.objective_bounds
        bound = bounds.dual_bound * self.objective_scale
        if not result.has_primal_feasible_solution() or reason not in (
            mathopt.TerminationReason.OPTIMAL,
            mathopt.TerminationReason.FEASIBLE,
        ):
            return _MipOutcome(positions=None, bound=bound, gap=1.0, optimal=False)
        positions = [0] * len(self.r.options)
        for v, xs in self.x_vars.items():
            values = result.variable_values(xs)
            positions[v] = max(range(len(values)), key=lambda i, values=values: (values[i], -i))
        optimal = reason == mathopt.TerminationReason.OPTIMAL
        _, gap = _gap(bounds.primal_bound, bounds.dual_bound)  # in HiGHS's units: 0 when the tree closed
        return _MipOutcome(positions=positions, bound=bound, gap=gap, optimal=optimal)

    def tighten_memory(self, overshoot: float) -> bool:
        """Lower the memory row's bound by `overshoot` bytes; False when there is no memory row."""
        if self.memory_row is None:
            return False
        self.memory_row.upper_bound = self.memory_row.upper_bound - overshoot / self.memory_scale
        return True


class _OutOfTime(Exception):
    """The time limit passed while the ILP was being written."""


# ------------------------------------------------------------------------------------------- solve


def _check_arguments(problem: object, time_limit_s: object, relative_gap: object) -> None:
    if not isinstance(problem, Problem):
        raise InputError(
            f"expected a solver Problem, found {type(problem).__name__}; "
            "build one from NodeChoices and EdgeCosts."
        )
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not time_limit_s >= 0:
        raise InputError(
            f"expected time_limit_s as seconds >= 0 (math.inf for none), found {time_limit_s!r}."
        )
    if (
        isinstance(relative_gap, bool)
        or not isinstance(relative_gap, (int, float))
        or not 0 <= relative_gap < 1
    ):
        raise InputError(f"expected relative_gap in [0, 1) (e.g. 1e-4 for 0.01 %), found {relative_gap!r}.")


def _gap(objective: float, bound: float) -> tuple[float, float]:
    """(bound, relative gap), the bound clamped into [0, objective]: costs are >= 0."""
    bound = min(max(bound, 0.0), objective)
    return bound, (0.0 if objective == bound else (objective - bound) / objective)


def _search(ilp: _IlpModel, incumbent: list[int], *, deadline: float, relative_gap: float) -> _MipOutcome:
    """HiGHS's best assignment before `deadline`, polished, or `incumbent` when that is no worse.

    The gap is HiGHS's own when its solution is returned, else 1 (to be measured from the bound).

    When rounding the solver's answer overshoots the memory limit (by at most its tolerance), the memory
    row is lowered by the overshoot and the model solved again; only the first solve's bound and proof
    of optimality hold for the problem as given.
    """
    reduction = ilp.r
    first = _MipOutcome(positions=None, bound=-math.inf, gap=1.0, optimal=False)
    for attempt in range(1 + MEMORY_RETRIES):
        outcome = ilp.run(
            seconds=max(0.0, deadline - time.perf_counter()), relative_gap=relative_gap, hint=incumbent
        )
        if attempt == 0:
            first = outcome
        found = outcome.positions
        if found is None:
            break
        overshoot = reduction.overshoot(found)
        if overshoot == 0:
            found = reduction.polish(found)
            if reduction.objective(found) <= reduction.objective(incumbent):
                if attempt == 0:
                    return first._replace(positions=found)
                return _MipOutcome(positions=found, bound=first.bound, gap=1.0, optimal=False)
            break
        if not ilp.tighten_memory(overshoot):
            break
    return _MipOutcome(positions=incumbent, bound=first.bound, gap=1.0, optimal=False)


def solve(
    problem: Problem, *, time_limit_s: float | None = None, relative_gap: float = 1e-4, started: float | None = None
) -> Solution:
    """The cheapest assignment of allowed options that fits the memory limit.

    Raises :class:`~autoshard.solver.problem.NoFeasiblePlan` when no assignment fits, saying how much
    memory per device the leanest one needs. On the time limit, returns the best plan found with status
    ``"feasible"`` and its proven gap. The limit covers the whole call: the reductions and writing the
    ILP count, and a limit that passes before HiGHS starts returns the reductions' incumbent, its gap
    measured against the relaxation's bound (`_Reduction.relaxed_bound`). `started` (a
    `time.perf_counter()` reading, default: now) is when the limit began: the planner counts its
    pricing of the options in.
    """
    start = time.perf_counter() if started is None else started
    if time_limit_s is None:
        time_limit_s = DEFAULT_TIME_LIMIT_S
    _check_arguments(problem, time_limit_s, relative_gap)
    error = infeasibility(problem)
    if error is not None:
        raise error
    deadline = start + time_limit_s
    reduction = _Reduction(problem, deadline)
    incumbent = reduction.polish(reduction.leanest())
    if reduction.free:
        size = reduction.ilp_size()
        # out of time before HiGHS could start: the incumbent, with its gap to the relaxation's bound
        outcome = _MipOutcome(positions=incumbent, bound=-math.inf, gap=1.0, optimal=False)
        try:
            if time.perf_counter() < deadline:
                ilp = _IlpModel(reduction, deadline)
                outcome = _search(ilp, incumbent, deadline=deadline, relative_gap=relative_gap)
        except _OutOfTime:
            pass
    else:  # the reductions alone decided the plan
        size, outcome = (0, 0), _MipOutcome(positions=incumbent, bound=math.inf, gap=0.0, optimal=True)
    positions, optimal = outcome.positions, outcome.optimal
    assert positions is not None
    choices = reduction.choices(positions)
    priced = evaluate(problem, choices)
    bound, gap = _gap(priced.objective, max(outcome.bound, reduction.relaxed_bound()))
    if outcome.gap < gap:  # HiGHS's own measure, free of the rounding in rescaling its bound
        gap = outcome.gap
        bound = priced.objective * (1.0 - gap)
    status = "optimal" if optimal or gap <= relative_gap else "feasible"
    return Solution(
        choices=MappingProxyType(choices),
        objective=priced.objective,
        memory=priced.memory,
        status=status,
        gap=gap,
        bound=bound,
        seconds=time.perf_counter() - start,
        num_variables=size[0],
        num_constraints=size[1],
    )
