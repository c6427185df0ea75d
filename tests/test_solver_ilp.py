"""Tests for ``autoshard.solver``: the ILP against brute force, and the pricing of given plans.

Expected values come from enumerating every assignment (itertools.product) with a pricing loop written
here, independently of ``evaluate`` and of the solver's reductions.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoshard.errors import AutoshardError, InputError
from autoshard.solver import (
    EdgeCosts,
    NodeChoices,
    NoFeasiblePlan,
    PairVar,
    Problem,
    evaluate,
    minimum_memory,
    solve,
)
from autoshard.solver import ilp as ilp_module

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------- brute force


def _price(problem: Problem, choices: Mapping[str, int]) -> tuple[float, float]:
    """Seconds and bytes of an assignment, summed plainly (no fsum, no validation)."""
    objective = sum(n.multiplicity * n.costs[choices[n.name]] for n in problem.nodes)
    objective += sum(e.multiplicity * e.costs[choices[e.src]][choices[e.dst]] for e in problem.edges)
    memory = sum(n.multiplicity * n.memory[choices[n.name]] for n in problem.nodes)
    return objective, memory


def _assignments(problem: Problem):
    names = [n.name for n in problem.nodes]
    options = [sorted(n.allowed) if n.allowed is not None else range(n.num_options) for n in problem.nodes]
    for combo in itertools.product(*options):
        yield dict(zip(names, combo, strict=True))


def _brute_force(problem: Problem) -> tuple[float | None, float]:
    """(optimal objective or None when nothing fits, least memory of any assignment)."""
    best, least = None, math.inf
    for choices in _assignments(problem):
        objective, memory = _price(problem, choices)
        least = min(least, memory)
        if problem.memory_limit is not None and memory > problem.memory_limit:
            continue
        if best is None or objective < best:
            best = objective
    return best, least


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------- strategies

# Small integers make ties, zero rows and separable edges common; floats exercise rounding. Seconds
# below a microsecond are left out: the relative gap of a plan costing 1e-300 s means nothing.
_seconds = st.one_of(st.integers(0, 4).map(float), st.floats(1e-6, 100.0))
_bytes = st.integers(0, 12).map(float)


@st.composite
def _matrix(draw: st.DrawFn, rows: int, cols: int) -> tuple[tuple[float, ...], ...]:
    kind = draw(st.sampled_from(["random", "random", "separable", "zero"]))
    if kind == "zero":
        return tuple((0.0,) * cols for _ in range(rows))
    if kind == "separable":
        a = draw(st.lists(st.integers(0, 4), min_size=rows, max_size=rows))
        b = draw(st.lists(st.integers(0, 4), min_size=cols, max_size=cols))
        return tuple(tuple(float(a[i] + b[j]) for j in range(cols)) for i in range(rows))
    return tuple(tuple(draw(_seconds) for _ in range(cols)) for _ in range(rows))


@st.composite
def problems(draw: st.DrawFn, *, limit: bool = True, max_nodes: int = 6) -> Problem:
    n = draw(st.integers(2, max_nodes))
    nodes = []
    for v in range(n):
        k = draw(st.integers(1, 4))
        allowed = draw(st.one_of(st.none(), st.frozensets(st.integers(0, k - 1), min_size=1)))
        nodes.append(
            NodeChoices(
                name=f"n{v}",
                costs=tuple(draw(_seconds) for _ in range(k)),
                memory=tuple(draw(_bytes) for _ in range(k)),
                multiplicity=draw(st.integers(1, 3)),
                allowed=allowed,
            )
        )
    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
    edges = []
    for u, v in draw(st.lists(pairs, max_size=8)):  # repeated pairs, either way round: parallel edges
        costs = draw(_matrix(nodes[u].num_options, nodes[v].num_options))
        edges.append(EdgeCosts(src=f"n{u}", dst=f"n{v}", costs=costs, multiplicity=draw(st.integers(1, 2))))
    memory_limit = None
    if limit and draw(st.booleans()):
        top = sum(n.multiplicity * max(n.memory) for n in nodes)
        memory_limit = float(draw(st.integers(0, int(top) + 1)))
    return Problem(nodes=tuple(nodes), edges=tuple(edges), memory_limit=memory_limit)


def _chain(n: int, k: int, seed: int, memory_limit: float | None = None) -> Problem:
    rng = random.Random(seed)
    nodes = tuple(
        NodeChoices(
            name=f"layer{v}",
            costs=tuple(rng.uniform(1e-4, 1e-2) for _ in range(k)),
            memory=tuple(float(rng.randrange(1, 1 << 30)) for _ in range(k)),
        )
        for v in range(n)
    )
    edges = tuple(
        EdgeCosts(
            src=f"layer{v}",
            dst=f"layer{v + 1}",
            costs=tuple(tuple(0.0 if s == t else rng.uniform(0, 5e-3) for t in range(k)) for s in range(k)),
        )
        for v in range(n - 1)
    )
    return Problem(nodes=nodes, edges=edges, memory_limit=memory_limit)


# ------------------------------------------------------------------------------ solve vs brute force


@PROPERTY
@given(problems())
def test_solve_matches_brute_force(problem: Problem) -> None:
    best, least = _brute_force(problem)
    if best is None:
        with pytest.raises(NoFeasiblePlan) as info:
            solve(problem)
        assert info.value.minimum_memory == least
        assert info.value.memory_limit == problem.memory_limit
        return
    solution = solve(problem, relative_gap=0.0)
    assert solution.status == "optimal"
    assert _close(solution.objective, best)
    assert 0.0 <= solution.gap <= 1e-6  # HiGHS works to tolerances: a proven gap of 0 is not exact
    assert solution.bound <= solution.objective
    # the plan itself is feasible and has the objective reported
    assert set(solution.choices) == {n.name for n in problem.nodes}
    for node in problem.nodes:
        choice = solution.choices[node.name]
        assert 0 <= choice < node.num_options
        assert node.allowed is None or choice in node.allowed
    objective, memory = _price(problem, solution.choices)
    assert _close(solution.objective, objective)
    assert solution.memory == memory  # integer bytes: exact
    assert problem.memory_limit is None or solution.memory <= problem.memory_limit
    assert solution.seconds >= 0 and solution.num_variables >= 0 and solution.num_constraints >= 0


@PROPERTY
@given(problems(limit=False), st.data())
def test_more_memory_never_worse(problem: Problem, data: st.DataObject) -> None:
    least = minimum_memory(problem)
    top = sum(n.multiplicity * max(n.memory) for n in problem.nodes)
    tight = float(data.draw(st.integers(int(least), int(top) + 1)))
    loose = float(data.draw(st.integers(int(tight), int(top) + 2)))
    results = [
        solve(Problem(nodes=problem.nodes, edges=problem.edges, memory_limit=limit), relative_gap=0.0)
        for limit in (tight, loose, None)
    ]
    for limit, solution in zip((tight, loose), results, strict=False):
        assert solution.memory <= limit
    objectives = [s.objective for s in results]
    assert objectives[1] <= objectives[0] or _close(objectives[1], objectives[0])
    assert objectives[2] <= objectives[1] or _close(objectives[2], objectives[1])


@PROPERTY
@given(problems())
def test_same_problem_same_plan(problem: Problem) -> None:
    try:
        first = solve(problem)
    except NoFeasiblePlan:
        return
    again = solve(problem)
    rebuilt = solve(Problem(nodes=problem.nodes, edges=problem.edges, memory_limit=problem.memory_limit))
    assert dict(first.choices) == dict(again.choices) == dict(rebuilt.choices)
    assert first.objective == again.objective == rebuilt.objective


@PROPERTY
@given(problems(limit=False), st.data())
def test_infeasible_reports_least_memory(problem: Problem, data: st.DataObject) -> None:
    _, least = _brute_force(problem)
    assert minimum_memory(problem) == least
    if least == 0:
        return
    limit = float(data.draw(st.integers(0, int(least) - 1)))
    with pytest.raises(NoFeasiblePlan) as info:
        solve(Problem(nodes=problem.nodes, edges=problem.edges, memory_limit=limit))
    assert info.value.minimum_memory == least
    assert f"({least:.0f} bytes)" in str(info.value) and f"({limit:.0f} bytes)" in str(info.value)
    # exactly the least memory fits
    solution = solve(Problem(nodes=problem.nodes, edges=problem.edges, memory_limit=least))
    assert solution.memory == least


@PROPERTY
@given(problems())
def test_evaluate_matches_direct_pricing(problem: Problem) -> None:
    for choices in itertools.islice(_assignments(problem), 64):
        objective, memory = _price(problem, choices)
        priced = evaluate(problem, choices)
        assert _close(priced.objective, objective)
        assert priced.memory == memory


# ------------------------------------------------------------------------------------ edge cases


def test_empty_allowed_set_is_infeasible() -> None:
    problem = Problem(
        nodes=(
            NodeChoices(name="a", costs=(1.0, 2.0), memory=(1.0, 1.0)),
            NodeChoices(name="b", costs=(1.0,), memory=(1.0,), allowed=frozenset()),
        ),
        edges=(),
    )
    with pytest.raises(NoFeasiblePlan, match="'b'") as info:
        solve(problem)
    assert info.value.minimum_memory == math.inf
    assert isinstance(info.value, AutoshardError)


def test_infinite_memory_limit_is_no_limit() -> None:
    problem = _pair()
    unlimited = solve(problem)
    infinite = solve(Problem(nodes=problem.nodes, edges=problem.edges, memory_limit=math.inf))
    assert dict(infinite.choices) == dict(unlimited.choices) and infinite.objective == unlimited.objective


def test_ties_go_to_the_lowest_option() -> None:
    nodes = tuple(NodeChoices(name=f"n{v}", costs=(1.0,) * 4, memory=(0.0,) * 4) for v in range(4))
    nodes += (NodeChoices(name="hinted", costs=(1.0,) * 4, memory=(0.0,) * 4, allowed=frozenset({3, 2})),)
    square = tuple(tuple(0.0 if s == t else 1.0 for t in range(4)) for s in range(4))
    edges = tuple(EdgeCosts(src=f"n{v}", dst=f"n{v + 1}", costs=square) for v in range(3))
    solution = solve(Problem(nodes=nodes, edges=edges))
    assert dict(solution.choices) == {"n0": 0, "n1": 0, "n2": 0, "n3": 0, "hinted": 2}
    assert solution.objective == 5.0


def test_separable_edges_need_no_variables() -> None:
    nodes = (
        NodeChoices(name="a", costs=(3.0, 1.0), memory=(0.0, 0.0)),
        NodeChoices(name="b", costs=(0.0, 2.0, 1.0), memory=(0.0, 0.0, 0.0)),
    )
    separable = ((1.0, 3.0, 2.0), (2.0, 4.0, 3.0))  # a_s + b_t
    problem = Problem(nodes=nodes, edges=(EdgeCosts(src="a", dst="b", costs=separable),))
    solution = solve(problem)
    assert solution.num_variables == 0 and solution.status == "optimal" and solution.gap == 0.0
    assert dict(solution.choices) == {"a": 1, "b": 0} and solution.objective == 1.0 + 0.0 + 2.0


def test_parallel_edges_merge_into_one_block() -> None:
    nodes = (
        NodeChoices(name="a", costs=(0.0, 0.0), memory=(0.0, 1.0)),
        NodeChoices(name="b", costs=(0.0, 0.0, 0.0), memory=(2.0, 1.0, 0.0)),
    )
    forward = ((0.0, 5.0, 1.0), (4.0, 0.0, 3.0))
    backward = ((1.0, 0.0), (0.0, 2.0), (6.0, 1.0))  # b -> a
    problem = Problem(
        nodes=nodes,
        edges=(
            EdgeCosts(src="a", dst="b", costs=forward),
            EdgeCosts(src="b", dst="a", costs=backward, multiplicity=2),
        ),
        memory_limit=2.0,
    )
    solution = solve(problem)
    assert solution.num_variables == 2 + 3 + 2 * 3  # x for both nodes and a single 2x3 block of y
    model = ilp_module._IlpModel(ilp_module._Reduction(problem))
    assert sorted(model.x.values()) == list(range(5))
    ys = [
        model.y_id(PairVar(src="a", dst="b", src_option=s, dst_option=t)) for s in range(2) for t in range(3)
    ]
    assert ys == list(range(5, 11))
    best, _ = _brute_force(problem)
    assert solution.objective == best


def test_dominated_options_are_dropped() -> None:
    # option 1 of each node repeats option 0 at a higher cost: every node is left with one option
    nodes = tuple(NodeChoices(name=f"n{v}", costs=(1.0, 2.0), memory=(1.0, 1.0)) for v in range(3))
    same_rows = ((1.0, 2.0), (1.0, 2.0))
    edges = tuple(EdgeCosts(src=f"n{v}", dst=f"n{v + 1}", costs=same_rows) for v in range(2))
    solution = solve(Problem(nodes=nodes, edges=edges, memory_limit=10.0))
    assert solution.num_variables == 0
    assert dict(solution.choices) == {"n0": 0, "n1": 0, "n2": 0}


def test_chain_of_300_layers_solves_to_optimal() -> None:
    problem = _chain(300, 8, seed=0)
    solution = solve(problem)
    assert solution.status == "optimal"
    assert solution.gap <= 1e-4
    assert _close(evaluate(problem, solution.choices).objective, solution.objective)
    limited = Problem(nodes=problem.nodes, edges=problem.edges, memory_limit=0.35 * 300 * (1 << 30))
    tight = solve(limited)
    assert tight.status == "optimal" and tight.memory <= limited.memory_limit
    assert tight.objective >= solution.objective * (1 - 1e-4)


def test_time_limit_returns_a_feasible_plan() -> None:
    rng = random.Random(3)
    n, k = 25, 5
    nodes = tuple(
        NodeChoices(
            name=f"d{v}",
            costs=tuple(rng.random() for _ in range(k)),
            memory=tuple(float(rng.randrange(100)) for _ in range(k)),
        )
        for v in range(n)
    )
    edges = tuple(
        EdgeCosts(
            src=f"d{a}", dst=f"d{b}", costs=tuple(tuple(rng.random() for _ in range(k)) for _ in range(k))
        )
        for a in range(n)
        for b in range(a + 1, n)
        if rng.random() < 0.4
    )
    problem = Problem(nodes=nodes, edges=edges, memory_limit=float(40 * n))
    solution = solve(problem, time_limit_s=0.0)
    assert solution.status in ("optimal", "feasible")
    assert solution.memory <= problem.memory_limit
    assert 0.0 <= solution.gap <= 1.0 and solution.bound <= solution.objective
    assert solution.status == "optimal" or solution.gap > 0
    assert _close(evaluate(problem, solution.choices).objective, solution.objective)


@pytest.mark.parametrize("seed", range(6))
def test_no_time_at_all_returns_the_incumbent_and_a_gap_to_a_true_lower_bound(seed: int) -> None:
    """time_limit_s=0 is spent before HiGHS could start: the plan is the reductions' incumbent, and its
    gap is measured against a bound that no assignment beats (checked by enumerating them all)."""
    rng = random.Random(seed)
    n, k = 6, 3
    nodes = tuple(
        NodeChoices(name=f"v{v}", costs=tuple(rng.random() for _ in range(k)),
                    memory=tuple(float(rng.randrange(10)) for _ in range(k)))
        for v in range(n)
    )
    edges = tuple(
        EdgeCosts(src=f"v{a}", dst=f"v{b}", costs=tuple(tuple(rng.random() for _ in range(k)) for _ in range(k)))
        for a in range(n) for b in range(a + 1, n) if rng.random() < 0.5
    )
    problem = Problem(nodes=nodes, edges=edges, memory_limit=float(5 * n))
    best, _ = _brute_force(problem)
    assert best is not None
    quick = solve(problem, time_limit_s=0.0)
    assert quick.memory <= problem.memory_limit
    assert _close(_price(problem, dict(quick.choices))[0], quick.objective)
    assert quick.bound <= best * (1 + 1e-9)  # a true lower bound
    assert _close(quick.gap, 1 - quick.bound / quick.objective)
    assert quick.status == "optimal" or quick.gap > 0
    full = solve(problem, time_limit_s=math.inf)
    assert _close(full.objective, best) and full.status == "optimal"


def test_memory_overshoot_from_rounding_is_solved_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the solver's rounded answer exceeds the limit, the memory row is tightened and solved again.

    Real overshoots are of the order of the solver's tolerance; this one is faked, and large.
    """
    rng = random.Random(7)
    nodes = tuple(
        NodeChoices(name=f"n{v}", costs=(0.0, 1.0, 2.0), memory=(30.0, 20.0, 10.0 + v)) for v in range(4)
    )
    edges = tuple(
        EdgeCosts(
            src=f"n{v}", dst=f"n{v + 1}", costs=tuple(tuple(rng.random() for _ in range(3)) for _ in range(3))
        )
        for v in range(3)
    )
    problem = Problem(nodes=nodes, edges=edges, memory_limit=75.0)
    best, _ = _brute_force(problem)
    real_run = ilp_module._IlpModel.run
    calls: list[int] = []

    def overshooting_run(self: ilp_module._IlpModel, **kwargs: object) -> ilp_module._MipOutcome:
        outcome = real_run(self, **kwargs)
        calls.append(len(calls))
        if len(calls) == 1:  # pretend rounding picked the heaviest option everywhere
            heaviest = [0] * len(self.r.options)
            return outcome._replace(positions=heaviest)
        return outcome

    monkeypatch.setattr(ilp_module._IlpModel, "run", overshooting_run)
    solution = solve(problem, relative_gap=0.0)
    assert len(calls) == 2
    assert solution.memory <= problem.memory_limit
    # the second solve had a tighter row, so only the first solve's bound is reported, honestly
    assert solution.bound <= best * (1 + 1e-9) and best <= solution.objective
    assert solution.gap == pytest.approx((solution.objective - solution.bound) / solution.objective)
    assert solution.status == ("optimal" if solution.gap == 0 else "feasible")


# ---------------------------------------------------------------------------------------- errors


def _pair() -> Problem:
    return Problem(
        nodes=(
            NodeChoices(name="a", costs=(1.0, 2.0), memory=(1.0, 1.0), allowed=frozenset({0})),
            NodeChoices(name="b", costs=(1.0, 2.0, 3.0), memory=(1.0, 1.0, 1.0)),
        ),
        edges=(EdgeCosts(src="a", dst="b", costs=((0.0, 1.0, 2.0), (1.0, 0.0, 2.0))),),
    )


@pytest.mark.parametrize(
    ("choices", "match"),
    [
        ({"a": 0, "b": 3}, r"in 0\.\.2, found 3"),
        ({"a": 1, "b": 0}, r"may only pick options \[0\]"),
        ({"a": 0}, r"no choice for 'b'"),
        ({"a": 0, "b": 0, "c": 1}, r"unknown nodes 'c'"),
        ({"a": "0", "b": 0}, r"option index"),
    ],
)
def test_evaluate_rejects_bad_choices(choices: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        evaluate(_pair(), choices)  # type: ignore[arg-type]


def test_evaluate_prices_a_plan() -> None:
    assert evaluate(_pair(), {"a": 0, "b": 2}) == (1.0 + 3.0 + 2.0, 2.0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: NodeChoices(name="a", costs=(1.0, 2.0), memory=(1.0,)), "one cost and one memory"),
        (lambda: NodeChoices(name="a", costs=(-1.0,), memory=(1.0,)), ">= 0"),
        (lambda: NodeChoices(name="a", costs=(math.inf,), memory=(1.0,)), "finite"),
        (lambda: NodeChoices(name="a", costs=(1.0,), memory=(1.0,), allowed=frozenset({1})), r"found \[1\]"),
        (lambda: NodeChoices(name="a", costs=(1.0,), memory=(1.0,), multiplicity=0), "multiplicity"),
        (lambda: EdgeCosts(src="a", dst="a", costs=((0.0,),)), "self-loop"),
        (lambda: EdgeCosts(src="a", dst="b", costs=((0.0,), (0.0, 1.0))), "rectangular"),
        (
            lambda: Problem(nodes=(NodeChoices(name="a", costs=(1.0,), memory=(1.0,)),) * 2, edges=()),
            "unique node names",
        ),
        (
            lambda: Problem(
                nodes=(NodeChoices(name="a", costs=(1.0,), memory=(1.0,)),),
                edges=(EdgeCosts(src="a", dst="z", costs=((0.0,),)),),
            ),
            "no node named 'z'",
        ),
        (
            lambda: Problem(
                nodes=(
                    NodeChoices(name="a", costs=(1.0,), memory=(1.0,)),
                    NodeChoices(name="b", costs=(1.0, 1.0), memory=(1.0, 1.0)),
                ),
                edges=(EdgeCosts(src="a", dst="b", costs=((0.0,),)),),
            ),
            "shape 1x2",
        ),
        (lambda: Problem(nodes=(), edges=(), memory_limit=-1.0), "memory_limit"),
    ],
)
def test_bad_problems_are_refused(build, match: str) -> None:
    with pytest.raises(InputError, match=match):
        build()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"time_limit_s": -1.0}, "time_limit_s"), ({"relative_gap": 1.0}, "relative_gap")]
)
def test_bad_solver_arguments_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(InputError, match=match):
        solve(_pair(), **kwargs)
