"""Benchmark: autoshard's tensor-parallel plans vs PyTorch's own `parallelize_module`, side by side.

One run of 4 local gloo processes (CPU) trains one small GPT (2 layers, d=256, 8 heads, vocab 512, batch
8 x seq 128, SGD) four ways on the same mesh `{"tp": 4}`:

* `autoshard (solver)`: `autoshard.compile(model, inputs, mesh={"tp": 4})`, whatever the solver picks;
* `autoshard (megatron)`: the same, with Megatron's column/row split forced through `param_placements`
  (the solver then keeps the residual stream sequence-sharded: reduce-scatter + all-gather);
* `autoshard (megatron, R residual)`: the same split with the residual hinted replicated
  (`autoshard.shard(module, in_strategy=...)`), Megatron's original layout, what the recipe below runs;
* `parallelize_module`: PyTorch's hand-written recipe, ColwiseParallel on c_attn and c_fc, RowwiseParallel
  on both c_proj, everything else replicated.

The fused-qkv caveat: our GPT splits `c_attn`'s output with `chunk(3)`. Plain ColwiseParallel gives rank r
the contiguous rows [r*3C/4, (r+1)*3C/4), a mix of q, k and v, so the local chunk(3) is *wrong* (training
runs, numbers differ). autoshard shards c_attn as `_StridedShard(0, 3)` instead. To compare like with
like, the parallelize_module copy gets c_attn's rows permuted to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] before
sharding, so its contiguous shard is exactly rank r's q, k and v: the same math, the same bytes. Every
variant's first three losses are checked against one-device training, so a wrong split would show.

Measured per variant: the first 3 steps are checked and serve as warm-up, then the median of N timed
steps (a barrier before and after each, so a step is the slowest rank's), then one more step under a
dispatch mode that counts every collective (`_c10d_functional` / `c10d` ops) and the bytes of its input
tensor on each rank (all_reduce: the full tensor; all_gather: the local shard; reduce_scatter: the full
input), and a last step under `CommDebugMode` as a cross-check of the count (it fails on autoshard's
compiled step; recorded as such). 4 ranks share this machine's cores, so absolute
times are CPU-contention times; the ratio is the figure.

Writes benchmarks/results/tp_vs_parallelize.json.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autoshard.runtime.reference import single_device_losses

RESULTS = Path(__file__).parent / "results" / "tp_vs_parallelize.json"
WORLD = 4
CONFIG = dict(n_layer=2, n_embd=256, n_head=8, vocab_size=512, block_size=128)
BATCH, SEQ = 8, 128
LR = 0.1
CHECKED_STEPS = 3
TIMED_STEPS = 10
MEGATRON = {
    "*.c_attn.weight": (_StridedShard(0, split_factor=3),),
    "*.c_attn.bias": (_StridedShard(0, split_factor=3),),
    "*.attn.c_proj.weight": (Shard(1),),
    "*.c_fc.weight": (Shard(0),),
    "*.c_fc.bias": (Shard(0),),
    "*.mlp.c_proj.weight": (Shard(1),),
}
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")
_NOT_COLLECTIVES = ("wait_tensor", "wait", "barrier", "monitored_barrier", "_wrap_tensor_autograd")


class CollectiveCounter(TorchDispatchMode):
    """Counts collectives and the bytes of their tensor inputs as they are dispatched on this rank."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into plain ops and collectives, then see those
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        name = func._schema.name
        namespace, _, op = name.partition("::")
        if namespace in _COLLECTIVE_NAMESPACES and op not in _NOT_COLLECTIVES:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            first = tensors[:1] if namespace != "c10d" else tensors  # c10d ops take lists
            self.calls[op] += 1
            self.bytes[op] += sum(t.numel() * t.element_size() for t in first)
        return func(*args, **kwargs)


def build_model(config: dict[str, int] = CONFIG) -> nn.Module:  # noqa: B006 - read only
    """The benchmark GPT, seeded (benchmarks/runtime_vs_torch.py builds its own config with it)."""
    from autoshard.models import build

    torch.manual_seed(0)
    return build("gpt-small-test", device="cpu", **config)


def make_batches(
    n: int, batch: int = BATCH, seq: int = SEQ, vocab: int = CONFIG["vocab_size"]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` seeded (tokens, targets) batches."""
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen))
        for _ in range(n)
    ]


# ---- the two ways to parallelise -------------------------------------------------------------------


def autoshard_step(
    model: nn.Module, example: tuple, forced: bool, replicate_residual: bool = False
) -> tuple[Any, dict[str, Any]]:
    import autoshard

    if replicate_residual:
        model = hint_replicated_residual(model)
    ir = autoshard.capture(model, example)
    plan = autoshard.plan_graph(
        ir, f"cpu:{WORLD}", mesh={"tp": WORLD}, param_placements=MEGATRON if forced else None, optimizer="sgd"
    )
    compiled = autoshard.compile(model, example, plan=plan, optimizer="sgd", lr=LR)
    summary = plan.summary()
    info = {
        "plan_params_sharded": sorted({spec for spec in plan.params.values() if "S" in spec}),
        "plan_predicted_step_s": summary["step_time_s"],
        "plan_predicted_comm_bytes": summary["comm_bytes"],
        "plan_collectives": _plan_collectives(plan),
    }
    return compiled.train_step, info


def hint_replicated_residual(model: nn.Module) -> nn.Module:
    """A copy whose attention and MLP inputs and block outputs are hinted replicated: Megatron's original
    layout (one all-reduce per sublayer forward), which is what parallelize_module's recipe runs. Without
    the hint the solver prefers the sequence-parallel residual (reduce-scatter + all-gather)."""
    import autoshard

    model = copy.deepcopy(model)
    model.tie_weights()
    for block in model.transformer.h:
        autoshard.shard(block.attn, in_strategy=((1, 1, 1),))
        autoshard.shard(block.mlp, in_strategy=((1, 1, 1),))
        autoshard.shard(block, out_strategy=((1, 1, 1),))
    return model


def _plan_collectives(plan: Any) -> str:
    report = plan.report()
    line = next((ln for ln in report.splitlines() if "collectives per step" in ln), "")
    return line.strip()


def permute_fused_qkv(linear: nn.Linear, tp: int) -> None:
    """Reorder c_attn's output rows from [q | k | v] to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (in place), so a
    contiguous Shard(0) over `tp` ranks gives rank r its own q, k and v blocks."""
    out = linear.out_features
    c = out // 3
    index = torch.arange(out).view(3, tp, c // tp).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        linear.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[index])


def tensor_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    """A copy of `model` split Megatron's way over the 1-D `mesh` with `parallelize_module`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = copy.deepcopy(model)
    model.tie_weights()
    plan = {}
    for i, block in enumerate(model.transformer.h):
        permute_fused_qkv(block.attn.c_attn, mesh.size())
        plan[f"transformer.h.{i}.attn.c_attn"] = ColwiseParallel()
        plan[f"transformer.h.{i}.attn.c_proj"] = RowwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_fc"] = ColwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_proj"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def parallelize_step(model: nn.Module) -> tuple[Any, dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh

    model = tensor_parallel(model, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(idx: torch.Tensor, targets: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        opt.step()
        return loss.item()

    return step, {"plan": "ColwiseParallel c_attn (qkv rows permuted), c_fc; RowwiseParallel c_proj; rest replicated"}


# ---- one rank --------------------------------------------------------------------------------------


def measure(step: Any, batches: list, reference: list[float]) -> dict[str, Any]:
    from torch.distributed.tensor.debug import CommDebugMode

    losses = [step(*b) for b in batches[:CHECKED_STEPS]]
    times = []
    for i in range(TIMED_STEPS):
        batch = batches[CHECKED_STEPS + i]
        dist.barrier()
        t0 = time.perf_counter()
        step(*batch)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    counter = CollectiveCounter()
    with counter:
        step(*batches[-2])
    return {
        "losses": losses,
        "max_loss_diff_vs_single_device": max(abs(a - b) for a, b in zip(losses, reference, strict=True)),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "collectives_per_step": dict(counter.calls),
        "collective_bytes_per_step": dict(counter.bytes),
        "total_collectives": sum(counter.calls.values()),
        "total_bytes": sum(counter.bytes.values()),
        "comm_debug_mode_count": comm_debug_count(step, batches[-1]),
    }


def comm_debug_count(step: Any, batch: tuple) -> int | str:
    """PyTorch's own count of one step's collectives, as a cross-check of CollectiveCounter. Run last:
    on autoshard's compiled step CommDebugMode's module tracker breaks the backward ("aten.add.Tensor got
    mixed torch.Tensor and DTensor"), and that failure is recorded rather than hidden."""
    from torch.distributed.tensor.debug import CommDebugMode

    try:
        with warnings.catch_warnings(), CommDebugMode() as comm:
            warnings.simplefilter("ignore")  # its module tracker warns about full backward hooks
            step(*batch)
    except RuntimeError as e:
        return f"failed: {str(e).splitlines()[0]}"
    return comm.get_total_counts()


def rank_main() -> dict[str, Any]:
    model = build_model()
    batches = make_batches(CHECKED_STEPS + TIMED_STEPS + 2)
    reference = single_device_losses(model, batches[:CHECKED_STEPS], lr=LR)
    out = {}
    for name, make in (
        ("autoshard (solver)", lambda: autoshard_step(model, batches[0], forced=False)),
        ("autoshard (megatron)", lambda: autoshard_step(model, batches[0], forced=True)),
        ("autoshard (megatron, R residual)", lambda: autoshard_step(model, batches[0], True, True)),
        ("parallelize_module", lambda: parallelize_step(model)),
    ):
        step, info = make()
        out[name] = {**info, **measure(step, batches, reference)}
    return out


# ---- the parent ------------------------------------------------------------------------------------


def main() -> None:
    from autoshard.runtime.launch import run_local

    run = run_local(rank_main, WORLD, timeout=600)
    ranks = run.results
    variants = list(ranks[0])
    rows = {}
    for v in variants:
        r0 = ranks[0][v]
        rows[v] = {
            **{k: r0[k] for k in r0 if k not in ("step_times_s",)},
            "median_step_s_per_rank": [r[v]["median_step_s"] for r in ranks],
            "step_times_s_rank0": r0["step_times_s"],
            "total_bytes_per_rank": [r[v]["total_bytes"] for r in ranks],
        }
    base = rows["parallelize_module"]
    for v in variants:
        rows[v]["time_ratio_vs_parallelize_module"] = rows[v]["median_step_s"] / base["median_step_s"]
        rows[v]["bytes_ratio_vs_parallelize_module"] = (
            rows[v]["total_bytes"] / base["total_bytes"] if base["total_bytes"] else None
        )
    print(f"GPT {CONFIG}, batch {BATCH} x seq {SEQ}, SGD, {WORLD} gloo ranks on CPU, mesh tp={WORLD}")
    print(f"median of {TIMED_STEPS} steps after {CHECKED_STEPS} checked warm-up steps; run took {run.seconds:.0f} s\n")
    header = (
        f"{'variant':32} {'median step':>12} {'ratio':>6} {'collectives':>11} {'MiB/rank/step':>13} "
        f"{'max |loss diff|':>16}"
    )
    print(header)
    print("-" * len(header))
    for v, r in rows.items():
        print(
            f"{v:32} {r['median_step_s'] * 1e3:9.1f} ms {r['time_ratio_vs_parallelize_module']:6.2f} "
            f"{r['total_collectives']:11d} {r['total_bytes'] / 2**20:13.2f} {r['max_loss_diff_vs_single_device']:16.2e}"
        )
    print()
    for v, r in rows.items():
        print(f"{v}: {r['collectives_per_step']}  (CommDebugMode counted {r['comm_debug_mode_count']})")
        if "plan_collectives" in r:
            print(f"    plan: {r['plan_collectives']}; sharded param placements {r['plan_params_sharded']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "tp_vs_parallelize",
                "job": f"GPT {CONFIG}, batch {BATCH} x seq {SEQ}, SGD lr {LR}, {WORLD} gloo ranks, mesh tp={WORLD}",
                "method": (
                    f"{CHECKED_STEPS} warm-up steps checked against one-device losses, median of {TIMED_STEPS} "
                    "steps timed between barriers, one step with collectives counted by a dispatch mode "
                    "(bytes = input tensor of each collective on a rank)"
                ),
                "fused_qkv_note": (
                    "parallelize_module's ColwiseParallel on the fused c_attn needs its rows permuted to "
                    "[q0 k0 v0 | q1 k1 v1 | ...] for chunk(3) to be right; autoshard uses _StridedShard(0, 3)"
                ),
                "variants": rows,
                "wall_s": run.seconds,
                "exit_crashes": run.exit_crashes,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": __import__("os").cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
