"""`make demo`: the main job on built-in defaults.

1. Capture a reference model on the meta device (no parameter memory) and print its graph summary,
   the FLOPs per top-level module and the first nodes of its graph.
2. Plan a GPT for a multi-node A100 cluster (dp x tp x pp, micro-batches, pipeline schedule, ZeRO stage
   and recomputation searched, progress shown as it goes) and print the plan report with the
   configurations that lost and why.
3. Run a plan for real: plan a small GPT for `cpu:4`, train it a few steps on 4 local gloo processes with
   `autoshard.compile`, and print each step's loss next to the same model trained on one device here
   (same seed, same batches). The difference is the proof that the plan computes the model's math.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import autoshard
from autoshard.ir.plan import Plan
from autoshard.models import PRESETS, build
from autoshard.report.table import format_count, format_table
from autoshard.runtime.reference import single_device_losses

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autoshard.demo", description=__doc__)
    parser.add_argument("--model", default="gpt2-small", choices=sorted(PRESETS), help="reference preset")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--plan-model", default="gpt3-1.3b", choices=sorted(PRESETS), help="model to plan")
    parser.add_argument("--cluster", default="a100-80g:4x8", help="cluster to plan for, e.g. h100:2x8")
    parser.add_argument("--plan-batch", type=int, default=64, help="global batch (sequences) to plan")
    parser.add_argument("--run-model", default="gpt-small-test", choices=sorted(PRESETS), help="model to train")
    parser.add_argument("--ranks", type=int, default=4, help="local gloo processes to train on")
    parser.add_argument("--steps", type=int, default=4, help="training steps to run")
    parser.add_argument("--skip-run", action="store_true", help="skip section 3 (starts processes)")
    args = parser.parse_args(argv)
    show_capture(args)
    show_plan(args)
    if not args.skip_run:
        show_run(args)


def show_capture(args: argparse.Namespace) -> None:
    model = build(args.model, device="meta")
    seq = args.seq or _max_seq(model.config)
    idx = torch.zeros(args.batch, seq, dtype=torch.long, device="meta")
    start = time.perf_counter()
    ir = autoshard.capture(model, (idx, idx))
    seconds = time.perf_counter() - start

    s = ir.summary()
    print(f"== capture: {args.model}, batch {args.batch} x seq {seq}, on meta, {seconds:.2f} s ==")
    print(
        format_table(
            ["figure", "value"],
            [
                ["nodes", s["nodes"]],
                ["compute nodes", s["compute_nodes"]],
                ["parameters", f"{s['parameters']:,} ({format_count(s['parameters'])})"],
                ["parameter bytes", format_count(s["parameter_bytes"], unit="B")],
                ["forward FLOPs", format_count(s["forward_flops"])],
                ["forward bytes moved", format_count(s["forward_bytes_moved"], unit="B")],
            ],
        )
    )
    print()
    groups = ir.flops_by_module(depth=2)
    print(format_table(["module", "forward FLOPs"], [[k, format_count(v)] for k, v in groups.items() if v]))
    print()
    print(ir.table(max_rows=24))


def show_plan(args: argparse.Namespace) -> None:
    model = build(args.plan_model, device="meta")
    seq = _max_seq(model.config)
    idx = torch.zeros(args.plan_batch, seq, dtype=torch.long, device="meta")
    print(f"\n== plan: {args.plan_model}, global batch {args.plan_batch} x seq {seq}, on {args.cluster} ==")
    start = time.perf_counter()
    plan = autoshard.plan(model, (idx, idx.clone()), args.cluster, progress=lambda line: print(line, flush=True))
    print(f"(planned in {time.perf_counter() - start:.1f} s)\n")
    print(plan.report())
    if plan.alternatives:
        print()
        rows = [[a.get("config", str(a.get("mesh"))), a["reason"]] for a in plan.alternatives]
        print(format_table(["configuration", "why it lost"], rows))


RUN_BATCH = 8  # global batch of section 3: divisible by every dp size a 4-device mesh can have
RUN_SEQ = 64
RUN_LR = 0.1
RUN_SEED = 0


def show_run(args: argparse.Namespace) -> None:
    from autoshard.runtime.launch import run_local

    model = _run_model(args.run_model)
    vocab = model.config.vocab_size
    seq = min(RUN_SEQ, _max_seq(model.config))
    gen = torch.Generator().manual_seed(RUN_SEED + 1)

    def tokens() -> torch.Tensor:
        return torch.randint(0, vocab, (RUN_BATCH, seq), generator=gen)

    batches = [(tokens(), tokens()) for _ in range(args.steps)]
    cluster = f"cpu:{args.ranks}"
    print(
        f"\n== run: {args.run_model} on {args.ranks} local gloo processes ({cluster}), "
        f"batch {RUN_BATCH} x seq {seq}, SGD lr {RUN_LR}, {args.steps} steps =="
    )
    start = time.perf_counter()
    plan = autoshard.plan(model, batches[0], cluster, optimizer="sgd")
    print(f"(planned in {time.perf_counter() - start:.1f} s)\n")
    print(plan.report())

    reference = single_device_losses(model, batches, lr=RUN_LR)
    run = run_local(_train_on_rank, args.ranks, plan.to_json(), args.run_model, batches)
    losses = run.results[0]
    if any(r != losses for r in run.results[1:]):
        raise RuntimeError(f"ranks disagree on the loss: {run.results}")
    print(f"\n(trained on {args.ranks} processes in {run.seconds:.1f} s, process start-up included)\n")
    rows = [
        [step, f"{got:.6f}", f"{want:.6f}", f"{got - want:+.2e}"]
        for step, (got, want) in enumerate(zip(losses, reference, strict=True))
    ]
    print(format_table(["step", f"loss on {args.ranks} ranks", "loss on 1 device", "difference"], rows))


def _run_model(name: str) -> torch.nn.Module:
    """The model of section 3, identical in the parent and in every rank (fixed seed, built on cpu)."""
    torch.manual_seed(RUN_SEED)
    return build(name, device="cpu")


def _train_on_rank(plan_json: dict[str, Any], model_name: str, batches: list[tuple[torch.Tensor, ...]]) -> list[float]:
    """Runs on every rank (spawned by run_local): the parent's plan, compiled and trained."""
    model = autoshard.compile(_run_model(model_name), batches[0], plan=Plan.from_json(plan_json))
    opt = torch.optim.SGD(model.parameters(), lr=RUN_LR)  # the user's own optimizer, over the DTensor shards
    losses = []
    for batch in batches:  # the loop a user writes: step (forward + backward), optimizer step, zero_grad
        losses.append(model.step(*batch))
        opt.step()
        opt.zero_grad()
    return losses


def _max_seq(config: object) -> int:
    for field in ("block_size", "max_seq_len"):
        if hasattr(config, field):
            return int(getattr(config, field))
    raise AttributeError(f"{type(config).__name__} names no sequence length")


if __name__ == "__main__":
    main()
