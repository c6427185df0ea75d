"""Run under torchrun (4 gloo ranks): models nobody here wrote, compiled as a user would, train as one device.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/zoo_matches.py gpt2/auto bert/dp2xtp2

A case is `<zoo model>/<mesh>`: `auto` is the default `autoshard.compile(model, batch, cluster="cpu:4")`,
the others pin the mesh (`dp2xtp2`, `tp4`, `pp2xdp2`). The model is called exactly as its own docs call it:
keyword inputs (`input_ids=..., labels=...`), its loss taken from what it returns, no wrapper, no loss_fn.
Every rank trains the same model on one device itself (the reference), then the compiled copy for 3 SGD steps
(in the entry's `compare_dtype`: fp32, or fp64 where rounding alone would pass the fp32 tolerance),
and compares the loss of every step, the gradients after the first step and the state dict (parameters
and persistent buffers) after the last, at fp32 tight tolerance.

A case autoshard refuses (an InputError: e.g. an encoder-decoder under pipelining) is reported as such,
with the message; the test decides which refusals are acceptable.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the zoo and the comparisons

import autoshard  # noqa: E402
import zoo  # noqa: E402
from autoshard.runtime.fsdp import full_value  # noqa: E402
from autoshard.runtime.launch import rank_session  # noqa: E402
from autoshard.runtime.reference import single_device_run  # noqa: E402
from pipeline_plans import reference_problems  # noqa: E402

STEPS, BATCH, RTOL, ATOL = zoo.COMPARE_STEPS, zoo.COMPARE_BATCH, zoo.COMPARE_TOL, zoo.COMPARE_TOL
MESHES = {"auto": None, "dp2xtp2": {"dp": 2, "tp": 2}, "tp4": {"tp": 4}, "pp2xdp2": {"pp": 2, "dp": 2}}


def check(case: str) -> dict:
    name, _, mesh_name = case.partition("/")
    model, batches = zoo.comparison(name, BATCH, STEPS)
    lr = zoo.COMPARE_LR
    ref = single_device_run(model, batches, lr=lr)
    mesh = MESHES[mesh_name]
    try:
        if mesh is None:
            compiled = autoshard.compile(model, batches[0], cluster=f"cpu:{dist.get_world_size()}", lr=lr)
        else:
            compiled = autoshard.compile(model, batches[0], mesh=mesh, lr=lr)
    except autoshard.InputError as exc:
        return {"ok": False, "refused": str(exc), "problems": [], "mesh": mesh}
    losses, grads = [], {}
    for step, batch in enumerate(batches):
        losses.append(compiled.train_step(**batch))
        if step == 0:
            grads = {n: full_value(g) for n, g in compiled.gradients().items()}
    state = compiled.full_state_dict()
    if compiled.plan.training.pp > 1:  # a pipeline rank holds its stages' gradients only
        ref_grads = {n: g for n, g in ref.first_grads.items() if n in grads}
        ref = ref._replace(first_grads=ref_grads)
    problems = reference_problems(losses, grads, state, ref, rtol=RTOL, atol=ATOL)
    if not grads:
        problems.append("no gradients on this rank")
    return {
        "ok": not problems,
        "refused": None,
        "problems": problems,
        "mesh": dict(compiled.plan.mesh),
        "losses": losses,
        "reference_losses": ref.losses,
        "zero_stage": compiled.plan.training.zero_stage,
        "sharded_params": sum(1 for spec in compiled.plan.params.values() if "S" in spec),
    }


def main(cases: list[str]) -> None:
    with rank_session() as session:
        results = {}
        for case in cases:
            start = time.perf_counter()
            try:
                results[case] = check(case)
            except Exception:  # noqa: BLE001 - one case's failure is reported, the others still run
                results[case] = {"ok": False, "refused": None, "mesh": None, "problems": [traceback.format_exc()[-3000:]]}
            results[case]["seconds"] = round(time.perf_counter() - start, 1)
        session.result = results


if __name__ == "__main__":
    main(sys.argv[1:] or [f"{m}/{k}" for m in zoo.names() for k in MESHES])
