"""Run under torchrun (4 gloo ranks): the loop a user writes around `autoshard.compile` equals one device.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/native_loop_matches.py dp4 pp2xtp2-1f1b

Every rank builds gpt-tiny (4 layers, tied embeddings) from one seed and runs tests/native_loop.py's
loop on one device itself: AdamW with two param groups, a warmup schedule, clipping to a global norm the
gradients exceed. Then, for each case (`CASES`: dp, tp, dp x tp, ZeRO 1/2/3, recomputation, and the
three pipeline schedules each with pp x dp and pp x tp), it compiles the model for that plan and runs
the same loop over `model.parameters()`, with `model.step` and `model.clip_grad_norm_`. Every step's
loss and clipped norm, the clipped first gradients and the final parameters are compared. The verdict
goes into `session.result`; one process group serves every case.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import autoshard  # noqa: E402
from autoshard.ir.plan import Plan  # noqa: E402
from autoshard.models import build  # noqa: E402
from autoshard.runtime.launch import rank_session  # noqa: E402
from native_loop import LR, STEPS, LoopRun, user_loop  # noqa: E402
from pipeline_plans import max_diff, pipelined_plan, tp_placements  # noqa: E402

BATCH = 8  # sequences in the global batch
RTOL = ATOL = 1e-5
PARAM_ATOL = LR / 100  # AdamW: the key bias's zero gradient is rounding noise over eps (train_matches.py)

# name -> (operator mesh, pp, schedule, virtual stages, zero stage, recompute)
CASES: dict[str, tuple[dict[str, int], int, str, int, int, str]] = {
    "dp4": ({"dp": 4}, 1, "none", 1, 0, "none"),
    "tp4": ({"tp": 4}, 1, "none", 1, 0, "none"),
    "dp2xtp2": ({"dp": 2, "tp": 2}, 1, "none", 1, 0, "none"),
    "dp4-zero1": ({"dp": 4}, 1, "none", 1, 1, "none"),
    "dp4-zero2": ({"dp": 4}, 1, "none", 1, 2, "none"),
    "dp2xtp2-zero3": ({"dp": 2, "tp": 2}, 1, "none", 1, 3, "none"),
    "dp2xtp2-recompute": ({"dp": 2, "tp": 2}, 1, "none", 1, 0, "full"),
    **{
        f"pp2x{axis}2-{schedule}": ({axis: 2}, 2, kind, v, 0, "none")
        for schedule, kind, v in (("gpipe", "gpipe", 1), ("1f1b", "1f1b", 1), ("interleaved", "interleaved-1f1b", 2))
        for axis in ("dp", "tp")
    },
}


def shared_plan(model: torch.nn.Module, batch: tuple, case: str) -> Plan:
    """Rank 0 plans; every rank runs that very plan."""
    mesh, pp, schedule, v, zero, recompute = CASES[case]
    box: list = [None]
    if dist.get_rank() == 0:
        if pp > 1:
            micro = tuple(x[: BATCH // 2] for x in batch)  # 2 micro-batches
            plan = pipelined_plan(model, micro, pp=pp, operator_mesh=mesh, schedule=schedule,
                                  num_micro_batches=2, virtual_stages=v)  # fmt: skip
        else:
            plan = autoshard.plan(model, batch, "cpu:4", mesh=mesh, param_placements=tp_placements("gpt", mesh),
                                  zero_stage=zero, recompute=recompute, micro_batch_size=BATCH // mesh.get("dp", 1))  # fmt: skip
        box = [plan.to_json()]
    dist.broadcast_object_list(box, src=0)
    return Plan.from_json(box[0])


def compare(got: LoopRun, want: LoopRun) -> list[str]:
    problems = []
    for what, g, w in (("loss", got.losses, want.losses), ("clipped norm", got.norms, want.norms)):
        for step, (a, b) in enumerate(zip(g, w, strict=True)):
            if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
                problems.append(f"{what} of step {step}: {a} != {b}")
    for label, g, w, atol in (("first gradient", got.first_grads, want.first_grads, ATOL), ("parameter", got.params, want.params, PARAM_ATOL)):
        for name in sorted(set(g) ^ set(w)):
            problems.append(f"{label} {name} only on {'this run' if name in g else 'one device'}")
        for name in sorted(set(g) & set(w)):
            if not torch.allclose(g[name], w[name], rtol=RTOL, atol=atol):
                problems.append(f"{label} {name}: max diff {max_diff(g[name], w[name]):.3g}")
    return problems


def check(case: str, model: torch.nn.Module, batches: list, want: LoopRun) -> dict:
    plan = shared_plan(model, batches[0], case)
    compiled = autoshard.compile(model, batches[0], plan=plan)
    got = user_loop(compiled, batches, native=True)
    if plan.training.pp > 1:  # each pp rank holds its stages: the whole model is the union over pp
        every: list = [None] * plan.training.pp
        dist.all_gather_object(every, (got.first_grads, got.params), group=compiled.pp_group)
        got = dataclasses.replace(
            got, first_grads={k: v for g, _ in every for k, v in g.items()}, params={k: v for _, p in every for k, v in p.items()}
        )
    problems = compare(got, want)
    return {"mesh": dict(plan.mesh), "ok": not problems, "problems": problems[:20], "norms": got.norms, "reference_norms": want.norms}


def main(names: list[str]) -> None:
    with rank_session() as session:
        torch.manual_seed(0)
        model = build("gpt-tiny", device="cpu", n_layer=4)
        vocab = model.config.vocab_size
        batches = [(torch.randint(0, vocab, (BATCH, 16)), torch.randint(0, vocab, (BATCH, 16))) for _ in range(STEPS)]
        want = user_loop(copy.deepcopy(model), batches, native=False)
        results = {"reference": {"ok": True, "norms": want.norms}}
        for case in names:
            start = time.perf_counter()
            results[case] = check(case, model, batches, want)
            results[case]["seconds"] = round(time.perf_counter() - start, 1)
        session.result = results


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
