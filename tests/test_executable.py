"""strategies/executable.py against DTensor's dispatch: what it excludes fails there, what it keeps runs.

A convolution's options on {"dp": 2, "tp": 2} are each run through DTensor on 4 simulated ranks (fake
process group, LocalTensorMode), inputs distributed as the option says; the result must be the
single-device one in the claimed placement. The excluded option ([S(0), S(0)] batch) must fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from autoshard.errors import InputError
from autoshard.strategies import MeshSpec, node_options
from autoshard.strategies.executable import unexecutable_reason

WORLD = 4
BATCH_ON_BOTH = (Shard(0), Shard(0))


def conv_node():
    torch.manual_seed(0)
    model = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(8, 4, 8, 8)
    graph = torch.export.export(model, (x,), strict=False).graph
    node = next(n for n in graph.nodes if n.op == "call_function")
    values = {"p_weight": model.weight.detach(), "p_bias": model.bias.detach()}
    return node, [values.get(n.name, x) for n in node.all_input_nodes], model(x).detach()


def run(node, values, specs, mesh):
    args = {n: distribute_tensor(v, mesh, s) for n, v, s in zip(node.all_input_nodes, values, specs, strict=True)}
    return node.target(*[args[a] if isinstance(a, torch.fx.Node) else a for a in node.args])


def test_convolution_batch_on_two_axes_is_excluded_and_really_fails(fake_world) -> None:
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.distributed.device_mesh import init_device_mesh

    node, values, want = conv_node()
    options = node_options(node, MeshSpec.of({"dp": 2, "tp": 2}))
    assert options and all(o.inputs[0] != BATCH_ON_BOTH for o in options)
    r = (Replicate(), Replicate())
    assert unexecutable_reason(node.target, (BATCH_ON_BOTH, r, r)) is not None
    with LocalTensorMode(WORLD):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for o in options:  # every kept option runs and is right
            out = run(node, values, [s or r for s in o.inputs], mesh)
            assert tuple(out.placements) == o.output[0], str(o)
            torch.testing.assert_close(out.full_tensor(), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="already sharded"):  # the excluded one fails in DTensor
            run(node, values, [BATCH_ON_BOTH, r, r], mesh)


def test_codegen_refuses_a_plan_holding_an_unexecutable_option() -> None:
    import dataclasses

    import autoshard
    from autoshard.passes import codegen

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 1))
    x = torch.randn(8, 4, 8, 8)
    ir = autoshard.capture(model, (x,))
    plan = autoshard.plan_graph(ir, "cpu:4", mesh={"dp": 2, "tp": 2})
    conv = next(d for d in plan.nodes if d.op.startswith("aten.conv2d"))
    edited = dataclasses.replace(conv, inputs=("(S(0), S(0))", *conv.inputs[1:]))
    plan = dataclasses.replace(plan, nodes=tuple(edited if d is conv else d for d in plan.nodes))
    with pytest.raises(InputError, match=rf"plan node {conv.node} .*more than one mesh axis"):
        codegen(ir, plan)
