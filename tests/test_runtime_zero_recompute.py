"""ZeRO 1/2/3, per-block recomputation and bf16-mixed precision, run on 4 simulated ranks (fake process
group + LocalTensorMode, as tests/test_runtime_sim.py) against the same model trained on one device.

Each training case runs 3 steps and compares the loss of every step, the gradients after the first
backward (under ZeRO-1/2: the dp shard the optimizer used, gathered) and the parameters after the last
step. ZeRO cases also check what each rank really holds: optimizer state, gradient and parameter shards
of 1/dp of the full size.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

import autoshard
from autoshard.ir.plan import Plan, Training
from autoshard.runtime import compile
from autoshard.runtime.zero import on_dp
from autoshard.runtime.recompute import measure_saved_activation_bytes
from autoshard.solver.blocks import fold_blocks
from pipeline_plans import MatmulDtypes
from test_runtime_sim import (  # noqa: F401 - fake_world is a fixture
    STEPS,
    WORLD,
    fake_world,
    forced,
    local_mode,
    make,
    reference_run,
    value,
)


def with_training(plan: Plan, ir: autoshard.GraphIR, *, recompute: str | tuple[str, ...] = "none", **kw) -> Plan:
    """`plan` with a Training whose `blocks` are the model's repeated blocks (`transformer.h.0`, ...);
    `recompute` one mode for every block or one per block; other fields as given."""
    containers = fold_blocks(ir).blocks
    blocks = tuple(f"{c}.{i}" for c, n in containers.items() for i in range(n))
    modes = (recompute,) * len(blocks) if isinstance(recompute, str) else tuple(recompute)
    return dataclasses.replace(plan, training=Training(blocks=blocks, recompute=modes, **kw))


def planned(model_name: str, mesh: dict[str, int], optimizer: str = "sgd", **training) -> tuple:
    model, inputs = make(model_name)
    ir = autoshard.capture(model, inputs)
    plan = autoshard.plan_graph(
        ir, f"cpu:{WORLD}", mesh=mesh, param_placements=forced(model_name, mesh), optimizer=optimizer
    )
    return model, inputs, with_training(plan, ir, **training)


def run(compiled, inputs: tuple):
    losses, grads = [], {}
    for step in range(STEPS):
        losses.append(compiled.train_step(*inputs))
        if step == 0:
            grads = {n: value(gathered(g).full_tensor()) for n, g in compiled.gradients().items()}
    return losses, grads, {n: value(t) for n, t in compiled.full_state_dict().items()}


def gathered(t: DTensor) -> DTensor:
    """`t` all-gathered over dp first: DTensor's own `full_tensor` gathers a dp shard beside a tp
    `_StridedShard` (fused qkv) wrongly, the dp-only gather ZeRO uses does it right."""
    names = t.device_mesh.mesh_dim_names
    return on_dp(t, names.index("dp"), Replicate()) if "dp" in names else t


def check_against_single_device(model, inputs, compiled, optimizer, lr, tol) -> None:
    ref_losses, ref_grads, ref_params = reference_run(model, inputs, optimizer, lr)
    with local_mode():
        losses, grads, params = run(compiled, inputs)
    for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol), f"loss of step {step}: {got} != {want}"
    assert set(grads) == set(compiled.parameters)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"grad {n}: {m}")
    assert set(params) == set(ref_params)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"param {n}: {m}")


def local_numel(t: torch.Tensor) -> int:
    """Elements this (simulated) rank holds of `t`."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel()


# ---- ZeRO --------------------------------------------------------------------------------------------

ZERO_CASES = [
    ("gpt-tiny", {"dp": 4}, 1, "sgd"),
    ("gpt-tiny", {"dp": 4}, 2, "sgd"),
    ("gpt-tiny", {"dp": 4}, 3, "sgd"),
    ("gpt-tiny", {"dp": 2, "tp": 2}, 1, "adamw"),
    ("gpt-tiny", {"dp": 2, "tp": 2}, 2, "adamw"),
    ("gpt-tiny", {"dp": 2, "tp": 2}, 3, "adamw"),
    ("llama-tiny", {"dp": 4}, 1, "adamw"),
    ("llama-tiny", {"dp": 4}, 2, "sgd"),
    ("llama-tiny", {"dp": 4}, 3, "sgd"),
    ("llama-tiny", {"dp": 2, "tp": 2}, 2, "sgd"),
    ("llama-tiny", {"dp": 2, "tp": 2}, 3, "adamw"),
]


def _id(case) -> str:
    model, mesh, stage, opt = case
    return f"{model}-{'x'.join(f'{a}{s}' for a, s in mesh.items())}-zero{stage}-{opt}"


@pytest.mark.parametrize(("model_name", "mesh", "stage", "optimizer"), ZERO_CASES, ids=[_id(c) for c in ZERO_CASES])
def test_zero_matches_single_device_and_shards_state(fake_world, model_name, mesh, stage, optimizer) -> None:
    lr = 0.1 if optimizer == "sgd" else 1e-3
    # AdamW divides by sqrt(v) + eps: reduction-order noise in near-zero gradients grows to ~1e-5 of a
    # step (tests/test_runtime_sim.py::test_adamw_dp_x_tp uses the same bound)
    tol = 1e-5 if optimizer == "sgd" else 1e-4
    model, inputs, plan = planned(model_name, mesh, optimizer, zero_stage=stage)
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer=optimizer, lr=lr)
    check_against_single_device(model, inputs, compiled, optimizer, lr, tol)

    dp = mesh["dp"]
    dp_index = list(mesh).index("dp")
    full = {n: p.numel() for n, p in compiled.parameters.items()}
    whole = set(compiled.zero_unsharded)
    assert len(whole) < len(full) / 4, whole  # almost every parameter has a dim dp divides
    tp = mesh.get("tp", 1)
    if stage in (1, 2):
        masters = {n: s.master for n, s in compiled.zero.shards.items()}
        assert set(masters) | whole | set(compiled.zero.planned_shards) == set(full)
        for name, master in masters.items():  # this rank's shard: 1/dp of what it holds without ZeRO
            assert isinstance(master.placements[dp_index], Shard)
            without = local_numel(compiled.parameters[name])
            assert local_numel(master) * dp == without, name
        state = compiled.zero.optimizer.state
        if optimizer == "adamw":  # exp_avg, exp_avg_sq: shards of the master's size
            for name, master in masters.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    assert local_numel(state[master][key]) == local_numel(master), (name, key)
        with local_mode():  # ZeRO-2: no full gradient survives backward; ZeRO-1 keeps them
            compiled.train_step(*inputs)
        for name in masters:
            assert (compiled.parameters[name].grad is None) == (stage == 2), name
            assert local_numel(compiled.zero.shards[name].master.grad) == local_numel(masters[name])
    else:  # ZeRO-3: the parameters themselves (so their gradients and optimizer state) are dp shards
        assert all(isinstance(p.placements[dp_index], Shard) for n, p in compiled.parameters.items() if n not in whole)
        held = sum(local_numel(p) for p in compiled.parameters.values())
        shardable = sum(full[n] for n in full if n not in whole)
        assert held <= shardable / dp + sum(full[n] for n in whole)
        assert held * dp * tp < sum(full.values()) * 1.1 * tp  # ~1/dp of the model per rank
        for name, p in compiled.parameters.items():
            assert p.grad is not None and local_numel(p.grad) == local_numel(p), name
            for t in compiled.optimizer.state[p].values():
                if t.ndim:
                    assert local_numel(t) == local_numel(p), name
        assert "redistribute(" in compiled.code


def test_zero3_placements_from_the_planner_execute(fake_world) -> None:
    """ZeRO-3 chosen by the planner itself: every weight forced Shard(0) over dp via `param_placements`
    (the plan then prices the all-gathers); the runtime keeps the plan's placements as they are."""
    model, inputs = make("gpt-tiny")
    ir = autoshard.capture(model, inputs)
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh={"dp": 4}, param_placements={"*weight": (Shard(0),)}, optimizer="sgd")
    assert any(c.collective == "all_gather" and c.axis == "dp" for c in plan.forward_collectives())
    plan = with_training(plan, ir, zero_stage=3)
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
    assert {n: s for n, s in compiled.plan.params.items() if n.endswith("weight")} == {
        n: s for n, s in plan.params.items() if n.endswith("weight")
    }
    check_against_single_device(model, inputs, compiled, "sgd", 0.1, 1e-5)


def test_zero_refuses_a_mesh_without_dp(fake_world) -> None:
    model, inputs, plan = planned("gpt-tiny", {"tp": 4}, zero_stage=1)
    with pytest.raises(autoshard.InputError, match="dp"):
        compile(model, inputs, plan=plan)


def test_zero_refuses_when_dp_divides_no_dim(fake_world) -> None:
    from test_runtime_sim import MLP

    torch.manual_seed(0)
    model = MLP(d=3, hidden=5)
    inputs = (torch.randn(4, 3), torch.randn(4, 3))
    ir = autoshard.capture(model, inputs)
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh={"dp": 4}, optimizer="sgd")
    for stage in (1, 3):
        with local_mode(), pytest.raises(autoshard.InputError, match="divides"):
            compile(model, inputs, plan=with_training(plan, ir, zero_stage=stage))


# ---- recomputation -----------------------------------------------------------------------------------

RECOMPUTE_CASES = [
    ("gpt-tiny", {"tp": 4}, "full"),
    ("gpt-tiny", {"tp": 4}, "selective"),
    ("gpt-tiny", {"dp": 4}, "selective"),
    ("llama-tiny", {"dp": 4}, "full"),
    ("llama-tiny", {"tp": 4}, "selective"),
    ("llama-tiny", {"dp": 2, "tp": 2}, ("full", "selective")),
]


@pytest.mark.parametrize(
    ("model_name", "mesh", "mode"),
    RECOMPUTE_CASES,
    ids=[f"{m}-{'x'.join(f'{a}{s}' for a, s in d.items())}-{'-'.join(r) if isinstance(r, tuple) else r}" for m, d, r in RECOMPUTE_CASES],
)
def test_recompute_matches_single_device(fake_world, model_name, mesh, mode) -> None:
    model, inputs, plan = planned(model_name, mesh, recompute=mode)
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
    code = compiled.code
    modes = plan.training.recompute
    for block, m in zip(plan.training.blocks, modes, strict=True):
        assert f'checkpoint_block({block.replace(".", "_")}, \'{m}\'' in code, code
    check_against_single_device(model, inputs, compiled, "sgd", 0.1, 1e-5)


def test_recompute_really_recomputes(fake_world) -> None:
    """Backward runs the outlined block's forward again: full recomputes the matmuls and norms, selective
    only the norms (matmul outputs were saved), none nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.mm = 0
            self.norm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            self.norm += func is torch.ops.aten.native_layer_norm.default
            return func(*args, **(kwargs or {}))

    counts = {}
    for mode in ("none", "selective", "full"):
        model, inputs, plan = planned("gpt-tiny", {"dp": 4}, recompute=mode)
        with local_mode():
            compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
            counting = Count()
            with counting:
                compiled.train_step(*inputs)
        counts[mode] = (counting.mm, counting.norm)
    mm, norm = {m: c[0] for m, c in counts.items()}, {m: c[1] for m, c in counts.items()}
    # a block's linears: c_attn, attn.c_proj, c_fc, mlp.c_proj. Full recomputation runs them again but
    # the last: checkpoint stops recomputing once every saved tensor is back, and nothing saves the
    # output of mlp.c_proj (the residual add saves nothing)
    assert mm["full"] - mm["none"] == 2 * 3
    assert mm["selective"] == mm["none"]  # saved, not recomputed
    # ln_1 and ln_2 of both blocks run again under either mode (their outputs feed matmuls); ln_f once
    assert norm["none"] == 2 * 2 + 1, counts
    assert norm["selective"] == norm["full"] == norm["none"] + 2 * 2, counts


def test_recompute_refuses_an_unknown_block(fake_world) -> None:
    model, inputs, plan = planned("gpt-tiny", {"dp": 4})
    plan = dataclasses.replace(plan, training=Training(blocks=("transformer.layers.0",), recompute=("full",)))
    with local_mode(), pytest.raises(autoshard.InputError, match="transformer.layers.0"):
        compile(model, inputs, plan=plan)


# ---- precision -----------------------------------------------------------------------------------------


def test_bf16_mixed_trains_close_to_fp32(fake_world) -> None:
    """Forward under bf16 autocast, fp32 master parameters, gradients and optimizer state.

    Tolerance: bf16 keeps 8 significant bits, one rounding is up to 2^-8 ~ 3.9e-3 relative. The loss is a
    mean over 64 tokens of fp32 cross-entropy (autocast keeps it fp32) whose inputs carry bf16 rounding
    from the matmuls, so its error stays well inside one bf16 rounding (measured: ~1e-5 relative on
    gpt-tiny, as for the single-device autocast run); a wrong step (a lost gradient reduction, say)
    changes the second loss by ~6% (4.86 -> 4.57)."""
    model, inputs, plan = planned("gpt-tiny", {"dp": 2, "tp": 2}, precision="bf16-mixed", zero_stage=1)
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
        seen = MatmulDtypes()
        with seen:
            losses = [compiled.train_step(*inputs)]
        losses += [compiled.train_step(*inputs) for _ in range(STEPS - 1)]
        dtypes = {p.to_local().dtype for p in compiled.parameters.values()}
        state = {s.master.to_local().dtype for s in compiled.zero.shards.values()}
    ref_losses, _, _ = reference_run(model, inputs, "sgd", 0.1)
    assert torch.bfloat16 in seen.dtypes  # the matmuls really ran in bf16
    assert dtypes == state == {torch.float32}  # the master weights did not
    for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        assert math.isclose(got, want, rel_tol=2**-8), f"loss of step {step}: {got} vs fp32 {want}"
    assert losses[-1] < losses[0]


# ---- activation memory (single process) ---------------------------------------------------------------


def test_recomputation_saves_activation_memory() -> None:
    model, inputs = make("gpt-tiny")
    saved = {mode: measure_saved_activation_bytes(model, inputs, mode) for mode in ("none", "selective", "full")}
    assert saved["full"] < saved["selective"] < saved["none"], saved
    # full keeps per block only its input (B, T, C) fp32 = 4*16*64*4 bytes, so the two blocks cost less
    # than 4 such tensors and the rest is the prologue/epilogue (embeddings, final norm, head, loss)
    b, t, c = 4, 16, 64
    assert saved["none"] - saved["full"] > 2 * (8 * b * t * c * 4)  # each block saved > 8 residual-sized tensors


def test_zero2_reduce_scatters_what_zero1_all_reduces(fake_world) -> None:
    """The collectives one step issues: ZeRO-2 reduce-scatters over dp exactly the gradients ZeRO-1
    all-reduces (same bytes), and both all-gather every updated shard after the optimizer step."""
    reports, compiled = {}, {}
    for stage in (1, 2):
        model, inputs, plan = planned("gpt-tiny", {"dp": 4}, zero_stage=stage)
        with local_mode():
            compiled[stage] = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
            reports[stage] = compiled[stage].comm_report(*inputs)
    rows = {s: {(r.phase, r.collective, r.axis): r for r in reports[s].rows} for s in reports}
    shards = compiled[2].zero.shards
    zero_bytes = sum(4 * s.param.numel() for s in shards.values())  # fp32 gradients of the ZeRO'd params

    def issued(stage: int, key: tuple[str, str, str]) -> tuple[int, int]:
        r = rows[stage].get(key)
        return (r.issued_count, r.issued_bytes) if r else (0, 0)

    rs2 = issued(2, ("backward", "reduce_scatter", "dp"))
    ar1, ar2 = issued(1, ("backward", "all_reduce", "dp")), issued(2, ("backward", "all_reduce", "dp"))
    # every gradient all-reduce of ZeRO-1 is a reduce-scatter of the same buffer under ZeRO-2 ...
    assert issued(1, ("backward", "reduce_scatter", "dp")) == (0, 0)
    assert (ar1[0] - ar2[0], ar1[1] - ar2[1]) == rs2, (reports[1].table(), reports[2].table())
    # ... for every ZeRO'd parameter but wpe, whose gradient the plan reduces earlier, on the T x C
    # activation edge (codegen's grad_to): it arrives replicated and its shard is a local slice
    wpe = 4 * shards["transformer.wpe.weight"].param.numel()
    assert rs2 == (len(shards) - 1, zero_bytes - wpe), reports[2].table()
    for stage in (1, 2):
        assert issued(stage, ("optimizer", "all_gather", "dp")) == (len(shards), zero_bytes), reports[stage].table()
