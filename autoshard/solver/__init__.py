"""Choose one sharding option per node: the problem, its exact pricing and the ILP that solves it.

:mod:`autoshard.solver.problem` defines the torch-independent problem (:class:`Problem` of
:class:`NodeChoices` and :class:`EdgeCosts`), the :class:`Solution` and :func:`evaluate` for pricing a
given assignment; :mod:`autoshard.solver.ilp` holds :func:`solve` (HiGHS through OR-Tools MathOpt).
"""

from autoshard.solver.ilp import ChoiceVar, PairVar, solve
from autoshard.solver.problem import (
    EdgeCosts,
    Evaluation,
    NodeChoices,
    NoFeasiblePlan,
    Problem,
    Solution,
    evaluate,
    minimum_memory,
)

__all__ = [
    "ChoiceVar",
    "EdgeCosts",
    "Evaluation",
    "NoFeasiblePlan",
    "NodeChoices",
    "PairVar",
    "Problem",
    "Solution",
    "evaluate",
    "minimum_memory",
    "solve",
]
