"""passes/codegen.py's write-back of in-place ops into moved tensors, on hand-built graphs.

A plan may move (redistribute) the tensor an in-place op writes into, or the base of a view chain that
leads to it; the op then writes into the copy. Each graph here runs once eagerly on plain tensors and
once on 4 simulated ranks with the redistributions in place: after `_write_back_mutations` every
reader must see the writes the eager run made.
"""

from __future__ import annotations

import torch
from torch.distributed._local_tensor import LocalTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.fx import Graph, GraphModule

from autoshard.passes.codegen import _write_back_mutations, redistribute, write_back

aten = torch.ops.aten


def _graph(moved_base: bool) -> tuple[GraphModule, dict]:
    """x -> [moved] -> slice -> [moved] -> fill_(5); x[:, :1].fill_(-1) through a moved view; x * 2.

    `moved_base`: the base of the first chain is moved before the slice (a view of the copy);
    otherwise the slice is moved before the fill (the copy of a view).
    """
    g = Graph()
    x = g.placeholder("x")
    moved = {}
    if moved_base:
        r = g.call_function(redistribute, (x, "(R)"))
        moved[r] = (x, "(S(0))")
        v = g.call_function(aten.slice.Tensor, (r, 1, 1, 3))
        g.call_function(aten.fill_.Scalar, (v, 5.0))
    else:
        v = g.call_function(aten.slice.Tensor, (x, 1, 1, 3))
        r = g.call_function(redistribute, (v, "(R)"))
        moved[r] = (v, "(S(0))")
        g.call_function(aten.fill_.Scalar, (r, 5.0))
    head = g.call_function(aten.slice.Tensor, (x, 1, 0, 1))
    r2 = g.call_function(redistribute, (head, "(R)"))
    moved[r2] = (head, "(S(0))")
    g.call_function(aten.fill_.Scalar, (r2, -1.0))
    g.output(g.call_function(aten.mul.Tensor, (x, 2.0)))
    return GraphModule(torch.nn.Module(), g), moved


def _eager(full: torch.Tensor) -> torch.Tensor:
    x = full.clone()
    x[:, 1:3].fill_(5.0)
    x[:, :1].fill_(-1.0)
    return x * 2.0


def _run(gm: GraphModule, full: torch.Tensor) -> torch.Tensor:
    with LocalTensorMode(4):
        mesh = init_device_mesh("cpu", (4,))
        whole = gm(distribute_tensor(full.clone(), mesh, [Shard(0)])).full_tensor()
        return whole.reconcile()  # a LocalTensor (equal on every rank) as one plain tensor


def test_writes_through_moved_copies_reach_the_original(fake_world) -> None:
    full = torch.arange(32.0).reshape(8, 4)
    for moved_base in (True, False):
        gm, moved = _graph(moved_base)
        lost = _run(GraphModule(torch.nn.Module(), gm.graph), full)
        assert not torch.equal(lost, _eager(full))  # without write-backs the writes are lost
        comments, inserted = {}, []
        _write_back_mutations(gm.graph, moved, comments, inserted)
        gm.recompile()
        assert [n.target for n in gm.graph.nodes].count(write_back) == 2
        assert len(inserted) == 2 and all("write-back" in e.collectives[0] for e in inserted)
        torch.testing.assert_close(_run(gm, full), _eager(full), rtol=0, atol=0)
