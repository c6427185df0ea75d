"""Run under torchrun (4 gloo ranks): autoshard plans trained as real processes match one device.

Usage: python -m torch.distributed.run --nnodes 1 --nproc-per-node 4 --master-addr 127.0.0.1 \
           --master-port PORT tests/dist/train_matches.py dp tp dp2xtp2 llama-tiny/dp2xtp2-zero1 dp2xtp2-zero1-accumulate tp-recompute

Every rank builds gpt-tiny (or llama-tiny) from the same seed, trains it on one device itself (the
reference: same batches, same optimizer), then, for each named case (`CASES`: a mesh, ZeRO stage,
recomputation, micro-batches, optimizer), trains a compiled copy for 3 steps and compares the loss
of every step, the gradients after the first backward and the parameters after the last step at fp32
tight tolerance. The verdict goes into `session.result` (autoshard.runtime.launch writes it to the
rank's result file); one process group serves every case, since starting ranks costs seconds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from pathlib import Path

from torch.distributed.tensor import Placement, Shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared tensor-parallel splits

import autoshard  # noqa: E402
from autoshard.ir.plan import Plan, Training  # noqa: E402
from autoshard.models import build  # noqa: E402
from autoshard.runtime.fsdp import full_value  # noqa: E402
from autoshard.runtime.launch import rank_session  # noqa: E402
from autoshard.runtime.reference import SingleDeviceRun, single_device_run  # noqa: E402
from autoshard.solver.blocks import fold_blocks  # noqa: E402
from pipeline_plans import UnusedParamsModel, tp_placements, max_diff, reference_problems, unused_problems, zero_holdings  # noqa: E402  (Megatron's column/row split per model family)

STEPS = 3
LR = {"sgd": 0.1, "adamw": 1e-2}  # AdamW's steps are ~lr each: 1e-2 moves every weight well beyond the tolerance
RTOL = ATOL = 1e-5
# AdamW's parameters: the key bias's gradient is zero in exact arithmetic (softmax ignores a constant added
# to all of a query's scores), so it is rounding noise (~1e-11 on gpt-tiny), different on one device and
# on 4 ranks; AdamW divides it by eps = 1e-8 and moves those entries by up to ~1e-3 lr per step. Measured
# after 3 steps at lr 1e-2: 7.6e-5, on entries 64..127 of c_attn.bias (the key third) only. A lost or
# doubled gradient moves a weight by ~lr = 1e-2 under Adam, and the gradients are checked at 1e-5 anyway.
ADAMW_PARAM_ATOL = 1e-4

@dataclasses.dataclass(frozen=True)
class Case:
    """One plan to train: the mesh, Plan.training beyond the blocks (ZeRO, recomputation per block,
    micro-batches), the optimizer, and weights forced to placements the solver would not pick."""

    mesh: Mapping[str, int] | None  # None: the solver's own plan for cpu:4, made inside autoshard.compile
    training: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: str = "sgd"
    placements: Mapping[str, tuple[Placement, ...]] | None = None
    # gpt-tiny: the step's collectives equal the plan's (comm_report), FSDP's under ZeRO. Not yet (found,
    # open): ZeRO-3 beside tp (one dp all-gather in backward beyond the plan); several micro-batches (the
    # plan lists one micro-batch's collectives); llama-tiny beside tp, where DTensor all-reduces some weight
    # gradients over dp inside backward before FSDP reduce-scatters them (exact, but sent twice). A dim
    # dp does not divide adds FSDP's padding, rightly.
    comm_matches: bool = False
    torch_compile: bool = False  # the program run through torch.compile (backend aot_eager)


DP2TP2 = {"dp": 2, "tp": 2}
# the global batch of 4 as 2 micro-batches of 1 sequence per dp replica (gradient accumulation)
ACCUMULATE = {"micro_batch_size": 1, "num_micro_batches": 2}
CASES: dict[str, Case] = {
    "auto": Case(None),
    "dp": Case({"dp": 4}),
    "tp": Case({"tp": 4}),
    "dp2xtp2": Case(DP2TP2),
    # ZeRO through FSDP2 on dp alone and beside tp, with SGD and AdamW (its state sharded with the
    # parameters), over accumulated micro-batches (when FSDP syncs and reshards differs per stage)
    "dp-zero1": Case({"dp": 4}, {"zero_stage": 1}, comm_matches=True),
    "dp-zero2": Case({"dp": 4}, {"zero_stage": 2}, comm_matches=True),
    "dp-zero3": Case({"dp": 4}, {"zero_stage": 3}, comm_matches=True),
    "dp-zero3-adamw": Case({"dp": 4}, {"zero_stage": 3}, "adamw"),
    "dp2xtp2-zero1": Case(DP2TP2, {"zero_stage": 1}, comm_matches=True),
    "dp2xtp2-zero2": Case(DP2TP2, {"zero_stage": 2}, comm_matches=True),
    "dp2xtp2-zero3": Case(DP2TP2, {"zero_stage": 3}),
    "dp2xtp2-zero1-adamw": Case(DP2TP2, {"zero_stage": 1}, "adamw"),
    "dp2xtp2-zero3-adamw": Case(DP2TP2, {"zero_stage": 3}, "adamw"),
    "dp2xtp2-zero1-accumulate": Case(DP2TP2, {"zero_stage": 1, **ACCUMULATE}),
    "dp2xtp2-zero2-accumulate-adamw": Case(DP2TP2, {"zero_stage": 2, **ACCUMULATE}, "adamw"),
    "dp2xtp2-zero3-accumulate": Case(DP2TP2, {"zero_stage": 3, **ACCUMULATE}),
    # ZeRO-3 on a plan whose weights the planner itself stores Shard(0) over dp (priced gathers): FSDP
    # takes over the storing and gathering
    "dp-zero3-planned": Case({"dp": 4}, {"zero_stage": 3}, placements={"*weight": (Shard(0),)}),
    "tp-recompute": Case({"tp": 4}, {"recompute": ("selective", "full")}),
    "dp2xtp2-recompute": Case(DP2TP2, {"recompute": ("full", "selective")}),
    "dp2xtp2-zero3-recompute": Case(DP2TP2, {"zero_stage": 3, "recompute": ("full", "selective")}),
    # the generated program under torch.compile: AOTAutograd's trace of DTensor's dispatch must compute
    # what DTensor does, on dp alone (the gradient buckets), beside tp, over accumulated micro-batches
    "dp-torch-compile": Case({"dp": 4}, torch_compile=True),
    "dp2xtp2-torch-compile": Case(DP2TP2, torch_compile=True),
    "dp2xtp2-accumulate-torch-compile": Case(DP2TP2, ACCUMULATE, torch_compile=True),
}

# a case "llama-tiny/dp2xtp2-zero1" runs that model; plain names gpt-tiny. gpt-odd is gpt-tiny with a
# vocabulary (131) and a position table (18) that 4 ranks cannot split evenly: FSDP pads the last shard
MODELS = {
    "gpt-tiny": {},
    "llama-tiny": {},
    "gpt-odd": {"preset": "gpt-tiny", "vocab_size": 131, "block_size": 18},
    "unused": {"preset": "unused"},  # pipeline_plans.UnusedParamsModel: parameters no node reads
}


def forced(case: Case, model_name: str = "gpt-tiny") -> dict[str, tuple[Placement, ...]] | None:
    """The case's own placements, and the tensor-parallel split where the mesh has a tp axis (the solver
    could pick a plan that never shards a weight on so small a model, which would leave the tp code path
    untested)."""
    if case.placements is not None:
        return dict(case.placements)
    return tp_placements("gpt" if model_name.startswith("gpt") else "llama", case.mesh)


def make(model_name: str = "gpt-tiny") -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    overrides = dict(MODELS[model_name])
    torch.manual_seed(0)
    preset = overrides.pop("preset", model_name)
    model = UnusedParamsModel() if preset == "unused" else build(preset, device="cpu", **overrides)
    vocab = model.embed.num_embeddings if preset == "unused" else model.config.vocab_size
    batches = [(torch.randint(0, vocab, (4, 16)), torch.randint(0, vocab, (4, 16))) for _ in range(STEPS)]
    return model, batches


def shared_plan(model: nn.Module, batch: tuple, case: Case, model_name: str = "gpt-tiny") -> Plan:
    """Rank 0 plans for one micro-batch of the global `batch`; every rank runs that very plan."""
    box: list = [None]
    if dist.get_rank() == 0:
        micro = case.training.get("num_micro_batches", 1)
        example = tuple(x[: x.shape[0] // micro] for x in batch)
        ir = autoshard.capture(model, example)
        plan = autoshard.plan_graph(
            ir, f"cpu:{dist.get_world_size()}", mesh=case.mesh, param_placements=forced(case, model_name)
        )
        if case.training:
            blocks = tuple(f"{c}.{i}" for c, n in fold_blocks(ir).blocks.items() for i in range(n))
            training = {"recompute": (), **case.training}
            plan = dataclasses.replace(plan, training=Training(blocks=blocks, **training))
        box = [plan.to_json()]
    dist.broadcast_object_list(box, src=0)
    return Plan.from_json(box[0])


def check(name: str, model: nn.Module, batches: list, ref: SingleDeviceRun) -> dict:
    ref_losses, ref_grads, ref_params = ref
    model_name, _, key = name.rpartition("/")
    case = CASES[key]
    options = {"optimizer": case.optimizer, "lr": LR[case.optimizer], "torch_compile": case.torch_compile}
    if case.mesh is None:
        compiled = autoshard.compile(model, batches[0], cluster=f"cpu:{dist.get_world_size()}", **options)
        plan = compiled.plan
    else:
        plan = shared_plan(model, batches[0], case, model_name or "gpt-tiny")
        compiled = autoshard.compile(model, batches[0], plan=plan, **options)
    mesh = dict(plan.mesh)
    # before any step the state is the model's own, exactly: every placement gathered as it was split
    initial = compiled.full_state_dict()
    own = dict(model.named_parameters(remove_duplicate=False))
    problems = [f"state dict after compile lacks {sorted(set(own) - set(initial))}"] if set(own) - set(initial) else []
    problems += [f"state dict after compile: {n} differs from the model's" for n in own if n in initial and not torch.equal(initial[n], own[n].detach())]
    losses, grads = [], {}
    for step, batch in enumerate(batches):
        losses.append(compiled.train_step(*batch))
        if step == 0:  # under ZeRO FSDP's dp shard of each gradient
            grads = {n: full_value(g) for n, g in compiled.gradients().items()}
    params = compiled.full_state_dict()
    param_atol = ADAMW_PARAM_ATOL if case.optimizer == "adamw" else ATOL
    problems += reference_problems(losses, grads, params, ref, rtol=RTOL, atol=ATOL, param_atol=param_atol)
    problems += unused_problems(params, model)
    sharded = sorted(n for n, spec in compiled.plan.params.items() if "S" in spec)
    if "tp" in mesh and not sharded:
        problems.append("the tensor-parallel plan shards no parameter")
    if set(grads) != {n for n, _ in compiled.named_parameters() if n in ref_grads}:  # nothing for a parameter no node reads
        problems.append(f"gradients differ from the reference's: {sorted({n for n, _ in compiled.named_parameters()} ^ set(grads))}")
    stage = plan.training.zero_stage
    problems += zero_holdings(dict(compiled.named_parameters()), stage)
    for n, p in compiled.named_parameters():  # AdamW's moments: the shape of what the optimizer steps
        for key, t in compiled.optimizer.state.get(p, {}).items():
            if t.ndim and t.to_local().numel() != p.to_local().numel():
                problems.append(f"AdamW's {key} of {n}: {t.to_local().numel()} elements here, its parameter {p.to_local().numel()}")
    if case.comm_matches and model_name in ("", "gpt-tiny"):  # FSDP issues ZeRO's collectives: per group and stage, and their bytes (one more step)
        report = compiled.comm_report(*batches[0])
        if not report.matches_beyond_scalars or report.unplanned_scalars > 1:
            problems.append(f"collectives differ from the plan's:\n{report.table()}")
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
            refs = {
                opt: single_device_run(model, batches, lr=LR[opt], optimizer=opt)
                for opt in sorted({CASES[c.rpartition("/")[2]].optimizer for c in cases})
            }
            for case in cases:
                start = time.perf_counter()
                results[case] = check(case, model, batches, refs[CASES[case.rpartition("/")[2]].optimizer])
                results[case]["seconds"] = round(time.perf_counter() - start, 1)  # to choose what CI samples
        session.result = results


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
