"""Ground truth for `node_options`: every option of every node of GPT, Llama and MoE is run for real.

For each call node and each option on meshes {"tp": 4}, {"dp": 2, "tp": 2} and {"dp": 4}, the node's
real input values (from one unsharded run of the exported graph) are cut into per-rank pieces by the
option's input placements -- Partial inputs as random summands that add (or average) back to the value --
and the op runs on a single-process 4-rank simulation (`LocalTensorMode`, fake process group). The
result, read with the option's claimed output placement, must equal the unsharded result.

Ops whose arguments hold global sizes (view, reshape, expand) cannot run on local pieces as they are;
those are dispatched through DTensor, and its output placement must equal the claim.
The pieces are cut here, not by DTensor, so the check does not trust DTensor's own sharding code.
"""

from __future__ import annotations

import operator
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.export.graph_signature import InputKind
from torch.fx import Interpreter, Node
from torch.testing._internal.distributed.fake_pg import FakeStore

import autoshard
from autoshard.strategies._dtensor import reset_caches
from autoshard.models import build
from autoshard.strategies import MeshSpec, ShardingOption, node_options, spec_str

pytestmark = pytest.mark.slow

WORLD = 4
MESHES = ({"tp": 4}, {"dp": 2, "tp": 2}, {"dp": 4})
MODELS = ("gpt-tiny", "llama-tiny", "moe-tiny")
aten = torch.ops.aten
# ops whose non-tensor arguments are global sizes: run through DTensor, which rewrites them to local ones
GLOBAL_SIZE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


@pytest.fixture(scope="module")
def fake_world():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()
    reset_caches()  # DTensor caches this world's meshes by layout


def _captured(name: str) -> tuple[Any, dict[str, Any]]:
    """The exported program of a tiny model and every node's real value from one unsharded run."""
    torch.manual_seed(0)
    model = build(name, device="cpu")
    idx = torch.randint(0, 128, (4, 16))
    targets = torch.randint(0, 128, (4, 16))
    ep = autoshard.capture(model, (idx, targets)).exported
    state = {**ep.state_dict, **ep.constants}
    user = iter((idx, targets))
    flat = [
        next(user) if spec.kind is InputKind.USER_INPUT else state[spec.target].detach()
        for spec in ep.graph_signature.input_specs
    ]
    values: dict[str, Any] = {}

    class Recorder(Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad():
        Recorder(ep.graph_module).run(*flat)
    return ep, values


def _coords(rank: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(sizes):
        out.append(rank % s)
        rank //= s
    return tuple(reversed(out))


def _piece(value: torch.Tensor, spec: tuple, coords: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """This rank's piece of `value` under `spec`, cut left to right over the mesh axes."""
    local = value
    gen = torch.Generator().manual_seed(1234)
    for axis, (p, n, c) in enumerate(zip(spec, sizes, coords, strict=True)):
        if isinstance(p, _StridedShard):  # each of split_factor chunks sharded, this rank's slices joined
            local = torch.cat([part.chunk(n, p.dim)[c] for part in local.chunk(p.split_factor, p.dim)], p.dim)
        elif isinstance(p, Shard):
            local = local.chunk(n, p.dim)[c]
        elif isinstance(p, Partial):
            if local.is_floating_point():
                gen.manual_seed(1000 + axis)
                base = torch.randn(local.shape, generator=gen, dtype=local.dtype)
                noise = (c - (n - 1) / 2) * base
                local = (local / n if p.reduce_op == "sum" else local) + noise
            elif p.reduce_op == "sum":
                local = local if c == 0 else torch.zeros_like(local)
    return local.contiguous()


def _assemble(pieces: dict[tuple[int, ...], torch.Tensor], spec: tuple, sizes: tuple[int, ...]) -> torch.Tensor | None:
    """The global value that per-rank `pieces` represent under `spec`; None when replicated pieces differ.

    Undoes `_piece` axis by axis from the last mesh axis to the first: Shard concatenates, Partial sums
    (or averages), Replicate requires every rank to agree.
    """
    for axis in reversed(range(len(sizes))):
        p, merged = spec[axis], {}
        for coords in {c[:axis] + (0,) + c[axis + 1 :] for c in pieces}:
            group = [pieces[coords[:axis] + (i,) + coords[axis + 1 :]] for i in range(sizes[axis])]
            if isinstance(p, _StridedShard):
                parts = [g.chunk(p.split_factor, p.dim) for g in group]
                merged[coords] = torch.cat([torch.cat([q[j] for q in parts], p.dim) for j in range(p.split_factor)], p.dim)
            elif isinstance(p, Shard):
                merged[coords] = torch.cat(group, dim=p.dim)
            elif isinstance(p, Partial):
                total = torch.stack(group).sum(0)
                merged[coords] = total / len(group) if p.reduce_op == "avg" else total
            else:
                same = all(
                    torch.allclose(g, group[0], rtol=1e-5, atol=1e-5) if g.is_floating_point() else torch.equal(g, group[0])
                    for g in group
                )
                if not same:
                    return None
                merged[coords] = group[0]
        pieces = merged
    return pieces[(0,) * len(sizes)]


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
