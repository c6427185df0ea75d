"""Run under torchrun (4 gloo ranks): a checkpoint saved under one plan resumes under every other.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/checkpoint_reshard.py ROOT dp4 pp2xtp2-1f1b ...
       python tests/dist/checkpoint_reshard.py --one-process save|load ROOT   (no process group)

gpt-tiny (4 layers, tied embeddings) and tests/native_loop.py's loop (AdamW with two param groups, a
warmup schedule, global-norm clipping). For each named plan (native_loop_matches.CASES) the script
compiles the model, trains `SAVE_AT` steps and saves a checkpoint under ROOT/<plan>, with the step and
the scheduler's state as extras. Then, under each plan, it loads every checkpoint in ROOT (those just
saved, and any a single process saved there before), with a fresh optimizer and scheduler built as the
user builds them, trains the remaining steps and compares losses, clipped norms and parameters with
one device training all `STEPS` uninterrupted. The verdicts go into `session.result`, keyed
"<saved under> -> <loaded under>".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))

import autoshard  # noqa: E402
from autoshard.models import build  # noqa: E402
from autoshard.runtime.checkpoint import MANIFEST  # noqa: E402
from autoshard.runtime.launch import rank_session  # noqa: E402
from native_loop import LoopRun, full_params, train_steps, training_state  # noqa: E402
from native_loop_matches import BATCH, compare, shared_plan  # noqa: E402

STEPS = 4
SAVE_AT = 2


def gpt_tiny() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model (seed 0) and its `STEPS` batches, as every run of this test builds them."""
    torch.manual_seed(0)
    model = build("gpt-tiny", device="cpu", n_layer=4)
    vocab = model.config.vocab_size
    batches = [(torch.randint(0, vocab, (BATCH, 16)), torch.randint(0, vocab, (BATCH, 16))) for _ in range(STEPS)]
    return model, batches


def reference(model: torch.nn.Module, batches: list) -> LoopRun:
    """One device, all `STEPS` uninterrupted; the steps after `SAVE_AT` are what a resumed run repeats."""
    model = copy.deepcopy(model)
    opt, sched = training_state(model)
    losses, norms, _ = train_steps(model, opt, sched, batches, native=False)
    return LoopRun(losses[SAVE_AT:], norms[SAVE_AT:], {}, full_params(model))


def whole(compiled: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole model's parameters: under pipelining each pp rank holds its stages' only."""
    pp_group = getattr(compiled, "pp_group", None)
    if pp_group is None:
        return params
    every: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(every, params, group=pp_group)
    return {k: v for p in every for k, v in p.items()}


def resume(compiled: torch.nn.Module, checkpoint: Path, batches: list) -> LoopRun:
    """What the user's restarted script does: build the optimizer and scheduler, load, train on."""
    opt, sched = training_state(compiled)
    extra = autoshard.load_checkpoint(checkpoint, compiled, opt)
    sched.load_state_dict(extra["sched"])
    losses, norms, _ = train_steps(compiled, opt, sched, batches[extra["step"]:], native=True)
    return LoopRun(losses, norms, {}, whole(compiled, full_params(compiled)))


def main(root: Path, cases: list[str]) -> None:
    with rank_session() as session:
        model, batches = gpt_tiny()
        want = reference(model, batches)
        compiled = {}
        for case in cases:
            compiled[case] = m = autoshard.compile(model, batches[0], plan=shared_plan(model, batches[0], case))
            opt, sched = training_state(m)
            train_steps(m, opt, sched, batches[:SAVE_AT], native=True)
            autoshard.save_checkpoint(root / case, m, opt, step=SAVE_AT, sched=sched.state_dict())
        saved = sorted(d.name for d in root.iterdir() if (d / MANIFEST).is_file())
        results = {}
        for case, m in compiled.items():
            for source in saved:
                got = resume(m, root / source, batches)
                problems = compare(dataclasses.replace(got, first_grads={}), want)
                results[f"{source} -> {case}"] = {"ok": not problems, "problems": problems[:10]}
        session.result = results


def one_process(action: str, root: Path) -> dict:
    """The plain single-device model in this one process, no process group: `save` a checkpoint under
    ROOT/one-process after `SAVE_AT` steps, or `load` every checkpoint in ROOT, train on, compare."""
    model, batches = gpt_tiny()
    if action == "save":
        opt, sched = training_state(model)
        train_steps(model, opt, sched, batches[:SAVE_AT], native=False)
        autoshard.save_checkpoint(root / "one-process", model, opt, step=SAVE_AT, sched=sched.state_dict())
        return {}
    want = reference(model, batches)
    results = {}
    for source in sorted(d.name for d in root.iterdir() if (d / MANIFEST).is_file()):
        fresh, _ = gpt_tiny()
        torch.nn.init.zeros_(fresh.transformer.wte.weight)  # the load must bring every value
        opt, sched = training_state(fresh)
        extra = autoshard.load_checkpoint(root / source, fresh, opt)
        sched.load_state_dict(extra["sched"])
        losses, norms, _ = train_steps(fresh, opt, sched, batches[extra["step"]:], native=False)
        problems = compare(LoopRun(losses, norms, {}, full_params(fresh)), want)
        results[f"{source} -> one-process"] = {"ok": not problems, "problems": problems[:10]}
    return results


if __name__ == "__main__":
    if sys.argv[1] == "--one-process":
        print(json.dumps(one_process(sys.argv[2], Path(sys.argv[3]))))
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
