"""Run under torchrun (4 gloo ranks): losses whose value depends on how the batch is split, trained
through the native interface, equal one device.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/loss_semantics.py causal/dp4-mb2 sum/pp2xdp2-1f1b

A case is `<batch>/<plan>`:
- batches: `causal`, Hugging Face GPT-2 on right-padded rows of different lengths (attention mask, `-100`
  labels: a token mean whose count differs between rows, micro-batches and ranks); `masked`, BERT
  on a masked-LM batch (about 15% of tokens labelled); `sum`, nanoGPT with `reduction="sum"` on
  padded targets (ignore_index=-1);
- plans (`PLANS`), each cutting the global batch of 8 into several micro-batches: dp4, dp2 x tp2,
  pp2 x dp2 with 1F1B and ZeRO-3 over dp4.
Every rank trains a copy on one device itself (SGD, 3 steps), then the compiled model with the user's
`torch.optim.SGD(model.parameters())` around `model.step(**batch)`, and compares each step's loss, the
first step's gradients and the final parameters. The verdicts go into `session.result`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import autoshard  # noqa: E402
import zoo  # noqa: E402
from case_runner import run_cases  # noqa: E402
from autoshard.ir.plan import Plan  # noqa: E402
from autoshard.runtime.fsdp import full_value  # noqa: E402
from autoshard.runtime.reference import single_device_run  # noqa: E402
from native_loop import full_params  # noqa: E402
from pipeline_plans import max_diff  # noqa: E402

BATCH, STEPS, LR = 8, 3, 0.1
RTOL = ATOL = 1e-5
# name -> autoshard.plan's pinned decisions (micro_batch_size per replica: 2 or more micro-batches each)
PLANS = {
    "dp4-mb2": {"mesh": {"dp": 4}, "micro_batch_size": 1, "zero_stage": 0},
    "dp2xtp2-mb2": {"mesh": {"dp": 2, "tp": 2}, "micro_batch_size": 2, "zero_stage": 0},
    "pp2xdp2-1f1b": {"mesh": {"pp": 2, "dp": 2}, "micro_batch_size": 1, "zero_stage": 0, "schedule": "1f1b"},
    "dp4-zero3-mb2": {"mesh": {"dp": 4}, "micro_batch_size": 1, "zero_stage": 3},
}


class NanoSum(zoo.NanoGPT):
    """nanoGPT whose loss is the sum over real targets (padding is -1, nanoGPT's ignore_index)."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = super().forward(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction="sum")
        return logits, loss


def batches(kind: str) -> tuple[torch.nn.Module, list[dict]]:
    if kind == "causal":
        return zoo.comparison("gpt2", BATCH, STEPS)
    if kind == "masked":
        return zoo.comparison("bert", BATCH, STEPS)
    torch.manual_seed(0)
    model = NanoSum(zoo.NanoConfig())
    out = []
    for s in range(STEPS):
        b = zoo.inputs("nanogpt", BATCH, seed=1 + s)
        mask = zoo.padding_mask(BATCH, zoo.SEQ)
        out.append({"idx": b["idx"], "targets": b["targets"].masked_fill(mask == 0, -1)})
    return model, out


def shared_plan(model: torch.nn.Module, batch: dict, plan_name: str) -> Plan:
    """Rank 0 plans; every rank runs that very plan."""
    box: list = [None]
    if dist.get_rank() == 0:
        pinned = PLANS[plan_name]
        plan = autoshard.plan(model, batch, "cpu:4", recompute="none", optimizer="sgd", **pinned)
        box = [plan.to_json()]
    dist.broadcast_object_list(box, src=0)
    return Plan.from_json(box[0])


def check(case: str) -> dict:
    kind, _, plan_name = case.partition("/")
    model, data = batches(kind)
    ref = single_device_run(model, data, lr=LR)
    plan = shared_plan(model, data[0], plan_name)
    compiled = autoshard.compile(model, data[0], plan=plan)
    opt = torch.optim.SGD(compiled.parameters(), lr=LR)
    losses, grads = [], {}
    for step, batch in enumerate(data):
        losses.append(compiled.step(**batch))
        if step == 0:
            grads = {n: full_value(p.grad) for n, p in compiled.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    params = full_params(compiled)
    if plan.training.pp > 1:  # each pp rank holds its stages: the whole model is the union over pp
        every: list = [None] * plan.training.pp
        dist.all_gather_object(every, (grads, params), group=compiled.pp_group)
        grads = {k: v for g, _ in every for k, v in g.items()}
        params = {k: v for _, p in every for k, v in p.items()}
    problems = []
    for step, (got, want) in enumerate(zip(losses, ref.losses, strict=True)):
        if not math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL):
            problems.append(f"loss of step {step}: {got} != {want}")
    wanted = {n for n, p in model.named_parameters()}
    for label, got_all, want_all in (("gradient", grads, ref.first_grads), ("parameter", params, ref.params)):
        for name in sorted(wanted - set(got_all)) if label == "parameter" else ():
            problems.append(f"parameter {name} missing")
        for name, got in got_all.items():
            want = want_all.get(name)
            if want is None:
                problems.append(f"{label} {name} is not the single device's")
            elif not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                problems.append(f"{label} {name}: max diff {max_diff(got, want):.3g}")
    return {
        "ok": not problems,
        "problems": problems[:20],
        "losses": losses,
        "reference_losses": ref.losses,
        "micro_batches": plan.training.num_micro_batches,
        "reduction": plan.training.loss_reduction,
    }


def main(cases: list[str]) -> None:
    run_cases(cases, check)


if __name__ == "__main__":
    main(sys.argv[1:] or [f"{k}/{p}" for k in ("causal", "masked", "sum") for p in PLANS])
