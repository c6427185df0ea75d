"""Run under torchrun (4 gloo ranks): models nobody here wrote, compiled as a user would, train as one device.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/zoo_matches.py gpt2/auto bert/dp2xtp2

A case is `<zoo model>/<mesh>`: `auto` is the default `autoshard.compile(model, batch, cluster="cpu:4")`,
the others pin the mesh (`dp2xtp2`, `tp4`, `pp2xdp2`). The model is called exactly as its own docs call it:
keyword inputs (`input_ids=..., labels=...`), its loss taken from what it returns, no wrapper, no loss_fn.
Every rank trains the same model on one device itself (the reference), then the compiled copy for 3 SGD steps
(in the entry's `compare_dtype`: fp32, or fp64 where rounding alone would pass the fp32 tolerance),
and compares the loss of every step, the gradients after the first step and the state dict (parameters
and persistent buffers) after the last, at fp32 tight tolerance.

With AUTOSHARD_CHECKPOINTS=<dir> in the environment, each case also saves a checkpoint there after
training (autoshard.save_checkpoint, sharded as the plan holds it); rank 0 exports it
(autoshard.checkpoint_state_dict), loads it into a fresh copy of the original model with
`load_state_dict(strict=True)`, compares it with the reference's state dict and loss, and, for a Hugging
Face model, round-trips it through `save_pretrained` / `from_pretrained` of the model's own class.

A case autoshard refuses (an InputError: e.g. an encoder-decoder under pipelining) is reported as such,
with the message; the test decides which refusals are acceptable.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the zoo and the comparisons

import autoshard  # noqa: E402
import zoo  # noqa: E402
from case_runner import run_cases  # noqa: E402
from autoshard.runtime.fsdp import full_value  # noqa: E402
from autoshard.runtime.reference import SingleDeviceRun, eager_loss, single_device_run  # noqa: E402
from pipeline_plans import reference_problems  # noqa: E402

STEPS, BATCH, RTOL, ATOL = zoo.COMPARE_STEPS, zoo.COMPARE_BATCH, zoo.COMPARE_TOL, zoo.COMPARE_TOL
CHECKPOINTS_ENV = "AUTOSHARD_CHECKPOINTS"
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
    if os.environ.get(CHECKPOINTS_ENV):
        directory = Path(os.environ[CHECKPOINTS_ENV]) / case.replace("/", "-")
        autoshard.save_checkpoint(directory, compiled, compiled.optimizer, step=STEPS)
        if dist.get_rank() == 0:
            problems += export_problems(directory, model, batches[0], ref)
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


def export_problems(directory: Path, model: torch.nn.Module, batch: dict, ref: SingleDeviceRun) -> list[str]:
    """What goes wrong taking the checkpoint back to the single-device model (and through
    save_pretrained / from_pretrained for a Hugging Face model)."""
    exported = autoshard.checkpoint_state_dict(directory)
    fresh = copy.deepcopy(model)
    try:
        fresh.load_state_dict(exported, strict=True)
    except RuntimeError as e:
        return [f"export: the original model's load_state_dict refuses it: {e}"]
    problems = [
        f"export: {name} differs from the reference's" for name, value in ref.params.items()
        if not torch.allclose(exported[name], value, rtol=RTOL, atol=ATOL)
    ]  # fmt: skip
    # eval mode throughout: a forward changes no buffer (BatchNorm's statistics), and from_pretrained
    # hands back an eval-mode model
    fresh.eval()
    with torch.no_grad():
        loss = float(eager_loss(fresh(**batch)))
        trained = copy.deepcopy(model).eval()
        trained.load_state_dict(ref.params)
        want = float(eager_loss(trained(**batch)))
        if abs(loss - want) > ATOL + RTOL * abs(want):
            problems.append(f"export: loss {loss} != the reference model's {want}")
        if hasattr(fresh, "save_pretrained"):
            with tempfile.TemporaryDirectory() as saved:
                fresh.save_pretrained(saved)
                again = type(fresh).from_pretrained(saved, dtype=next(fresh.parameters()).dtype).eval()
                again_loss = float(eager_loss(again(**batch)))
                if again_loss != loss:
                    problems.append(f"save_pretrained/from_pretrained: loss {again_loss} != {loss}")
                problems += [
                    f"save_pretrained/from_pretrained: {n} changed" for n, v in fresh.state_dict().items()
                    if not torch.equal(again.state_dict()[n], v)
                ]  # fmt: skip
    return problems


def main(cases: list[str]) -> None:
    run_cases(cases, check, refused=None, mesh=None)


if __name__ == "__main__":
    main(sys.argv[1:] or [f"{m}/{k}" for m in zoo.names() for k in MESHES])
