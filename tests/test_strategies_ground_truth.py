"""Ground truth for `node_options`: every option of every node of GPT, Llama and MoE is run for real.

For each call node and each option on meshes {"tp": 4}, {"dp": 2, "tp": 2} and {"dp": 4}, the node's
real input values (from one unsharded run of the exported graph) are cut into per-rank pieces by the
option's input placements -- Partial inputs as random summands that add (or average) back to the value --
and the op runs on a single-process 4-rank simulation (`LocalTensorMode`, fake process group). The
result, read with the option's claimed output placement, must equal the unsharded result.

Ops whose arguments hold global sizes (view, reshape, expand) cannot run on local pieces as they are;
those are dispatched through DTensor, and its output placement must equal the claim.
The pieces are cut here, not by DTensor, so the check does not trust DTensor's own sharding code.

Backward: a forward rule can be right while DTensor's rule for the op's backward is wrong (mse_loss on a
batch-sharded input in torch 2.13: the loss right, gradients x dp). So each op signature of the
reference models, of models nobody here wrote (tests/zoo.py) and of an mse_loss MLP is also run through
DTensor autograd (tests/dtensor_sim.backward_problem) with a fixed-seed sample of its options, and its
input gradients compared with the unsharded ones. Rules found wrong go to strategies/exclusions.py.
"""

from __future__ import annotations

import operator
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.fx import Node

import dtensor_sim as sim
from autoshard.strategies import MeshSpec, ShardingOption, node_options, spec_str

pytestmark = pytest.mark.slow

WORLD = sim.WORLD
MESHES = ({"tp": 4}, {"dp": 2, "tp": 2}, {"dp": 4})
MODELS = ("gpt-tiny", "llama-tiny", "moe-tiny")
aten = torch.ops.aten
# ops whose non-tensor arguments are global sizes: run through DTensor, which rewrites them to local ones
GLOBAL_SIZE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _captured(name: str) -> tuple[Any, dict[str, Any]]:
    """The exported program of a tiny model and every node's real value from one unsharded run."""
    cap = sim.capture_reference(name)
    return cap.ep, cap.values


_coords, _piece, _assemble = sim.coords, sim.piece, sim.assemble


def _check(node: Node, opt: ShardingOption, values: dict[str, Any], mesh, spec_mesh: MeshSpec) -> str | None:
    """None when the option reproduces the unsharded result, else a description of the mismatch.

    Raw ops run once per simulated rank on that rank's pieces (what LocalTensorMode does for an op
    without collectives, at a fraction of its dispatch cost); ops with global-size arguments run under
    LocalTensorMode on DTensors so that DTensor rewrites the sizes.
    """
    sizes = spec_mesh.sizes
    ranks = [_coords(r, sizes) for r in range(WORLD)]
    r_spec = tuple(Replicate() for _ in sizes)
    in_specs = {n.name: (s if s is not None else r_spec) for n, s in zip(node.all_input_nodes, opt.inputs)}
    expected = values[node.name]
    expected_list = list(expected) if isinstance(expected, (list, tuple)) else [expected]

    def args_for(leaf: Any) -> tuple[tuple, dict]:
        def arg(a: Any) -> Any:
            if isinstance(a, Node):
                return leaf(values[a.name], in_specs[a.name])
            if isinstance(a, (list, tuple)):
                return type(a)(arg(e) for e in a)
            return a

        return tuple(arg(a) for a in node.args), {k: arg(v) for k, v in node.kwargs.items()}

    per_rank: list[list[torch.Tensor]] = []
    got_specs: list[tuple | None] = list(opt.output)
    if node.target in GLOBAL_SIZE_OPS:
        def to_dtensor(v: torch.Tensor, spec: tuple) -> DTensor:
            lt = LocalTensor({r: _piece(v, spec, c, sizes) for r, c in enumerate(ranks)})
            return DTensor.from_local(lt, mesh, spec, run_check=False, shape=v.shape, stride=v.stride())

        with LocalTensorMode(WORLD):
            args, kwargs = args_for(to_dtensor)
            out = node.target(*args, **kwargs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        got_specs = [tuple(o.placements) for o in outs]
        for i, (got, claim) in enumerate(zip(got_specs, opt.output, strict=True)):
            if claim is not None and got != tuple(claim):
                return f"output {i}: DTensor produced {spec_str(got)}, claimed {spec_str(claim)}"
        per_rank = [[o.to_local()._local_tensors[r] for o in outs] for r in range(WORLD)]
    else:
        for c in ranks:
            args, kwargs = args_for(lambda v, spec, c=c: _piece(v, spec, c, sizes))
            out = node.target(*args, **kwargs)
            per_rank.append(list(out) if isinstance(out, (list, tuple)) else [out])
    for i, (want, claim) in enumerate(zip(expected_list, opt.output, strict=True)):
        if claim is None or not isinstance(want, torch.Tensor):
            continue
        full = _assemble({c: per_rank[r][i] for r, c in enumerate(ranks)}, tuple(claim), sizes)
        if full is None:
            return f"output {i}: claimed {spec_str(claim)} but ranks disagree on a replicated axis"
        if full.shape != want.shape:
            return f"output {i}: claimed {spec_str(claim)} assembles to shape {tuple(full.shape)}"
        ok = torch.allclose(full, want, rtol=1e-4, atol=1e-4) if want.is_floating_point() else torch.equal(full, want)
        if not ok:
            return f"output {i}: values differ (claimed {spec_str(claim)})"
    return None


def _signature(x: Any) -> Any:
    if isinstance(x, Node):
        v = x.meta.get("val")
        return ("T", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("N", repr(v))
    if isinstance(x, (list, tuple)):
        return tuple(_signature(e) for e in x)
    return repr(x)


@pytest.mark.parametrize("model_name", MODELS)
def test_every_option_of_every_node_reproduces_the_unsharded_result(fake_world, model_name: str) -> None:
    ep, values = _captured(model_name)
    failures: list[str] = []
    checked, seen = 0, set()
    t0 = time.perf_counter()
    for mesh_dict in MESHES:
        spec_mesh = MeshSpec.of(mesh_dict)
        mesh = init_device_mesh("cpu", spec_mesh.sizes, mesh_dim_names=spec_mesh.names)
        for node in ep.graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue  # placeholders / getitem only relabel a value; factory ops below have no inputs
            if not node.all_input_nodes or not isinstance(values.get(node.name), (torch.Tensor, list, tuple)):
                continue
            sig = (node.target, _signature(node.args), _signature(node.kwargs))
            for opt in node_options(node, spec_mesh):
                key = (sig, opt, spec_mesh)
                if key in seen:
                    continue  # an identical layer's identical option was already run
                seen.add(key)
                checked += 1
                try:
                    problem = _check(node, opt, values, mesh, spec_mesh)
                except Exception as exc:  # noqa: BLE001 - a crash is a failed option too
                    problem = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if problem:
                    failures.append(f"{spec_mesh} {node.name} ({node.target}) {opt}: {problem}")
    elapsed = time.perf_counter() - t0
    print(f"{model_name}: {checked} options checked in {elapsed:.1f}s")
    assert not failures, f"{len(failures)} of {checked} options are wrong:\n" + "\n".join(failures[:40])


def test_the_check_rejects_wrong_claims(fake_world) -> None:
    """Negative control: a wrong output claim or a wrongly placed input must be caught."""
    ep, values = _captured("gpt-tiny")
    spec_mesh = MeshSpec.of({"tp": 4})
    mesh = init_device_mesh("cpu", spec_mesh.sizes, mesh_dim_names=spec_mesh.names)
    linear = next(n for n in ep.graph.nodes if n.target is aten.linear.default)
    col = ShardingOption(output=((Shard(2),),), inputs=((Replicate(),), (Shard(0),), (Shard(0),)))
    assert _check(linear, col, values, mesh, spec_mesh) is None
    for wrong in (
        ShardingOption(output=((Shard(1),),), inputs=col.inputs),  # wrong output dim
        ShardingOption(output=((Partial(),),), inputs=col.inputs),  # wrong kind
        ShardingOption(output=((Replicate(),),), inputs=col.inputs),  # ranks disagree
        ShardingOption(output=((Shard(2),),), inputs=((Replicate(),), (Shard(1),), (Shard(0),))),  # weight
    ):
        try:
            problem = _check(linear, wrong, values, mesh, spec_mesh)
        except RuntimeError as exc:  # shapes that do not fit are a rejection too (the main test fails on it)
            problem = str(exc)
        assert problem is not None, wrong


# ------------------------------------------------------------------------------------------ backward

# Reference models, models nobody here wrote (tests/zoo.py) and a regression MLP on F.mse_loss.
BACKWARD_SOURCES = (*MODELS, "zoo:gpt2", "zoo:llama", "zoo:bert", "zoo:vit", "zoo:resnet", "zoo:nanogpt", "mse-mlp")
# Placement names do not change numerics, so {"tp": 4} would repeat {"dp": 4}.
# (mesh, options sampled per op signature): a fixed-seed sample, one option per signature and mesh in CI
# (every signature is still checked on both meshes), two on dp4 with AUTOSHARD_FULL=1
BACKWARD_MESHES = (({"dp": 4}, 2 if os.environ.get("AUTOSHARD_FULL") else 1), ({"dp": 2, "tp": 2}, 1))
# Ops the generated program does not hand to DTensor (passes/codegen.py runs them on local shards).
LOCAL_IN_CODEGEN = {aten.scaled_dot_product_attention.default: "codegen runs SDPA on local shards (local_attention)"}


def _capture(source: str) -> sim.Captured:
    if source == "mse-mlp":
        return sim.capture_mse_mlp()
    if source.startswith("zoo:"):
        return sim.capture_zoo(source.removeprefix("zoo:"))
    return sim.capture_reference(source)


def _skip_reason(node: Node, opt: ShardingOption | None = None) -> str | None:
    """Why a node (or one of its options) is not run through DTensor here, or None to run it."""
    if node.target in LOCAL_IN_CODEGEN:
        return LOCAL_IN_CODEGEN[node.target]
    if opt is not None and any(isinstance(p, _StridedShard) for s in opt.inputs if s for p in s):
        return "codegen chunks _StridedShard inputs locally (local_chunk)"
    return None


def _sample(node: Node, opts: list[ShardingOption], sig: tuple, k: int) -> list[ShardingOption]:
    """At most `k` options, drawn with a seed fixed by the signature's text; every option of a node
    with a scalar result (the losses: few nodes, and where a reduction over a sharded batch meets its
    backward, as mse_loss's did)."""
    val = node.meta.get("val")
    if len(opts) <= k or (isinstance(val, torch.Tensor) and val.ndim == 0):
        return opts
    return random.Random(sim.signature_seed(sig)).sample(opts, k)


def _backward_nodes(cap: sim.Captured) -> Iterator[Node]:
    """Call nodes with a floating result and a differentiable input: the ones backward passes through."""
    for node in cap.ep.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or not node.all_input_nodes:
            continue
        val = cap.values.get(node.name)
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        if not any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals):
            continue
        if any(n.name in cap.differentiable for n in node.all_input_nodes):
            yield node


def test_every_sampled_option_gives_the_unsharded_gradients(fake_world) -> None:
    """Each op signature of the sources, on each mesh, with a sample of its options: DTensor autograd
    from pieces in the option's input placements must give the unsharded values and input gradients.

    Repeated layers share a signature and are checked once. Nodes codegen runs locally are skipped,
    and so are sources or signatures that cannot be captured or enumerated, each with its reason
    printed; the test then asserts that mse_loss was among those actually checked.
    """
    failures: list[str] = []
    skipped: dict[str, int] = {}
    diverged: list[str] = []
    checked_ops: set[Any] = set()
    seen: set[tuple] = set()
    caps = []
    for source in BACKWARD_SOURCES:
        try:
            caps.append(_capture(source))
        except Exception as exc:  # noqa: BLE001 - a model that does not capture is recorded, not fatal
            skipped[f"{source}: capture raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"] = 1
    checked, t0 = 0, time.perf_counter()
    for mesh_dict, per_signature in BACKWARD_MESHES:
        spec_mesh = MeshSpec.of(mesh_dict)
        mesh = init_device_mesh("cpu", spec_mesh.sizes, mesh_dim_names=spec_mesh.names)
        for cap in caps:
            for node in _backward_nodes(cap):
                sig = sim.signature(node)
                if (sig, spec_mesh) in seen:
                    continue
                seen.add((sig, spec_mesh))
                if reason := _skip_reason(node):
                    skipped[f"{node.target}: {reason}"] = skipped.get(f"{node.target}: {reason}", 0) + 1
                    continue
                for opt in _sample(node, node_options(node, spec_mesh), sig, per_signature):
                    if reason := _skip_reason(node, opt):
                        skipped[f"{node.target}: {reason}"] = skipped.get(f"{node.target}: {reason}", 0) + 1
                        continue
                    checked += 1
                    checked_ops.add(node.target)
                    notes: list[str] = []
                    try:
                        problem = sim.backward_problem(node, opt, cap, mesh, spec_mesh, notes)
                    except Exception as exc:  # noqa: BLE001 - an option DTensor cannot run is a failed option
                        problem = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    where = f"{cap.name} {spec_mesh} {node.name} ({node.target}) {opt}"
                    if problem:
                        failures.append(f"{where}: {problem}")
                    diverged += [f"{where}: {n}" for n in notes]
    print(f"backward: {checked} options checked in {time.perf_counter() - t0:.1f}s")
    for reason, count in sorted(skipped.items()):
        print(f"  skipped {count}x {reason}")
    for line in diverged:
        print(f"  DTensor ran another placement than claimed (values checked with its own): {line}")
    assert aten.mse_loss.default in checked_ops, "mse_loss, the op this check exists for, was not checked"
    assert not failures, f"{len(failures)} of {checked} options are wrong:\n" + "\n".join(failures[:40])
