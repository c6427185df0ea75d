"""Benchmark: autoshard's generated training step against what a user writes by hand with torch.distributed.

One run of 4 local gloo processes (CPU) trains the project's GPT (4 layers, d=256, 8 heads, vocab 512,
batch 8 x seq 128, SGD, fp32). Each pair trains two copies of one model on one mesh, the hand-written
way and autoshard's (`autoshard.compile` with the plan's decisions pinned to the pair's):

| pair        | autoshard                        | by hand                                                   |
|-------------|----------------------------------|-----------------------------------------------------------|
| dp          | mesh dp4, ZeRO 0                 | DistributedDataParallel                                    |
| zero1       | mesh dp4, ZeRO 1                 | FSDP2 `fully_shard` per block + root, no reshard after fwd |
| zero2       | mesh dp4, ZeRO 2                 | the same (one micro-batch: ZeRO 1 and 2 coincide)          |
| zero3       | mesh dp4, ZeRO 3                 | FSDP2 `fully_shard` per block + root                       |
| tp          | mesh tp4 (the solver's plan)     | `parallelize_module`, Colwise/Rowwise (benchmarks/tp_vs_parallelize.py) |
| dp2xtp2     | mesh dp2 x tp2, ZeRO 3 (the solver's tp plan) | `parallelize_module` on tp, FSDP2 `fully_shard` per block + root on dp |
| recompute   | mesh dp4, ZeRO 0, recompute full | DDP with `torch.utils.checkpoint` around every block       |
| pp          | mesh pp2 x dp2, 1F1B, 4 micro-batches | `torch.distributed.pipelining` 1F1B, each stage a DDP module, tied embedding/head summed over pp |

`dp-compiled`, `tp-compiled` and `pp-compiled` are the dp, tp and pp pairs again with autoshard's program
under `torch.compile` (`autoshard.compile(torch_compile=True)`, backend aot_eager); its first step,
which traces, is reported apart (`first_step_s`).

The two sides of a pair step alternately (A, B, A, B, ...), so machine noise hits both alike: 3 steps
checked against one device and warm-up, then 10 timed steps each (a barrier before and after each step,
so a step is the slowest rank's), then one step each under a dispatch mode that counts collectives and
their bytes (benchmarks/tp_vs_parallelize.py's `CollectiveCounter`). Reported per pair: the medians, the
spread (min and max), the ratio autoshard / by hand, collectives and bytes per step, and each side's
largest loss difference from one device over the checked steps.

4 ranks share this machine's cores, so absolute times are contention times; the ratio is the figure.
Run on an otherwise idle machine. Writes benchmarks/results/runtime_vs_torch.json.

Usage: python benchmarks/runtime_vs_torch.py [pair ...]
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from tp_vs_parallelize import CollectiveCounter, build_model, make_batches, parallelize_step, tensor_parallel  # noqa: E402 - a sibling benchmark

from autoshard.runtime.reference import single_device_losses  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "runtime_vs_torch.json"
WORLD = 4
CONFIG = dict(n_layer=4, n_embd=256, n_head=8, vocab_size=512, block_size=128)
BATCH, SEQ = 8, 128
LR = 0.1
CHECKED_STEPS = 3
TIMED_STEPS = 10
PAIRS = ("dp", "zero1", "zero2", "zero3", "tp", "dp2xtp2", "recompute", "pp")
# pairs also run with autoshard's program under torch.compile (`<pair>-compiled`): the plans it accepts
COMPILED = ("dp", "tp", "pp")
ALL_PAIRS = (*PAIRS, *(f"{p}-compiled" for p in COMPILED))
PP_MICRO_BATCH = 1  # pp2 x dp2: 4 sequences per replica, 4 micro-batches

Step = Callable[[torch.Tensor, torch.Tensor], float]


# ---- autoshard --------------------------------------------------------------------------------------


def autoshard_step(
    model: nn.Module, example: tuple, mesh: dict[str, int], torch_compile: bool = False, **pinned: Any
) -> Step:
    import autoshard

    ir = autoshard.capture(model, example)
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh=mesh, optimizer="sgd", **pinned)
    compiled = autoshard.compile(model, example, plan=plan, optimizer="sgd", lr=LR, torch_compile=torch_compile)
    return compiled.train_step


# ---- by hand ----------------------------------------------------------------------------------------


def _data_parallel_step(model: nn.Module, dp_group: Any = None) -> Step:
    """SGD on this replica's rows; `dp_group` (default: every rank) is the data-parallel group."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp = dist.get_world_size(dp_group)
    rows = BATCH // dp
    r = dist.get_group_rank(dp_group, dist.get_rank()) if dp_group is not None else dist.get_rank()

    def step(idx: torch.Tensor, targets: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(idx[r * rows:(r + 1) * rows], targets[r * rows:(r + 1) * rows])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dp_group)  # the global batch's loss, as autoshard's train_step returns it
        return mean.item() / dp

    return step


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, x, use_reentrant=False)


def ddp_step(model: nn.Module, recompute: bool = False) -> Step:
    from torch.nn.parallel import DistributedDataParallel

    model = copy.deepcopy(model)
    model.tie_weights()
    if recompute:
        for i, block in enumerate(model.transformer.h):
            model.transformer.h[i] = _Checkpointed(block)
    return _data_parallel_step(DistributedDataParallel(model))


def fsdp_step(model: nn.Module, reshard_after_forward: bool) -> Step:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(model)
    model.tie_weights()
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return _data_parallel_step(model)


def fsdp_tp_step(model: nn.Module) -> Step:
    """dp2 x tp2 by hand: Megatron's split with `parallelize_module` on tp, FSDP2 per block and root on dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("dp", "tp"))
    model = tensor_parallel(model, mesh["tp"])
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return _data_parallel_step(model, mesh.get_group("dp"))


def pair_steps(name: str, model: nn.Module, example: tuple) -> tuple[Step, Step, str]:
    """(autoshard's step, the hand-written step, what the hand-written one is); each side's set-up time
    (autoshard: capture, plan, compile) in `SETUP_S`."""
    t0 = time.perf_counter()
    ours, theirs, what = _pair_steps(name, model, example)
    SETUP_S[name]["total"] = time.perf_counter() - t0
    return ours, theirs, what


SETUP_S: dict[str, dict[str, float]] = {}


def _timed_setup(name: str, side: str, make: Callable[[], Step]) -> Step:
    dist.barrier()
    t0 = time.perf_counter()
    step = make()
    dist.barrier()
    SETUP_S.setdefault(name, {})[side] = time.perf_counter() - t0
    return step


class _FirstStage(nn.Module):
    """Embeddings and the first half of the blocks (what a user splits off by hand for stage 0)."""

    def __init__(self, gpt: nn.Module, blocks: int) -> None:
        super().__init__()
        self.wte, self.wpe = gpt.transformer.wte, gpt.transformer.wpe
        self.h = nn.ModuleList(gpt.transformer.h[:blocks])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return x


class _LastStage(nn.Module):
    """The other blocks, the final norm and the head, its weight a copy of the token embedding's (the
    tied pair's gradients are summed over pp after each step, as Megatron does)."""

    def __init__(self, gpt: nn.Module, blocks: int) -> None:
        super().__init__()
        self.h = nn.ModuleList(gpt.transformer.h[blocks:])
        self.ln_f = gpt.transformer.ln_f
        self.head = nn.Parameter(gpt.transformer.wte.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return torch.nn.functional.linear(self.ln_f(x), self.head)


def pipeline_step(model: nn.Module, micro_batches: int) -> Step:
    """pp2 x dp2, 1F1B with torch.distributed.pipelining: each stage a DDP module over its dp group."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("pp", "dp"))
    pp, dp = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    gpt = copy.deepcopy(model)
    gpt.tie_weights()
    half = len(gpt.transformer.h) // 2
    module = _FirstStage(gpt, half) if pp == 0 else _LastStage(gpt, half)
    wrapped = DistributedDataParallel(module, process_group=mesh.get_group("dp"))
    stage = PipelineStage(wrapped, pp, 2, torch.device("cpu"), group=mesh.get_group("pp"))

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    schedule = Schedule1F1B(stage, micro_batches, loss_fn=loss_fn)  # scale_grads: the mean of the means
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    tied = module.wte.weight if pp == 0 else module.head
    rows = BATCH // (WORLD // 2)

    def step(idx: torch.Tensor, targets: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        idx, targets = idx[dp * rows:(dp + 1) * rows], targets[dp * rows:(dp + 1) * rows]
        losses: list[torch.Tensor] = []
        if pp == 0:
            schedule.step(idx)
        else:
            schedule.step(target=targets, losses=losses)
        dist.all_reduce(tied.grad, group=mesh.get_group("pp"))  # the tied embedding and head
        opt.step()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.all_reduce(loss)  # the last stage's replicas hold the losses
        return loss.item() / (WORLD // 2)

    return step


def _pair_steps(name: str, model: nn.Module, example: tuple) -> tuple[Step, Step, str]:
    base, _, compiled = name.partition("-")
    if base not in PAIRS or compiled not in ("", "compiled") or (compiled and base not in COMPILED):
        raise SystemExit(f"unknown pair {name!r}; expected one of {', '.join(ALL_PAIRS)}")
    dp = {"dp": WORLD}
    plain = {"zero_stage": 0, "recompute": "none"}
    # pair -> (autoshard's mesh and pinned decisions, the hand-written step, what that is)
    sides: dict[str, tuple[dict[str, int], dict[str, Any], Callable[[], Step], str]] = {
        "dp": (dp, plain, lambda: ddp_step(model), "DDP"),
        "zero1": (dp, {**plain, "zero_stage": 1}, lambda: fsdp_step(model, reshard_after_forward=False),
                  "FSDP2, reshard_after_forward=False"),
        "zero2": (dp, {**plain, "zero_stage": 2}, lambda: fsdp_step(model, reshard_after_forward=False),
                  "FSDP2, reshard_after_forward=False"),
        "zero3": (dp, {**plain, "zero_stage": 3}, lambda: fsdp_step(model, reshard_after_forward=True), "FSDP2 per block"),
        "tp": ({"tp": WORLD}, {}, lambda: parallelize_step(model)[0], "parallelize_module"),
        "dp2xtp2": ({"dp": 2, "tp": WORLD // 2}, {**plain, "zero_stage": 3}, lambda: fsdp_tp_step(model),
                    "FSDP2 per block + parallelize_module"),
        "recompute": (dp, {**plain, "recompute": "full"}, lambda: ddp_step(model, recompute=True),
                      "DDP + checkpoint per block"),
        "pp": ({"pp": 2, "dp": WORLD // 2}, {**plain, "schedule": "1f1b", "micro_batch_size": PP_MICRO_BATCH},
               lambda: pipeline_step(model, BATCH // (WORLD // 2) // PP_MICRO_BATCH), "pipelining 1F1B + DDP per stage"),
    }
    mesh, pinned, theirs, what = sides[base]
    ours = _timed_setup(name, "autoshard", lambda: autoshard_step(model, example, mesh, bool(compiled), **pinned))
    return ours, _timed_setup(name, "by_hand", theirs), what


# ---- one rank --------------------------------------------------------------------------------------


def _timed(step: Step, batch: tuple) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step(*batch)
    dist.barrier()
    return time.perf_counter() - t0


def _counted(step: Step, batch: tuple) -> CollectiveCounter:
    counter = CollectiveCounter()
    with counter:
        step(*batch)
    return counter


def measure_pair(ours: Step, theirs: Step, batches: list, reference: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, step in (("autoshard", ours), ("by_hand", theirs)):
        t0 = time.perf_counter()
        losses = [step(*batches[0])]
        first = time.perf_counter() - t0
        losses += [step(*b) for b in batches[1:CHECKED_STEPS]]
        out[side] = {"losses": losses, "first_step_s": first,
                     "max_loss_diff_vs_single_device": max(abs(a - b) for a, b in zip(losses, reference, strict=True))}
    times: dict[str, list[float]] = {"autoshard": [], "by_hand": []}
    for i in range(TIMED_STEPS):  # interleaved: A, B, A, B, ...
        batch = batches[CHECKED_STEPS + i]
        times["autoshard"].append(_timed(ours, batch))
        times["by_hand"].append(_timed(theirs, batch))
    for side, step in (("autoshard", ours), ("by_hand", theirs)):
        counter = _counted(step, batches[-1])
        out[side].update(
            step_times_s=times[side],
            median_step_s=statistics.median(times[side]),
            collectives_per_step=dict(counter.calls),
            total_collectives=sum(counter.calls.values()),
            total_bytes=sum(counter.bytes.values()),
        )
    return out


def rank_main(pairs: list[str]) -> dict[str, Any]:
    model = build_model(CONFIG)
    batches = make_batches(CHECKED_STEPS + TIMED_STEPS + 1, BATCH, SEQ, CONFIG["vocab_size"])
    reference = single_device_losses(model, batches[:CHECKED_STEPS], lr=LR)
    out = {}
    for name in pairs:
        ours, theirs, what = pair_steps(name, model, batches[0])
        out[name] = {"by_hand_is": what, "setup_s": dict(SETUP_S[name]),
                     **measure_pair(ours, theirs, batches, reference)}
    return out


# ---- the parent ------------------------------------------------------------------------------------


def main(pairs: list[str]) -> None:
    from autoshard.runtime.launch import run_local

    pairs = pairs or list(ALL_PAIRS)
    for name in pairs:
        if name not in ALL_PAIRS:
            raise SystemExit(f"unknown pair {name!r}; expected one of {', '.join(ALL_PAIRS)}")
    run = run_local(rank_main, WORLD, pairs, timeout=1800)
    ranks = run.results
    rows = {}
    for name in pairs:
        r0 = ranks[0][name]
        row: dict[str, Any] = {"by_hand_is": r0["by_hand_is"], "setup_s": r0["setup_s"]}
        for side in ("autoshard", "by_hand"):
            s = r0[side]
            row[side] = {
                "median_step_s": s["median_step_s"],
                "first_step_s": s["first_step_s"],
                "min_step_s": min(s["step_times_s"]),
                "max_step_s": max(s["step_times_s"]),
                "median_step_s_per_rank": [r[name][side]["median_step_s"] for r in ranks],
                "collectives_per_step": s["collectives_per_step"],
                "total_collectives": s["total_collectives"],
                "bytes_per_step": s["total_bytes"],
                "max_loss_diff_vs_single_device": max(r[name][side]["max_loss_diff_vs_single_device"] for r in ranks),
            }
        row["time_ratio"] = row["autoshard"]["median_step_s"] / row["by_hand"]["median_step_s"]
        rows[name] = row
    print(f"GPT {CONFIG}, batch {BATCH} x seq {SEQ}, SGD, fp32, {WORLD} gloo ranks on CPU")
    print(f"{TIMED_STEPS} interleaved timed steps per side after {CHECKED_STEPS} checked; run took {run.seconds:.0f} s\n")
    header = (f"{'pair':13} {'by hand':36} {'autoshard':>10} {'by hand':>10} {'ratio':>6} "
              f"{'colls a/h':>10} {'MiB a/h':>14} {'loss diff a/h':>20}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        a, h = r["autoshard"], r["by_hand"]
        print(f"{name:13} {r['by_hand_is']:36} {a['median_step_s'] * 1e3:7.1f} ms {h['median_step_s'] * 1e3:7.1f} ms "
              f"{r['time_ratio']:6.2f} {a['total_collectives']:4d}/{h['total_collectives']:<5d} "
              f"{a['bytes_per_step'] / 2**20:6.2f}/{h['bytes_per_step'] / 2**20:<7.2f} "
              f"{a['max_loss_diff_vs_single_device']:9.1e}/{h['max_loss_diff_vs_single_device']:<9.1e}")
    print()
    for name, r in rows.items():
        print(f"{name:13} set-up (capture + plan + compile): autoshard {r['setup_s']['autoshard']:.2f} s, "
              f"by hand {r['setup_s']['by_hand']:.2f} s; first step {r['autoshard']['first_step_s']:.2f} s / "
              f"{r['by_hand']['first_step_s']:.2f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = {**previous.get("pairs", {}), **rows}  # a run of some pairs keeps the others' last figures
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "config": {**CONFIG, "batch": BATCH, "seq": SEQ, "world": WORLD, "timed_steps": TIMED_STEPS},
        "pairs": merged,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
