"""Find identical repeated blocks (transformer layers) so the ILP solves one and reuses it.

A 96-layer model has 96 copies of the same block. Solving them jointly multiplies the ILP by 96 for
nothing: with every block forced to the same choices, one representative block carries the cost of
all of them. `fold_blocks` builds that quotient graph:

- a node of block 0 stands for itself and its copies in blocks 1..L-1 (multiplicity L);
- an edge inside a block has multiplicity L;
- an edge from block i-1 into block i becomes an edge between representatives with multiplicity L-1,
  and block 0's edge from the prologue keeps multiplicity 1 (likewise into the epilogue);
- an edge from a node outside the blocks that feeds every block (RoPE tables, say) has multiplicity L.

Blocks are the children of a module container indexed by integers (`transformer.h.3`,
`layers.17`). They are folded only when all of them are structurally identical (same ops, shapes,
parameter shapes and wiring); otherwise the graph is solved unfolded, which is always correct.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from autoshard.ir.graph import GraphIR, NodeInfo, NodeKind

__all__ = ["FoldedGraph", "FoldedEdge", "fold_blocks", "repeated_blocks"]

_INDEXED = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)(?:\.|$)")


@dataclass(frozen=True, kw_only=True, slots=True)
class FoldedEdge:
    """A data edge of the quotient graph: `src` feeds input slot `slot` of `dst`."""

    src: str  # representative of the producing unit (a node name, or a parameter's canonical name)
    dst: str  # representative of the consuming node
    slot: int  # index into the consumer's `inputs`
    multiplicity: int


@dataclass(frozen=True, kw_only=True, slots=True)
class FoldedGraph:
    """The graph the solver sees: representatives, their multiplicities, and folded edges."""

    representative: Mapping[str, str]  # every unit name -> the unit standing for it
    multiplicity: Mapping[str, int]  # representative -> how many copies it stands for
    edges: tuple[FoldedEdge, ...]
    blocks: Mapping[str, int]  # container name -> number of folded blocks (e.g. {"transformer.h": 12})

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.multiplicity)


def unit_of(ir: GraphIR) -> dict[str, str]:
    """Node name -> unit: placeholders of one parameter tensor are one unit (tied weights), named by
    the parameter's canonical name; every other node is its own unit."""
    units = {n.name: n.name for n in ir.nodes if n.kind is not NodeKind.OUTPUT}
    for p in ir.params:
        for node in p.nodes:
            units[node] = p.name
    return units


def fold_blocks(ir: GraphIR, *, fold: bool = True) -> FoldedGraph:
    """The quotient graph of `ir` with identical repeated blocks folded onto block 0."""
    units = unit_of(ir)
    block_of = _block_membership(ir) if fold else {}
    by_block: dict[tuple[str, int], list[str]] = defaultdict(list)
    for node in ir.nodes:
        if node.name in units and node.name in block_of:
            by_block[block_of[node.name]].append(node.name)

    representative = {u: u for u in dict.fromkeys(units.values())}
    folded: dict[str, int] = {}
    for container in sorted({c for c, _ in by_block}):
        blocks = [by_block[(c, i)] for c, i in sorted(by_block) if c == container]
        mapping = _match_blocks(ir, blocks, units)
        if mapping is None:
            continue
        for name, rep in mapping.items():
            representative[units[name]] = units[rep]
        folded[container] = len(blocks)

    multiplicity: dict[str, int] = defaultdict(int)
    for unit, rep in representative.items():
        multiplicity[rep] += 1

    counts: dict[tuple[str, str, int], int] = defaultdict(int)
    for node in ir.nodes:
        if node.kind is NodeKind.OUTPUT or node.name not in units:
            continue
        dst = representative[units[node.name]]
        for slot, src_node in enumerate(node.inputs):
            counts[(representative[units[src_node]], dst, slot)] += 1
    edges = tuple(
        FoldedEdge(src=s, dst=d, slot=k, multiplicity=m) for (s, d, k), m in counts.items() if s != d
    )
    return FoldedGraph(
        representative=representative, multiplicity=dict(multiplicity), edges=edges, blocks=folded
    )


def repeated_blocks(ir: GraphIR) -> tuple[str, ...]:
    """Module paths of the model's repeated blocks in execution order (`transformer.h.0`, ...): the
    children of the integer-indexed container with the most children that computation runs in. These
    are the units pipeline stages are cut between and recomputation is decided for; identical or not."""
    seen: dict[str, dict[int, None]] = defaultdict(dict)
    for container, index in _block_membership(ir).values():
        seen[container][index] = None
    if not seen:
        return ()
    container = max(seen, key=lambda c: (len(seen[c]), c))
    return tuple(f"{container}.{i}" for i in sorted(seen[container]))


def _block_membership(ir: GraphIR) -> dict[str, tuple[str, int]]:
    """Node name -> (container, index) for nodes inside an integer-indexed child module.

    Computations are placed by their module path; parameter placeholders by their parameter name
    (they carry no module). A tied parameter used across blocks belongs to none.
    """
    member: dict[str, tuple[str, int]] = {}
    for node in ir.nodes:
        if node.kind is NodeKind.CALL and node.module:
            key = _block_key(node.module)
            if key:
                member[node.name] = key
    for p in ir.params:
        keys = {_block_key(name) for name in p.names}
        if len(keys) == 1 and (key := keys.pop()):
            for node in p.nodes:
                member[node] = key
    return member


def _block_key(path: str) -> tuple[str, int] | None:
    match = _INDEXED.match(path)
    return (match["container"], int(match["index"])) if match else None


def _match_blocks(
    ir: GraphIR, blocks: list[list[str]], units: Mapping[str, str]
) -> dict[str, str] | None:
    """Map every node of blocks 1.. to its counterpart in block 0, or None if they differ.

    Two blocks match when, position by position, nodes have the same kind, op and output shapes,
    and each input comes from the same place: the same position inside the block, the same
    position of the previous block, or the same node outside (block 0 alone may read the prologue
    where the others read the previous block).
    """
    if len(blocks) < 2:
        return None
    index = {name: (b, pos) for b, names in enumerate(blocks) for pos, name in enumerate(names)}
    nodes = {n.name: n for n in ir.nodes}

    def signature(b: int) -> list[tuple[object, ...]] | None:
        sig: list[tuple[object, ...]] = []
        for name in blocks[b]:
            node = nodes[name]
            refs: list[tuple[object, ...]] = []
            for src in node.inputs:
                where = index.get(src)
                if where is None:
                    refs.append(("outside", units[src]))
                elif where[0] == b:
                    refs.append(("inside", where[1]))
                elif where[0] == b - 1:
                    refs.append(("previous", where[1]))
                else:
                    return None  # reads a block further back: not a simple chain
            sig.append((node.kind, node.op, _shapes(node), tuple(refs)))
        return sig

    reference = signature(1)
    if reference is None:
        return None
    for b in range(2, len(blocks)):
        if signature(b) != reference:
            return None
    first = signature(0)
    if first is None or len(first) != len(reference):
        return None
    for got, want in zip(first, reference):
        if got[:3] != want[:3] or len(got[3]) != len(want[3]):
            return None
        for g, w in zip(got[3], want[3]):
            if g != w and not (w[0] == "previous" and g[0] == "outside"):
                return None
    return {name: blocks[0][pos] for b in range(1, len(blocks)) for pos, name in enumerate(blocks[b])}


def _shapes(node: NodeInfo) -> tuple[tuple[int, ...], ...]:
    return tuple(m.shape for m in node.outputs)
