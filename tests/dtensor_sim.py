"""A single-process 4-rank world for checking sharding options against one unsharded run.

Shared by the ground-truth test (every option of every node) and the exclusion-table test (each
excluded option is still wrong). Pieces are cut here, by `piece`, and results are assembled here, by
`assemble`, so the checks do not trust DTensor's own sharding code to read its own answers.

Two checks:
- the forward check lives in tests/test_strategies_ground_truth.py (raw op per rank on local pieces);
- `backward_problem` runs the op through DTensor autograd on the simulated world
  (`LocalTensorMode` + the fake process group) -- what the generated program does -- and compares the
  gradient of every differentiable input with `torch.autograd.grad` of the unsharded op.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Interpreter, Node

from autoshard.ir.signature import arg_signature
from autoshard.strategies import MeshSpec, ShardingOption, spec_str

__all__ = [
    "WORLD", "Captured", "MseMLP", "MsePlusPenalty", "assemble", "backward_problem", "capture_mse_mlp", "capture_reference",
    "capture_values", "capture_zoo", "coords", "mse_batch", "piece", "signature", "signature_seed",
]

WORLD = 4
RTOL = ATOL = 1e-4


@dataclass(frozen=True, kw_only=True, slots=True)
class Captured:
    """An exported graph with every node's value from one unsharded run.

    differentiable: names of the placeholders and nodes whose gradient training computes (floating
        parameters, floating user inputs and every floating intermediate -- not buffers or constants,
        which no optimizer updates and whose in-place updates forbid requires_grad).
    """

    name: str
    ep: ExportedProgram
    values: dict[str, Any]
    differentiable: frozenset[str]


def capture_values(name: str, ep: ExportedProgram, flat_inputs: list[Any]) -> Captured:
    """Run `ep`'s graph once on `flat_inputs` (placeholder order) and record every node's value."""
    values: dict[str, Any] = {}

    class Recorder(Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out  # in-place ops follow
            return out

    with torch.no_grad():
        Recorder(ep.graph_module).run(*flat_inputs)
    frozen = {
        spec.arg.name
        for spec in ep.graph_signature.input_specs
        if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)
    }
    diff = {
        n for n, v in values.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and n not in frozen
    }
    return Captured(name=name, ep=ep, values=values, differentiable=frozenset(diff))


def signature(node: Node) -> tuple:
    """The op and its argument shapes/dtypes/values: identical layers share one."""
    return (node.target, arg_signature(node.args), arg_signature(node.kwargs))


def signature_seed(sig: tuple) -> int:
    """A seed that depends on the signature's text only (not on `hash`, which varies per process)."""
    return zlib.crc32(repr(sig).encode())


def coords(rank: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Mesh coordinates of `rank` (row-major, as DeviceMesh lays out ranks)."""
    out = []
    for s in reversed(sizes):
        out.append(rank % s)
        rank //= s
    return tuple(reversed(out))


def piece(value: torch.Tensor, spec: tuple, at: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """This rank's piece of `value` under `spec`, cut left to right over the mesh axes; Partial pieces
    are random summands (seeded per axis) that add -- or average -- back to the value."""
    local = value
    gen = torch.Generator().manual_seed(1234)
    for axis, (p, n, c) in enumerate(zip(spec, sizes, at, strict=True)):
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


def assemble(pieces: dict[tuple[int, ...], torch.Tensor], spec: tuple, sizes: tuple[int, ...]) -> torch.Tensor | None:
    """The global value that per-rank `pieces` represent under `spec`; None when replicated pieces differ.

    Undoes `piece` axis by axis from the last mesh axis to the first: Shard concatenates, Partial sums
    (or averages), Replicate requires every rank to agree.
    """
    for axis in reversed(range(len(sizes))):
        p, merged = spec[axis], {}
        for at in {c[:axis] + (0,) + c[axis + 1 :] for c in pieces}:
            group = [pieces[at[:axis] + (i,) + at[axis + 1 :]] for i in range(sizes[axis])]
            if isinstance(p, _StridedShard):
                parts = [g.chunk(p.split_factor, p.dim) for g in group]
                merged[at] = torch.cat([torch.cat([q[j] for q in parts], p.dim) for j in range(p.split_factor)], p.dim)
            elif isinstance(p, Shard):
                merged[at] = torch.cat(group, dim=p.dim)
            elif isinstance(p, Partial):
                total = torch.stack(group).sum(0)
                merged[at] = total / len(group) if p.reduce_op == "avg" else total
            else:
                same = all(
                    torch.allclose(g, group[0], rtol=1e-5, atol=1e-5) if g.is_floating_point() else torch.equal(g, group[0])
                    for g in group
                )
                if not same:
                    return None
                merged[at] = group[0]
        pieces = merged
    return pieces[(0,) * len(sizes)]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if not want.is_floating_point():
        return torch.equal(got, want)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return torch.allclose(got, want, rtol=RTOL, atol=ATOL * scale)


def _upstream_spec(claim: tuple) -> tuple:
    """The placement of an output's gradient: a Partial output's gradient is the same on every rank
    (Replicate); a Shard or Replicate output's gradient is placed like the output."""
    return tuple(Replicate() if isinstance(p, Partial) else p for p in claim)


def _read(dt: DTensor, sizes: tuple[int, ...], ranks: list[tuple[int, ...]]) -> torch.Tensor | None:
    """The global value of a simulated DTensor, assembled from its per-rank pieces by its placements."""
    local = dt._local_tensor
    per_rank = local._local_tensors if isinstance(local, LocalTensor) else {r: local for r in range(WORLD)}
    return assemble({c: per_rank[r] for r, c in enumerate(ranks)}, tuple(dt.placements), sizes)


def _args(node: Node, leaf: dict[str, Any]) -> tuple[tuple, dict]:
    def arg(a: Any) -> Any:
        if isinstance(a, Node):
            return leaf[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(arg(e) for e in a)
        return a

    return tuple(arg(a) for a in node.args), {k: arg(v) for k, v in node.kwargs.items()}


def _fresh(node: Node, leaves: dict[str, Any]) -> dict[str, Any]:
    """Leaves as the op may take them: an in-place op (`add_` of a residual) gets copies, since autograd
    forbids mutating a leaf that requires grad; the copy's gradient flows back to the leaf."""
    if not node.target._schema.is_mutable:
        return leaves
    return {k: v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v for k, v in leaves.items()}


def backward_problem(
    node: Node, opt: ShardingOption, cap: Captured, mesh: Any, spec_mesh: MeshSpec, notes: list[str] | None = None
) -> str | None:
    """None when DTensor, running `node` under `opt`, gives the unsharded forward values and input
    gradients; else a description of the first mismatch.

    Inputs are built from local pieces in the option's input placements; every floating output the
    option places gets a random upstream gradient placed per `_upstream_spec`. Each differentiable
    input's gradient is read with the placement DTensor reports for it (a Replicate input's gradient
    may come back Partial: assembling sums it) and compared with `torch.autograd.grad` of the op on the
    unsharded values. Where DTensor runs the op into another output placement than the option claims
    (it redistributed on its own), values and gradients are still checked, read with DTensor's
    placement, and the divergence goes to `notes`: a mispriced option, not a wrong result.
    """
    sizes = spec_mesh.sizes
    ranks = [coords(r, sizes) for r in range(WORLD)]
    r_spec = tuple(Replicate() for _ in sizes)
    values = cap.values
    inputs = node.all_input_nodes
    specs = {n.name: (s if s is not None else r_spec) for n, s in zip(inputs, opt.inputs, strict=True)}
    wants_grad = [n.name for n in inputs if n.name in cap.differentiable]
    expected = values[node.name]
    expected_list = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    gen = torch.Generator().manual_seed(7)
    upstream = [
        torch.randn(e.shape, generator=gen, dtype=e.dtype) if isinstance(e, torch.Tensor) and e.is_floating_point() else None
        for e in expected_list
    ]

    with LocalTensorMode(WORLD):
        leaves: dict[str, Any] = {}
        for n in inputs:
            v, spec = values[n.name], specs[n.name]
            lt = LocalTensor({r: piece(v, spec, c, sizes) for r, c in enumerate(ranks)})
            dt = DTensor.from_local(lt, mesh, spec, run_check=False, shape=v.shape, stride=v.stride())
            leaves[n.name] = dt.detach().requires_grad_(n.name in wants_grad)
        args, kwargs = _args(node, _fresh(node, leaves))
        out = node.target(*args, **kwargs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        diff_outs, diff_grads, used = [], [], []
        for i, (o, claim, want) in enumerate(zip(outs, opt.output, expected_list, strict=True)):
            if claim is None or not isinstance(o, DTensor):
                continue
            ran = tuple(o.placements)
            if ran != tuple(claim) and notes is not None:
                notes.append(f"output {i}: DTensor produced {spec_str(ran)}, claimed {spec_str(claim)}")
            full = _read(o, sizes, ranks)
            if full is None or full.shape != want.shape or not _close(full, want):
                return f"output {i}: forward values differ under DTensor (ran {spec_str(ran)})"
            if upstream[i] is not None and o.requires_grad:
                g_spec = _upstream_spec(ran)
                g = LocalTensor({r: piece(upstream[i], g_spec, c, sizes) for r, c in enumerate(ranks)})
                diff_outs.append(o)
                used.append(i)
                diff_grads.append(DTensor.from_local(g, mesh, g_spec, run_check=False, shape=o.shape, stride=o.stride()))
        if not diff_outs or not wants_grad:
            return None
        grads = torch.autograd.grad(diff_outs, [leaves[n] for n in wants_grad], diff_grads, allow_unused=True)
        got = {n: (None if g is None else _read(g, sizes, ranks)) for n, g in zip(wants_grad, grads, strict=True)}
        got_specs = {n: (None if g is None else tuple(g.placements)) for n, g in zip(wants_grad, grads, strict=True)}

    ref_leaves = {n.name: values[n.name].clone().requires_grad_(n.name in wants_grad) for n in inputs}
    args, kwargs = _args(node, _fresh(node, ref_leaves))
    ref_out = node.target(*args, **kwargs)
    ref_outs = list(ref_out) if isinstance(ref_out, (list, tuple)) else [ref_out]
    ref = torch.autograd.grad([ref_outs[i] for i in used], [ref_leaves[n] for n in wants_grad],
                              [upstream[i] for i in used], allow_unused=True)
    for name, want in zip(wants_grad, ref, strict=True):
        have = got[name]
        if want is None and have is None:
            continue
        if want is None:
            want = torch.zeros_like(values[name])
        where = f"grad of {name} (input {spec_str(specs[name])}, grad {spec_str(got_specs[name])})"
        if have is None:
            if got_specs[name] is None and not want.any():
                continue
            return f"{where}: " + ("missing" if got_specs[name] is None else "ranks disagree on a replicated axis")
        if have.shape != want.shape or not _close(have, want):
            ratio = (have.abs().sum() / want.abs().sum()).item() if have.shape == want.shape and want.any() else float("nan")
            return f"{where}: values differ (|got| / |want| = {ratio:.3g})"
    return None


# ------------------------------------------------------------------------------------------ captures


class MseMLP(torch.nn.Module):
    """A two-layer regression MLP trained with F.mse_loss: the shape of graph that met DTensor's
    mse_loss rule (batch-sharded loss, gradients dp times too large in torch 2.13)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.fc2(torch.relu(self.fc1(x))), y)


class MsePlusPenalty(MseMLP):
    """MseMLP with a small activation penalty added: the mse mean is no longer the whole loss, so it
    stays a mean in the graph (capture/loss_reduction.py rewrites only a loss that is one reduction)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.relu(self.fc1(x)))
        return torch.nn.functional.mse_loss(out, y) + 1e-3 * out.pow(2).mean()


def mse_batch(rows: int = 8, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)


def _flat_inputs(ep: ExportedProgram, user: list[Any]) -> list[Any]:
    state = {**ep.state_dict, **ep.constants}
    it = iter(user)
    return [
        next(it) if spec.kind is InputKind.USER_INPUT else state[spec.target].detach()
        for spec in ep.graph_signature.input_specs
    ]


def capture_mse_mlp() -> Captured:
    torch.manual_seed(0)
    x, y = mse_batch()
    ep = torch.export.export(MseMLP(), (x, y), strict=False)
    return capture_values("mse-mlp", ep, _flat_inputs(ep, [x, y]))


def capture_reference(name: str) -> Captured:
    """One of autoshard's own tiny models (autoshard.models), batch 4 x 16 tokens."""
    import autoshard
    from autoshard.models import build

    torch.manual_seed(0)
    model = build(name, device="cpu")
    idx = torch.randint(0, 128, (4, 16))
    targets = torch.randint(0, 128, (4, 16))
    ep = autoshard.capture(model, (idx, targets)).exported
    return capture_values(name, ep, _flat_inputs(ep, [idx, targets]))


def capture_zoo(name: str, batch: int = 4) -> Captured:
    """A model nobody here wrote (tests/zoo.py), called with the keyword arguments a user passes."""
    import zoo

    model = zoo.build(name)
    kw = zoo.inputs(name, batch)
    ep = torch.export.export(model, (), kwargs=kw, strict=False)
    return capture_values(f"zoo:{name}", ep, list(ep._graph_module_flat_inputs((), kw)))
