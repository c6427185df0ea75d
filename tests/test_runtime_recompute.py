"""Per-block recomputation and bf16-mixed precision, run on 4 simulated ranks (fake process group +
LocalTensorMode, as tests/test_runtime_sim.py) against the same model trained on one device, and the
refusal of ZeRO without a dp axis.

Each training case runs 3 steps and compares the loss of every step, the gradients after the first
backward and the parameters after the last step. ZeRO itself (FSDP2) trains in real processes:
tests/test_runtime_torchrun.py and tests/test_runtime_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import autoshard
from autoshard.ir.plan import Plan, Training
from autoshard.runtime import compile
from autoshard.runtime.fsdp import full_value
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
            grads = {n: value(full_value(g)) for n, g in compiled.gradients().items()}
    return losses, grads, {n: value(t) for n, t in compiled.full_state_dict().items()}


def check_against_single_device(model, inputs, compiled, optimizer, lr, tol) -> None:
    ref_losses, ref_grads, ref_params = reference_run(model, inputs, optimizer, lr)
    with local_mode():
        losses, grads, params = run(compiled, inputs)
    for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol), f"loss of step {step}: {got} != {want}"
    assert set(grads) == {n for n, _ in compiled.named_parameters()}
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"grad {n}: {m}")
    assert set(params) == set(ref_params)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"param {n}: {m}")


# ---- ZeRO ----------------------------------------------------------------------------------------------
# ZeRO runs through FSDP2, which needs real process groups (its storage resizing fails under LocalTensorMode):
# its training cases are in tests/dist/train_matches.py and pipeline_matches.py. The refusal runs here.


def test_zero_refuses_a_mesh_without_dp(fake_world) -> None:
    model, inputs, plan = planned("gpt-tiny", {"tp": 4}, zero_stage=1)
    with pytest.raises(autoshard.InputError, match="dp"):
        compile(model, inputs, plan=plan)


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
    model, inputs, plan = planned("gpt-tiny", {"dp": 2, "tp": 2}, precision="bf16-mixed")
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
        seen = MatmulDtypes()
        with seen:
            losses = [compiled.train_step(*inputs)]
        losses += [compiled.train_step(*inputs) for _ in range(STEPS - 1)]
        dtypes = {p.to_local().dtype for p in compiled.parameters()}
        dtypes |= {t.to_local().dtype for p in compiled.parameters() for t in (p.grad,) if t is not None}
    ref_losses, _, _ = reference_run(model, inputs, "sgd", 0.1)
    assert torch.bfloat16 in seen.dtypes  # the matmuls really ran in bf16
    assert dtypes == {torch.float32}  # the master weights and their gradients did not
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
