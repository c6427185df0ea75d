"""Run under torchrun (4 gloo ranks): a job killed with SIGKILL resumes bit-identically from its checkpoint.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/checkpoint_resume.py crash|resume ROOT CASE...

The user's script (tests/native_loop.py's loop: AdamW with two param groups, warmup, clipping), with
each step's batch drawn from torch's global RNG, so resuming exactly needs the RNG state too.

- `crash`: for each plan (native_loop_matches.CASES), compile and train `STEPS` steps uninterrupted,
  saving a checkpoint under ROOT/<plan>/step<k> after `SAVE_AT` with the step and the scheduler's
  state; each rank writes the final parameters and optimizer state (the uninterrupted run's) to
  ROOT/<plan>/uninterrupted-rank<r>.pt. Then rank 1 kills itself with SIGKILL between steps while the
  others go on; torchrun ends the job.
- `resume`: a new torchrun job, as the user's restarted script: for each plan, compile the
  checkpoint's plan (its plan.json), build the optimizer and scheduler, load
  `latest_checkpoint(ROOT/<plan>)` and train to `STEPS`. Parameters and optimizer state must be
  bit-identical (torch.equal) to the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))

import autoshard  # noqa: E402
from autoshard.ir.plan import Plan  # noqa: E402
from autoshard.models import build  # noqa: E402
from autoshard.runtime.checkpoint import PLAN  # noqa: E402
from autoshard.runtime.fsdp import full_value  # noqa: E402
from autoshard.runtime.launch import rank_session  # noqa: E402
from checkpoint_reshard import whole  # noqa: E402
from native_loop import full_params, train_steps, training_state  # noqa: E402
from native_loop_matches import BATCH, shared_plan  # noqa: E402

STEPS = 5
SAVE_AT = 2
SEQ = 16


def model_and_example() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = build("gpt-tiny", device="cpu", n_layer=4)
    return model, next_batch(model)


def next_batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The data loader: each batch drawn from torch's global RNG (the same on every rank)."""
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (BATCH, SEQ)), torch.randint(0, vocab, (BATCH, SEQ))


def train(compiled: torch.nn.Module, opt: Any, sched: Any, model: torch.nn.Module, steps: int) -> None:
    for _ in range(steps):
        train_steps(compiled, opt, sched, [next_batch(model)], native=True)


def state(compiled: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Every parameter and every optimizer state value of the whole model, full, by name."""
    optim = get_optimizer_state_dict(compiled, opt)
    values = {f"param {k}": v for k, v in full_params(compiled).items()}
    for name, entries in optim["state"].items():
        for key, value in entries.items():
            values[f"{key} of {name}"] = full_value(value) if torch.is_tensor(value) else value
    values.update({f"lr of group {i}": g["lr"] for i, g in enumerate(optim["param_groups"])})
    return whole(compiled, values)


def crash(root: Path, cases: list[str]) -> None:
    with rank_session():
        for case in cases:
            model, example = model_and_example()
            compiled = autoshard.compile(model, example, plan=shared_plan(model, example, case))
            torch.manual_seed(1)  # the data order
            opt, sched = training_state(compiled)
            train(compiled, opt, sched, model, SAVE_AT)
            autoshard.save_checkpoint(root / case / f"step{SAVE_AT}", compiled, opt, step=SAVE_AT, sched=sched.state_dict())
            train(compiled, opt, sched, model, STEPS - SAVE_AT)
            torch.save(state(compiled, opt), root / case / f"uninterrupted-rank{dist.get_rank()}.pt")
        dist.barrier()
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        train(compiled, opt, sched, model, 1)  # blocks on rank 1 until torchrun ends the job


def resume(root: Path, cases: list[str]) -> dict[str, Any]:
    results = {}
    with rank_session() as session:
        for case in cases:
            checkpoint = autoshard.latest_checkpoint(root / case)
            assert checkpoint is not None, f"no complete checkpoint under {root / case}"
            model, example = model_and_example()
            compiled = autoshard.compile(model, example, plan=Plan.load(checkpoint / PLAN))
            torch.manual_seed(123)  # a restarted job's RNG: the checkpoint's must replace it
            opt, sched = training_state(compiled)
            extra = autoshard.load_checkpoint(checkpoint, compiled, opt)
            sched.load_state_dict(extra["sched"])
            train(compiled, opt, sched, model, STEPS - extra["step"])
            got = state(compiled, opt)
            want = torch.load(root / case / f"uninterrupted-rank{dist.get_rank()}.pt", weights_only=True)
            differ = sorted(k for k in want if k not in got or not _equal(got[k], want[k]))
            results[case] = {"checkpoint": checkpoint.name, "compared": len(want), "differ": differ[:10],
                             "ok": not differ and set(got) == set(want)}  # fmt: skip
        session.result = results
    return results


def _equal(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


if __name__ == "__main__":
    {"crash": crash, "resume": resume}[sys.argv[1]](Path(sys.argv[2]), sys.argv[3:])
