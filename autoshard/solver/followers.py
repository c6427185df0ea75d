"""Merge follower nodes into their leaders so the ILP only decides what is worth deciding.

Most nodes of a training graph are views, transposes, getitems and elementwise ops with one tensor
input. DTensor lets such a node follow whatever placement its input arrives in, at no cost. Giving
each its own ILP variable multiplies the model for nothing: the interesting choices are made by the
matmuls, norms and parameters. A node is a *follower* when

- it has exactly one incoming data edge, with the same multiplicity as itself and its leader, and
- for every option of its leader, it has an option that takes its input exactly as produced.

Its option is then a function of its leader's: `Follow.options[i]` is the follower's option when the
leader picks option i. The follower's own cost, memory and the (backward-only, e.g. a partial
gradient) cost of its input edge are added to the leader's option costs, and edges leaving the
follower leave from the leader instead. This trades nothing the solver could use in practice: a
resharding that would have happened just before a view happens just after it instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from autoshard.solver.blocks import FoldedEdge, FoldedGraph

__all__ = ["Follow", "find_followers", "resolve"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Follow:
    """A follower's option for each option of its leader."""

    leader: str
    options: tuple[int, ...]  # indexed by the leader's option
    edge: FoldedEdge  # the follower's one incoming edge (priced into the leader)


def find_followers(
    folded: FoldedGraph,
    may_follow: Callable[[str], bool],
    options: Mapping[str, Sequence[object]],
    produced: Callable[[FoldedEdge, int], object],
    accepts: Callable[[FoldedEdge, int], object],
) -> dict[str, Follow]:
    """Followers in topological order (a follower's leader is never itself a follower).

    `may_follow(unit)` excludes parameters, inputs, hinted and output nodes; `produced(edge, i)` is the
    spec the edge's source emits under its option i; `accepts(edge, j)` the spec the destination's
    option j wants on that edge.
    """
    incoming: dict[str, list[FoldedEdge]] = defaultdict(list)
    for e in folded.edges:
        incoming[e.dst].append(e)
    follows: dict[str, Follow] = {}
    for unit in folded.units:
        edges = incoming.get(unit, [])
        if len(edges) != 1 or not may_follow(unit):
            continue
        edge = edges[0]
        leader, via = resolve(edge.src, follows)
        m = folded.multiplicity[unit]
        if edge.multiplicity != m or folded.multiplicity[leader] != m:
            continue
        wanted: dict[object, int] = {}
        for j in range(len(options[unit])):
            wanted.setdefault(accepts(edge, j), j)
        anything = wanted.get(None)  # an option that does not care how the input arrives
        chosen = []
        for i in range(len(options[leader])):
            j = wanted.get(produced(edge, via[i] if via is not None else i), anything)
            if j is None:
                break
            chosen.append(j)
        else:
            follows[unit] = Follow(leader=leader, options=tuple(chosen), edge=edge)
    return follows


def resolve(unit: str, follows: Mapping[str, Follow]) -> tuple[str, tuple[int, ...] | None]:
    """The leader standing behind `unit` and, if `unit` follows it, unit's option per leader option."""
    f = follows.get(unit)
    return (unit, None) if f is None else (f.leader, f.options)
