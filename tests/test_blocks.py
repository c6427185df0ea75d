"""Folding identical repeated blocks: one representative block stands for all of them."""

from __future__ import annotations

import torch
from torch import nn

import autoshard
from autoshard.ir import NodeKind
from autoshard.models import build
from autoshard.solver.blocks import fold_blocks, unit_of


def capture(name: str, layers: int | None = None, seq: int = 8):
    overrides = {"n_layer": layers} if layers else {}
    model = build(name, device="meta", **overrides)
    idx = torch.zeros(2, seq, dtype=torch.long, device="meta")
    return autoshard.capture(model, (idx, idx))


def test_folded_graph_size_does_not_grow_with_depth() -> None:
    shallow, deep = fold_blocks(capture("gpt-tiny", layers=2)), fold_blocks(capture("gpt-tiny", layers=12))
    assert len(shallow.units) == len(deep.units)
    assert deep.blocks == {"transformer.h": 12}


def test_multiplicities_account_for_every_node_and_edge() -> None:
    ir = capture("gpt-tiny", layers=5)
    folded = fold_blocks(ir)
    units = unit_of(ir)
    # every unit is represented exactly once: multiplicities add up to the number of units
    assert sum(folded.multiplicity.values()) == len(set(units.values()))
    # every data edge of the graph (between units, excluding the output node) is counted once
    edges = sum(
        1
        for n in ir.nodes
        if n.kind is not NodeKind.OUTPUT
        for src in n.inputs
        if units[src] != units[n.name]
    )
    assert sum(e.multiplicity for e in folded.edges) == edges


def test_block_to_block_edges_have_multiplicity_layers_minus_one() -> None:
    ir = capture("gpt-tiny", layers=4)
    folded = fold_blocks(ir)
    rep = folded.representative
    # the residual stream leaves block i and enters block i+1: folded, both ends are in block 0
    block0 = {n.name for n in ir.nodes if n.module.startswith("transformer.h.0")}
    chain = [e for e in folded.edges if e.multiplicity == 3]
    assert chain and all(e.src in block0 and e.dst in block0 for e in chain)
    # parameters of block 3 are represented by block 0's parameters
    assert rep["transformer.h.3.attn.c_attn.weight"] == "transformer.h.0.attn.c_attn.weight"
    # the tied embedding is one unit, outside the blocks
    assert folded.multiplicity["transformer.wte.weight"] == 1


def test_blocks_that_differ_are_not_folded() -> None:
    class Uneven(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x.sum()

    ir = autoshard.capture(Uneven(), torch.randn(2, 8))
    folded = fold_blocks(ir)
    assert folded.blocks == {}
    assert set(folded.multiplicity.values()) == {1}


def test_llama_and_moe_layers_fold() -> None:
    assert fold_blocks(capture("llama-tiny", layers=3)).blocks == {"layers": 3}
    assert fold_blocks(capture("moe-tiny", layers=3)).blocks == {"layers": 3}
