"""The collectives a training step issues equal the plan's, on 4 simulated ranks (fake process group +
LocalTensorMode, as tests/test_runtime_sim.py), and a model built on meta trains like the CPU one.

Exact except for two documented, measured differences (see autoshard/runtime/comm.py and the report):
- one-element collectives inside DTensor's cross-entropy backward (nll_loss's `total_weight`, 4 bytes),
  which the plan cannot see: compared apart (`matches_beyond_scalars`), at most one per step;
- the parameters' gradient all-reduces run in buckets after backward (runtime/grad_sync.py); the plan's
  per-parameter ones are compared as those buckets (comm.bucketed_gradients), a parameter used twice
  (GPT's tied wte/lm_head) reduced once.
"""

from __future__ import annotations

import math

import pytest
import torch

import autoshard
from autoshard.models import build
from autoshard.runtime import compile
from test_runtime_sim import WORLD, fake_world, forced, local_mode, make, value  # noqa: F401 - fixture

CASES = [("mlp", {"dp": 4}), ("mlp", {"tp": 4}), ("mlp", {"dp": 2, "tp": 2}),
         ("gpt-tiny", {"dp": 4}), ("gpt-tiny", {"tp": 4}), ("gpt-tiny", {"dp": 2, "tp": 2})]


@pytest.mark.parametrize(("model_name", "mesh"), CASES, ids=[f"{m}-{'x'.join(f'{a}{s}' for a, s in d.items())}" for m, d in CASES])
def test_issued_collectives_equal_the_plan(fake_world, model_name, mesh) -> None:
    model, inputs = make(model_name)
    ir = autoshard.capture(model, inputs)
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh=mesh, param_placements=forced(model_name, mesh), optimizer="sgd")
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
        report = compiled.comm_report(*inputs)
        # from the second step on the buckets are reduced during backward (grad_sync.OverlappedSync)
        overlapped = compiled.comm_report(*inputs)
    print(report.table())
    assert report.matches_beyond_scalars, report.table()
    assert overlapped.matches_beyond_scalars, overlapped.table()
    assert report.unplanned_scalars <= 1, report.table()
    # the parameters' gradients are reduced in buckets (runtime/grad_sync.py), not one by one: here each
    # set of axes the gradients are partial over fits one bucket, so over dp the step issues the plan's
    # activation all-reduces and one per such set
    if "dp" in mesh:
        param_of = {n: info.name for info in ir.params for n in info.nodes}
        reduced = [c for c in plan.collectives if (c.phase, c.collective) == ("backward", "all_reduce")]
        axes_of: dict[str, set[str]] = {}
        for c in reduced:
            if c.src in param_of:
                axes_of.setdefault(param_of[c.src], set()).add(c.axis)
        groups = {frozenset(a) for a in axes_of.values() if "dp" in a}
        activations = sum(1 for c in reduced if c.axis == "dp" and c.src not in param_of)
        issued = sum(1 for c in report.issued if (c.phase, c.collective, c.axis) == ("backward", "all_reduce", "dp"))
        assert len(axes_of) > len(groups) and issued == activations + len(groups), report.table()
    if model_name == "mlp":  # no tied weights, no cross-entropy: exact
        assert report.matches, report.table()
    assert not any(r.axis == "?" or r.phase == "optimizer" for r in report.rows)  # every collective on a mesh axis


def test_comm_report_runs_a_real_step(fake_world) -> None:
    model, inputs = make("mlp")
    ir = autoshard.capture(model, inputs)
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh={"dp": 4}, optimizer="sgd")
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
        report = compiled.comm_report(*inputs)
        second = compiled.train_step(*inputs)
    assert math.isclose(report.loss, model(*inputs).item(), rel_tol=1e-5)
    assert second < report.loss  # the measured step updated the parameters
    assert "all_reduce" in str(report) and "planned bytes" in str(report)


# ---- models built on meta ----------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [{"dp": 4}, {"tp": 4}, {"dp": 2, "tp": 2}], ids=["dp4", "tp4", "dp2xtp2"])
def test_meta_model_materialises_as_the_seeded_cpu_model_and_trains_alike(fake_world, mesh) -> None:
    seed = 1234
    torch.manual_seed(seed)
    reference = build("gpt-tiny", device="cpu")
    meta = build("gpt-tiny")
    assert all(p.is_meta for p in meta.parameters())
    idx = torch.randint(0, meta.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, meta.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    ir = autoshard.capture(meta, (idx, tgt))
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh=mesh, param_placements=forced("gpt-tiny", mesh), optimizer="sgd")
    with local_mode():
        from_meta = compile(meta, (idx, tgt), plan=plan, optimizer="sgd", lr=0.1, seed=seed)
        from_cpu = compile(reference, (idx, tgt), plan=plan, optimizer="sgd", lr=0.1)
        state = {k: value(v) for k, v in from_meta.full_state_dict().items()}
        assert set(state) == set(reference.state_dict())
        for name, want in reference.state_dict().items():
            assert torch.equal(state[name], want), name
        losses = [(from_meta.train_step(idx, tgt), from_cpu.train_step(idx, tgt)) for _ in range(2)]
        after = {k: value(v) for k, v in from_meta.full_state_dict().items()}
        after_cpu = {k: value(v) for k, v in from_cpu.full_state_dict().items()}
    assert all(a == b for a, b in losses), losses
    for name, want in after_cpu.items():
        assert torch.equal(after[name], want), name
    assert all(p.is_meta for p in meta.parameters())  # the user's model is not materialised


def test_meta_model_needs_a_seed(fake_world) -> None:
    model = build("gpt-tiny")
    idx = torch.zeros(4, 16, dtype=torch.long)
    with pytest.raises(autoshard.InputError, match="seed"):
        compile(model, (idx, idx))


@pytest.mark.parametrize("name", ["llama-tiny", "moe-tiny"])
def test_meta_llama_and_moe_materialise_as_their_seeded_cpu_builds(fake_world, name: str) -> None:
    seed = 7
    torch.manual_seed(seed)
    reference = build(name, device="cpu")
    meta = build(name)
    idx = torch.randint(0, meta.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    ir = autoshard.capture(meta, (idx, idx.clone()))
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh={"dp": WORLD}, optimizer="sgd")
    with local_mode():
        compiled = compile(meta, (idx, idx.clone()), plan=plan, optimizer="sgd", lr=0.1, seed=seed)
        state = {k: value(v) for k, v in compiled.full_state_dict().items()}
    for key, want in reference.state_dict().items():
        assert torch.equal(state[key], want), key


def test_gradient_buckets_fill_as_ddps() -> None:
    from autoshard.runtime.grad_sync import bucket_sizes

    mib = 2**20
    assert bucket_sizes([]) == []
    assert bucket_sizes([mib // 2] * 3) == [2, 1]  # the first bucket holds 1 MiB, as DDP's
    assert bucket_sizes([10 * mib] * 6) == [1, 2, 2, 1]  # then 25 MiB; a larger tensor is its own
    assert bucket_sizes([30 * mib, mib]) == [1, 1]
