"""Pipelined plans made by hand until the solver picks stages: the operator part planned by the existing
solver on the operator mesh (a cluster of that many devices), then given a pp axis and a `Training`.

Convention (shared with the solver and runtime/model.py): the graph is captured for one micro-batch of
every data-parallel replica, `micro_batch_size * dp` sequences; the global batch is `num_micro_batches`
of those.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode

import autoshard
from autoshard.ir.plan import Plan, Training
from autoshard.runtime.reference import SingleDeviceRun

# Megatron's column/row split on the tp axis, per model family
TP_SPLITS: dict[str, dict[str, Placement]] = {
    "gpt": {
        "*.c_attn.weight": _StridedShard(0, split_factor=3),
        "*.c_attn.bias": _StridedShard(0, split_factor=3),
        "*.attn.c_proj.weight": Shard(1),
        "*.c_fc.weight": Shard(0),
        "*.c_fc.bias": Shard(0),
        "*.mlp.c_proj.weight": Shard(1),
    },
    "llama": {
        "*.wq.weight": Shard(0),
        "*.wk.weight": Shard(0),
        "*.wv.weight": Shard(0),
        "*.wo.weight": Shard(1),
        "*.w1.weight": Shard(0),
        "*.w3.weight": Shard(0),
        "*.w2.weight": Shard(1),
    },
}


class SkipModel(nn.Module):
    """Embedding, `n_layer` small blocks, and a skip connection from the embedding to the head: with one
    block per stage the embedding's output is read only by the last stage, so it passes through every
    stage in between."""

    def __init__(self, vocab: int = 64, dim: int = 32, n_layer: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n_layer))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(idx)  # (B, T, C)
        x = x0
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x + x0)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class OutputsModel(SkipModel):
    """SkipModel returning its loss with the logits (the loss reads them) and the last block's output
    (nothing after the head reads it): a pipelined forward returns all three from the last stage."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = self.embed(idx)
        x = x0
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x + x0)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), targets.flatten()), "logits": logits, "hidden": x}


class EarlyOutputModel(SkipModel):
    """SkipModel that also returns its embedding's output, made on the first stage: it trains, but a
    pipelined forward cannot return it and says so."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.embed(idx)
        early = x0 * 2  # before the first block: on stage 0, read by nothing after it
        x = x0
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x + x0)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), early


class UnusedParamsModel(SkipModel):
    """SkipModel with parameters no node reads, as GPT-J-style parallel blocks leave a norm unused: a
    LayerNorm beside the model and one inside each block (its own module, never called), and a Linear.
    Eager training gives them no gradient and leaves them as they are; they are still the model's state."""

    def __init__(self, vocab: int = 64, dim: int = 32, n_layer: int = 4) -> None:
        super().__init__(vocab, dim, n_layer)
        self.unused_norm = nn.LayerNorm(dim)
        self.unused_proj = nn.Linear(dim, dim)
        for block in self.blocks:
            block.add_module("ln_unused", nn.LayerNorm(dim))  # nn.Sequential would call it: kept out of the loop below

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(idx)  # (B, T, C)
        x = x0
        for block in self.blocks:
            x = x + block[1](block[0](x))  # Linear, Tanh; not the block's ln_unused
        logits = self.head(x + x0)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def unused_problems(state: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Where a state dict lacks a parameter nothing reads (its name says "unused") or holds another value
    than the model's own (eager training leaves them as they are)."""
    problems = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if "unused" in n and (n not in state or not torch.equal(state[n], p.detach())):
            problems.append(f"unread parameter {n}: {'missing from the state dict' if n not in state else 'changed'}")
    return problems


def tp_placements(family: str, mesh: Mapping[str, int]) -> dict[str, tuple[Placement, ...]] | None:
    """Megatron's column/row split of `family` ("gpt" or "llama") on the mesh's tp axis, Replicate on the
    others (None without a tp axis): the solver could pick a plan that never shards a weight of so small
    a model, which would leave the tp code path untested."""
    if "tp" not in mesh:
        return None
    return {pat: tuple(p if axis == "tp" else Replicate() for axis in mesh) for pat, p in TP_SPLITS[family].items()}


def block_paths(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the repeated blocks: GPT's transformer.h.i, LLaMA's layers.i, SkipModel's blocks.i."""
    if hasattr(model, "transformer"):
        return tuple(f"transformer.h.{i}" for i in range(len(model.transformer.h)))
    if hasattr(model, "blocks"):
        return tuple(f"blocks.{i}" for i in range(len(model.blocks)))
    return tuple(f"layers.{i}" for i in range(len(model.layers)))


def pipelined_plan(
    model: nn.Module,
    micro_batch: tuple,
    *,
    pp: int,
    operator_mesh: Mapping[str, int],
    schedule: str,
    num_micro_batches: int,
    virtual_stages: int = 1,
    stages: tuple[int, ...] | None = None,
) -> Plan:
    """A plan for `model` with `pp` pipeline ranks (`virtual_stages` stages each, blocks split evenly unless
    `stages` is given) over `operator_mesh`, planned for `micro_batch` (one micro-batch of every replica)."""
    forced = tp_placements("gpt" if hasattr(model, "transformer") else "llama", operator_mesh)
    devices = math.prod(operator_mesh.values())
    ir = autoshard.capture(model, micro_batch)
    plan = autoshard.plan_graph(ir, f"cpu:{devices}", mesh=dict(operator_mesh), param_placements=forced, optimizer="sgd")
    blocks = block_paths(model)
    n_stages = pp * virtual_stages
    if stages is None:
        if len(blocks) % n_stages:
            raise ValueError(f"{len(blocks)} blocks do not split evenly into {n_stages} stages; pass stages=")
        stages = (len(blocks) // n_stages,) * n_stages
    dp = operator_mesh.get("dp", 1)
    training = Training(
        pp=pp,
        blocks=blocks,
        stages=stages,
        schedule=schedule,
        virtual_stages=virtual_stages,
        num_micro_batches=num_micro_batches,
        micro_batch_size=micro_batch[0].shape[0] // dp,
    )
    return dataclasses.replace(
        plan, mesh={"pp": pp, **operator_mesh}, cluster=f"cpu:{pp * devices}", training=training
    )


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every mm / addmm output run under it (did the matmuls run in bf16?)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.dtypes.add(out.dtype)
        return out


def zero_holdings(parameters: Mapping[str, nn.Parameter], stage: int) -> list[str]:
    """What ZeRO promises each rank holds between steps: every parameter and its gradient as a dp shard,
    at most 1/dp of the rank's share over the other axes (FSDP pads an uneven dim 0). The optimizer
    steps these shards, so its state is sharded with them."""
    if not stage:
        return []
    problems = []
    for n, p in parameters.items():
        dp_index = list(p.device_mesh.mesh_dim_names).index("dp")
        dp = p.device_mesh.shape[dp_index]
        # the rank's share over the other axes, then FSDP's dim-0 shard of it (padded up when uneven)
        others = [q if i != dp_index else Replicate() for i, q in enumerate(p.placements)]
        share = compute_local_shape_and_global_offset(p.shape, p.device_mesh, others)[0]
        most = -(-share[0] // dp) * math.prod(share[1:])
        if isinstance(p.placements[dp_index], Replicate) or p.to_local().numel() > most:
            problems.append(f"ZeRO-{stage}: {n} is not held as a dp shard ({p.placements}, {p.to_local().numel()} > {most})")
        if p.grad is not None and p.grad.to_local().numel() != p.to_local().numel():
            problems.append(f"ZeRO-{stage}: the gradient of {n} is not a dp shard")
    return problems


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def reference_problems(
    losses: list[float],
    grads: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    ref: SingleDeviceRun,
    *,
    rtol: float,
    atol: float,
    param_atol: float | None = None,
) -> list[str]:
    """Where a distributed run differs from the single-device one: the loss of each step, the first
    step's gradients and the final parameters (unsharded, by name), at the given tolerances
    (`param_atol` for the parameters, default `atol`)."""
    problems = []
    for step, (got, want) in enumerate(zip(losses, ref.losses, strict=True)):
        if not math.isclose(got, want, rel_tol=rtol, abs_tol=atol):
            problems.append(f"loss of step {step}: {got} != {want}")
    checks = (("grad", grads, ref.first_grads, atol), ("param", params, ref.params, param_atol or atol))
    for label, got_all, want_all, tol in checks:
        if set(got_all) - set(want_all):
            problems.append(f"{label}s the reference lacks: {sorted(set(got_all) - set(want_all))}")
        for n, got in got_all.items():
            want = want_all.get(n)
            if want is not None and not torch.allclose(got, want, rtol=rtol, atol=tol):
                problems.append(f"{label} {n}: max |diff| {max_diff(got, want):.3g}")
    if set(params) != set(ref.params):
        problems.append(f"parameter names differ: {sorted(set(params) ^ set(ref.params))}")
    return problems
