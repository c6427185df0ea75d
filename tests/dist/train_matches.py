"""Run under torchrun (4 gloo ranks): autoshard plans trained as real processes match one device.

Usage: python -m torch.distributed.run --nnodes 1 --nproc-per-node 4 --master-addr 127.0.0.1 \
           --master-port PORT tests/dist/train_matches.py dp tp dp2xtp2 llama-tiny/dp2xtp2-zero1 dp-zero2 tp-recompute

Every rank builds gpt-tiny from the same seed, trains it on one device itself (the reference: same
batches, same SGD), then, for each named mesh, trains a compiled copy for 3 steps and compares the loss
of every step, the gradients after the first backward and the parameters after the last step at fp32
tight tolerance. The verdict goes into `session.result` (autoshard.runtime.launch writes it to the
rank's result file); one process group serves every case, since starting ranks costs seconds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from pathlib import Path

from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared tensor-parallel splits

import autoshard  # noqa: E402
from autoshard.ir.plan import Plan, Training  # noqa: E402
from autoshard.models import build  # noqa: E402
from autoshard.runtime.fsdp import full_value  # noqa: E402
from autoshard.runtime.launch import rank_session  # noqa: E402
from autoshard.runtime.reference import single_device_run  # noqa: E402
from autoshard.solver.blocks import fold_blocks  # noqa: E402
from pipeline_plans import TP_SPLITS, zero_holdings  # noqa: E402  (Megatron's column/row split per model family)

STEPS = 3
LR = 0.1
RTOL = ATOL = 1e-5

MESHES: dict[str, dict[str, int]] = {
    "dp": {"dp": 4},
    "tp": {"tp": 4},
    "dp2xtp2": {"dp": 2, "tp": 2},
    "dp-zero2": {"dp": 4},
    "dp2xtp2-zero1": {"dp": 2, "tp": 2},
    "dp2xtp2-zero2": {"dp": 2, "tp": 2},
    "dp2xtp2-zero3": {"dp": 2, "tp": 2},
    "tp-recompute": {"tp": 4},
    "dp2xtp2-recompute": {"dp": 2, "tp": 2},
}
# Plan.training per case (blocks filled from the model): ZeRO over dp, recomputation per block
# (two blocks: one selective, one full)
TRAINING: dict[str, dict] = {
    "dp-zero2": {"zero_stage": 2},
    "dp2xtp2-zero1": {"zero_stage": 1},
    "dp2xtp2-zero2": {"zero_stage": 2},
    "dp2xtp2-zero3": {"zero_stage": 3},
    "tp-recompute": {"recompute": ("selective", "full")},
    "dp2xtp2-recompute": {"recompute": ("full", "selective")},
}
MODELS = ("gpt-tiny", "llama-tiny")  # a case "llama-tiny/dp2xtp2-zero1" runs that model; plain names gpt-tiny

def forced(mesh: Mapping[str, int], model_name: str = "gpt-tiny") -> dict[str, tuple[Placement, ...]] | None:
    """Force the tensor-parallel split where the mesh has a tp axis (the solver could pick a plan that
    never shards a weight on so small a model, which would leave the tp code path untested)."""
    if "tp" not in mesh:
        return None
    split = TP_SPLITS["gpt" if model_name.startswith("gpt") else "llama"]
    return {pat: tuple(p if axis == "tp" else Replicate() for axis in mesh) for pat, p in split.items()}


def make(model_name: str = "gpt-tiny") -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = build(model_name, device="cpu")
    vocab = model.config.vocab_size
    batches = [(torch.randint(0, vocab, (4, 16)), torch.randint(0, vocab, (4, 16))) for _ in range(STEPS)]
    return model, batches


def shared_plan(
    model: nn.Module, example: tuple, mesh: Mapping[str, int], training: Mapping | None = None, model_name: str = "gpt-tiny"
) -> Plan:
    """Rank 0 plans; every rank runs that very plan."""
    box: list = [None]
    if dist.get_rank() == 0:
        ir = autoshard.capture(model, example)
        plan = autoshard.plan_graph(
            ir, f"cpu:{dist.get_world_size()}", mesh=mesh, param_placements=forced(mesh, model_name)
        )
        if training:
            blocks = tuple(f"{c}.{i}" for c, n in fold_blocks(ir).blocks.items() for i in range(n))
            recompute = training.get("recompute", ())
            plan = dataclasses.replace(plan, training=Training(blocks=blocks, **{**training, "recompute": recompute}))
        box = [plan.to_json()]
    dist.broadcast_object_list(box, src=0)
    return Plan.from_json(box[0])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def check(case: str, model: nn.Module, batches: list, ref: tuple) -> dict:
    ref_losses, ref_grads, ref_params = ref
    model_name, _, name = case.rpartition("/")
    mesh = MESHES[name]
    plan = shared_plan(model, batches[0], mesh, TRAINING.get(name), model_name or "gpt-tiny")
    compiled = autoshard.compile(model, batches[0], plan=plan, optimizer="sgd", lr=LR)
    losses, grads = [], {}
    for step, batch in enumerate(batches):
        losses.append(compiled.train_step(*batch))
        if step == 0:  # under ZeRO FSDP's dp shard of each gradient
            grads = {n: full_value(g) for n, g in compiled.gradients().items()}
    params = compiled.full_state_dict()
    problems = []
    for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        if not math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL):
            problems.append(f"loss of step {step}: {got} != {want}")
    for label, got_all, want_all in (("grad", grads, ref_grads), ("param", params, ref_params)):
        if set(got_all) - set(want_all):
            problems.append(f"{label}s the reference lacks: {sorted(set(got_all) - set(want_all))}")
        for n, got in got_all.items():
            want = want_all.get(n)
            if want is not None and not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                problems.append(f"{label} {n}: max |diff| {max_diff(got, want):.3g}")
    if set(params) != set(ref_params):
        problems.append(f"parameter names differ: {sorted(set(params) ^ set(ref_params))}")
    sharded = sorted(n for n, spec in compiled.plan.params.items() if "S" in spec)
    if "tp" in mesh and not sharded:
        problems.append("the tensor-parallel plan shards no parameter")
    if set(grads) != set(compiled.parameters):
        problems.append(f"gradients missing: {sorted(set(compiled.parameters) - set(grads))}")
    stage = plan.training.zero_stage
    problems += zero_holdings(compiled.parameters, stage)
    if any(m != "none" for m in plan.training.recompute) and "checkpoint_block(" not in compiled.code:
        problems.append("the recompute plan's code calls no checkpoint_block")
    return {
        "mesh": mesh,
        "ok": not problems,
        "problems": problems,
        "losses": losses,
        "reference_losses": ref_losses,
        "max_grad_diff": max(max_diff(g, ref_grads[n]) for n, g in grads.items()),
        "max_param_diff": max(max_diff(p, ref_params[n]) for n, p in params.items()),
        "sharded_params": len(sharded),
        "zero_stage": stage,
    }


def main(names: list[str]) -> None:
    with rank_session() as session:
        results = {}
        for model_name in MODELS:
            cases = [c for c in names if (c.rpartition("/")[0] or "gpt-tiny") == model_name]
            if not cases:
                continue
            model, batches = make(model_name)
            ref = single_device_run(model, batches, lr=LR)
            results.update({case: check(case, model, batches, ref) for case in cases})
        session.result = results


if __name__ == "__main__":
    main(sys.argv[1:] or list(MESHES))
