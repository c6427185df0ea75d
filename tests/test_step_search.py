"""The step model (solver/training.py) and the outer search (solver/step_search.py).

Closed-form cases are checked against figures worked out by hand from the schedules' definitions
(Narayanan et al. 2021; Rajbhandari et al. 2020), the stage split against brute force, and the search
on real captured models against the behaviour the issue asks for: under memory pressure it turns on
ZeRO, recomputation or pipelining, and when nothing fits it names the smallest memory that would.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard

import autoshard
from autoshard.cost_model import Cluster
from autoshard.ir.plan import Plan
from autoshard.models import build
from autoshard.solver.training import Chain, Unit, estimate_step, split_blocks
from autoshard.strategies.mesh import spec_from_str


def chain(block_seconds, *, pre=0.0, post=0.0, act=100.0, cheap=40.0, inp=10.0, params=1000.0, out=0.0) -> Chain:
    blocks = tuple(
        Unit(name=f"h.{i}", compute_s=t, forward_s=t / 3, flops=1e9, activation_bytes=act,
             matmul_output_bytes=act - cheap,
             cheap_forward_s=t / 30, input_bytes=inp, output_bytes=out, param_elements=params)
        for i, t in enumerate(block_seconds)
    )
    return Chain(
        pre=Unit(name="prologue", compute_s=pre, output_bytes=out),
        blocks=blocks,
        post=Unit(name="epilogue", compute_s=post, input_bytes=inp),
        shared_params=0.0,
        param_bytes=4,
        tokens=128,
        precision="fp32",
        optimizer="adamw",
    )


def cpu(n: int) -> Cluster:
    return Cluster.parse(f"cpu:{n}")


# ---- stage split -------------------------------------------------------------------------------------


def brute_force_bottleneck(c: Chain, stages: int) -> float:
    times = [b.compute_s for b in c.blocks]
    best = math.inf
    for cuts in itertools.combinations(range(1, len(times)), stages - 1):
        bounds = (0, *cuts, len(times))
        worst = 0.0
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            t = sum(times[a:b]) + (c.pre.compute_s if s == 0 else 0) + (c.post.compute_s if s == stages - 1 else 0)
            worst = max(worst, t)
        best = min(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.1, max_value=5.0), min_size=2, max_size=9),
    st.floats(min_value=0.0, max_value=6.0),
    st.floats(min_value=0.0, max_value=6.0),
    st.data(),
)
def test_stage_split_is_as_balanced_as_brute_force(times, pre, post, data) -> None:
    c = chain(times, pre=pre, post=post)
    stages = data.draw(st.integers(min_value=1, max_value=len(times)))
    split = split_blocks(c, stages, ("none",) * len(times))
    assert len(split) == stages and sum(split) == len(times) and min(split) >= 1
    bounds = [sum(split[:k]) for k in range(stages + 1)]
    worst = max(
        sum(times[a:b]) + (pre if s == 0 else 0) + (post if s == stages - 1 else 0)
        for s, (a, b) in enumerate(zip(bounds, bounds[1:]))
    )
    assert worst == pytest.approx(brute_force_bottleneck(c, stages), rel=1e-6)


# ---- schedules, ZeRO and recomputation in closed form -------------------------------------------------


def test_pipeline_time_and_bubble_follow_the_schedules() -> None:
    c = chain([1.0] * 4)  # four blocks of 1 s per micro-batch, nothing else
    one_f_one_b = estimate_step(c, cpu(2), dp=1, tp=1, pp=2, micro_batches=4, schedule="1f1b")
    assert one_f_one_b.stages == (2, 2)
    assert one_f_one_b.pipeline_s == pytest.approx((4 + 1) * 2.0)  # (m + p - 1) * t_stage
    assert one_f_one_b.bubble_fraction == pytest.approx(1 / 5)
    interleaved = estimate_step(c, cpu(2), dp=1, tp=1, pp=2, micro_batches=4, schedule="interleaved-1f1b",
                                virtual_stages=2)
    assert interleaved.stages == (1, 1, 1, 1)
    assert interleaved.pipeline_s == pytest.approx((4 + 1 / 2) * 2.0)  # bubble shrinks by v
    assert interleaved.bubble_fraction == pytest.approx(0.5 / 4.5)
    single = estimate_step(c, cpu(1), dp=1, tp=1, pp=1, micro_batches=4, schedule="none")
    assert single.pipeline_s == pytest.approx(4 * 4.0) and single.bubble_fraction == 0


def test_activations_in_flight_per_schedule() -> None:
    c = chain([1.0] * 4, act=100.0)
    gpipe = estimate_step(c, cpu(2), dp=1, tp=1, pp=2, micro_batches=4, schedule="gpipe")
    assert [m.activations for m in gpipe.memory] == [4 * 200.0, 4 * 200.0]  # every micro-batch held
    one_f_one_b = estimate_step(c, cpu(2), dp=1, tp=1, pp=2, micro_batches=4, schedule="1f1b")
    assert [m.activations for m in one_f_one_b.memory] == [2 * 200.0, 1 * 200.0]  # pp - rank
    interleaved = estimate_step(c, cpu(2), dp=1, tp=1, pp=2, micro_batches=4, schedule="interleaved-1f1b",
                                virtual_stages=2)
    # rank 0: 2 (p - 1) + (v - 1) p + 1 = 5 chunk passes of half its 200 B
    assert interleaved.memory[0].activations == pytest.approx(5 * 100.0)


def test_zero_stages_divide_the_states_they_shard() -> None:
    c = chain([1.0] * 2, params=1000.0)  # 2000 fp32 elements, AdamW: 4 + 4 + 8 bytes each
    e = {z: estimate_step(c, cpu(4), dp=4, tp=1, pp=1, micro_batches=1, schedule="none", zero_stage=z).memory[0]
         for z in range(4)}
    assert (e[0].parameters, e[0].gradients, e[0].optimizer_state) == (8000, 8000, 16000)
    assert (e[1].parameters, e[1].gradients, e[1].optimizer_state) == (8000, 8000, 4000)
    assert (e[2].parameters, e[2].gradients, e[2].optimizer_state) == (8000, 2000, 4000)
    # ZeRO-3: a quarter of everything, plus two blocks' parameters gathered at a time
    assert (e[3].parameters, e[3].gradients, e[3].optimizer_state) == (2000 + 2 * 4000, 2000, 4000)


def test_recomputation_trades_time_for_activations() -> None:
    c = chain([3.0] * 2, act=100.0, cheap=40.0, inp=10.0)
    runs = {mode: estimate_step(c, cpu(1), dp=1, tp=1, pp=1, micro_batches=1, schedule="none",
                                recompute=(mode,) * 2) for mode in ("none", "selective", "full")}
    assert runs["none"].memory[0].activations == 200.0
    # selective keeps the matmul outputs and the input of both blocks; one block's cheap outputs live
    # again in backward
    assert runs["selective"].memory[0].activations == 2 * (60.0 + 10.0) + 30.0
    # full keeps each block's input; one block is rematerialised at a time
    assert runs["full"].memory[0].activations == 2 * 10.0 + 90.0
    assert runs["none"].pipeline_s == pytest.approx(6.0)
    assert runs["selective"].pipeline_s == pytest.approx(6.0 + 2 * 0.1)
    assert runs["full"].pipeline_s == pytest.approx(6.0 + 2 * 1.0)  # one more forward per block
    assert runs["full"].hardware_flops == runs["none"].hardware_flops + 2 * 1e9


# ---- the search on captured models --------------------------------------------------------------------


def tokens(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return idx, idx


@pytest.fixture(scope="module")
def small_gpt() -> autoshard.GraphIR:
    return autoshard.capture(build("gpt-small-test", device="meta"), tokens(16, 64))


def test_search_plan_is_consistent_and_round_trips(small_gpt, tmp_path) -> None:
    plan = autoshard.plan_graph(small_gpt, "a100-80g:8", mesh={"pp": 2, "dp": 2, "tp": 2}, schedule="1f1b")
    t = plan.training
    assert (t.pp, t.schedule) == (2, "1f1b") and plan.mesh == {"pp": 2, "dp": 2, "tp": 2}
    assert sum(t.stages) == len(t.blocks) == build("gpt-small-test").config.n_layer
    assert t.micro_batch_size * t.num_micro_batches * 2 == 16
    s = plan.summary()
    for key in ("pp", "stages", "schedule", "micro_batch_size", "num_micro_batches", "zero_stage", "recompute",
                "bubble_fraction", "tokens_per_s", "tflops_per_device", "mfu"):
        assert key in s
    assert s["tokens_per_s"] == pytest.approx(16 * 64 / plan.predicted.step_time_s)
    assert 0 < s["mfu"] < 1 and len(s["stage_memory"]) == 2
    # node placements are written on the operator mesh (dp, tp); parameters replicated over dp
    assert plan.operator_mesh == {"dp": 2, "tp": 2}
    assert all(len(spec_from_str(v)) == 2 for v in plan.params.values())
    if t.zero_stage < 3:
        assert all(spec_from_str(v)[0].is_replicate() for v in plan.params.values())
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.training == t and loaded.predicted == plan.predicted


def test_memory_pressure_turns_on_zero_recompute_or_pipelining(small_gpt) -> None:
    roomy = autoshard.plan_graph(small_gpt, "a100-80g:8")
    t = roomy.training
    # nothing that costs time when it fits (ZeRO-1 costs none: the same bytes as an all-reduce, and each
    # rank updates only its shard)
    assert (t.pp, set(t.recompute)) == (1, {"none"}) and t.zero_stage <= 1
    limit = roomy.predicted.peak_memory_bytes * 0.5
    tight = autoshard.plan_graph(small_gpt, "a100-80g:8", memory_limit=limit)
    assert tight.predicted.peak_memory_bytes <= limit
    tt = tight.training
    assert (tt.zero_stage > t.zero_stage or tt.pp > 1 or set(tt.recompute) != {"none"}
            or tight.axis_size("tp") > roomy.axis_size("tp"))
    assert tight.predicted.step_time_s >= roomy.predicted.step_time_s * (1 - 1e-9)


def test_nothing_fits_names_the_exact_smallest_memory(small_gpt) -> None:
    with pytest.raises(autoshard.NoFeasiblePlan, match="smallest memory per device that would fit") as info:
        autoshard.plan_graph(small_gpt, "a100-80g:8", memory_limit=1e5)
    smallest = info.value.minimum_memory
    plan = autoshard.plan_graph(small_gpt, "a100-80g:8", memory_limit=smallest * (1 + 1e-9))
    assert plan.predicted.peak_memory_bytes <= smallest * (1 + 1e-9)


def test_pinned_decisions_are_honoured(small_gpt) -> None:
    plan = autoshard.plan_graph(small_gpt, "a100-80g:8", zero_stage=3, recompute="full", micro_batch_size=1)
    t = plan.training
    assert (t.zero_stage, set(t.recompute), t.micro_batch_size) == (3, {"full"}, 1)
    if plan.axis_size("dp") > 1:  # ZeRO-3: parameters stored split over dp
        assert any(not spec_from_str(v)[0].is_replicate() for v in plan.params.values())
    with pytest.raises(autoshard.errors.InputError, match="schedule"):
        autoshard.plan_graph(small_gpt, "a100-80g:8", schedule="zigzag")


def test_progress_is_reported(small_gpt) -> None:
    lines: list[str] = []
    autoshard.plan_graph(small_gpt, "a100-80g:8", mesh={"pp": 2, "dp": 4}, progress=lines.append)
    assert any("priced" in line for line in lines) and any("best:" in line for line in lines)


@pytest.mark.slow
def test_gpt3_175b_on_1024_a100s_lies_where_practitioners_work() -> None:
    """128 nodes x 8 A100-80GB, global batch 1536 x 2048: the search over mesh, schedule, ZeRO and
    recomputation at micro-batch 1 (Megatron's for 175B; each further size costs a capture of 96 layers).
    The search over micro-batch sizes too, and its timing, are benchmarks/plan_gpt3_175b.py (it picks 1)."""
    plan = autoshard.plan(build("gpt3-175b"), tokens(1536, 2048), "a100-80g:128x8", micro_batch_size=1)
    s = plan.summary()
    assert s["tp"] in (4, 8)  # tensor parallel inside a node
    assert s["pp"] > 1 and list(plan.mesh)[0] == "pp"  # pipeline across nodes (outermost axis)
    assert s["dp"] * s["tp"] * s["pp"] == 1024
    assert s["micro_batch_size"] * s["num_micro_batches"] * s["dp"] == 1536
    assert s["peak_memory_bytes"] <= 80e9
    assert 0.3 < s["mfu"] < 0.75  # published runs reach 44-52% of peak


# ---- step hints ----------------------------------------------------------------------------------------


def test_pipeline_stage_and_recompute_hints_are_honoured() -> None:
    model = build("gpt-small-test", device="meta")
    n = model.config.n_layer
    autoshard.pipeline_stage(model.transformer.h[n // 2 + 1], 1)  # stage 1 starts after the middle
    model.transformer.h[0].pipeline_stage = 0  # the plain attribute works as well
    autoshard.recompute(model.transformer.h[1], "selective")
    plan = autoshard.plan(model, tokens(16, 64), "a100-80g:8")
    t = plan.training
    assert t.pp == 2 and t.stages == (n // 2 + 1, n - n // 2 - 1)
    assert t.recompute[1] == "selective"


def test_step_hints_inside_a_block_or_going_backwards_are_refused() -> None:
    model = build("gpt-small-test", device="meta")
    autoshard.recompute(model.transformer.h[0].attn)
    with pytest.raises(autoshard.InputError, match="inside block transformer.h.0"):
        autoshard.plan(model, tokens(16, 64), "a100-80g:8")
    model = build("gpt-small-test", device="meta")
    autoshard.pipeline_stage(model.transformer.h[0], 1)
    autoshard.pipeline_stage(model.transformer.h[1], 0)
    with pytest.raises(autoshard.InputError, match="backwards"):
        autoshard.plan(model, tokens(16, 64), "a100-80g:8")


# ---- micro-batch sizes the model cannot run; batches smaller than dp ---------------------------------


class NeedsTwo(torch.nn.Module):
    """A model that refuses a batch of one (as train-mode BatchNorm on a 1x1 map does, HF ResNet's last
    stage; BatchNorm itself is kept to one micro-batch by the search, so it cannot show this)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise ValueError("Expected more than 1 value per channel when training (needs two rows)")
        return self.fc(x).square().mean()


def test_a_micro_batch_size_the_model_cannot_capture_is_skipped_with_its_reason(caplog) -> None:
    with torch.device("meta"):
        model = NeedsTwo()
    with caplog.at_level("WARNING", logger="autoshard.solver.step_search"):
        plan = autoshard.plan(model, (torch.zeros(4, 8, device="meta"),), cpu(2))
    assert plan.training.micro_batch_size >= 2
    reasons = [a["reason"] for a in plan.alternatives if a["config"].endswith("mbs1")]
    assert reasons and all("cannot be captured at batch 1" in r and "needs two rows" in r for r in reasons)
    assert "skipping micro-batch size 1" in caplog.text


def test_no_capturable_micro_batch_size_lists_the_reasons() -> None:
    with torch.device("meta"):
        model = NeedsTwo()
    with pytest.raises(autoshard.NoFeasiblePlan, match="every .* failed: .*mbs1: the model cannot be captured at batch 1"):
        autoshard.plan(model, (torch.zeros(2, 8, device="meta"),), cpu(2), micro_batch_size=1)


def test_a_batch_smaller_than_dp_plans_without_that_dp() -> None:
    ir = autoshard.capture(build("gpt-tiny", device="meta"), tokens(2, 16))
    plan = autoshard.plan_graph(ir, cpu(4))
    assert plan.axis_size("dp") in (1, 2) and plan.training.micro_batch_size >= 1
    assert not any("dp4" in a["config"] for a in plan.alternatives)  # never considered, not even as a loser


@pytest.mark.parametrize("mesh", [{"dp": 4}, {"dp": 4, "pp": 1}])
def test_a_pinned_dp_that_does_not_divide_the_batch_is_refused(mesh) -> None:
    ir = autoshard.capture(build("gpt-tiny", device="meta"), tokens(2, 16))
    with pytest.raises(autoshard.InputError, match=r"dp=4, which does not divide the example batch of 2 .* among \[1, 2\]"):
        autoshard.plan_graph(ir, cpu(4), mesh=mesh)


def test_forced_parameter_placements_reach_the_final_plan_of_a_searched_step() -> None:
    """A manual strategy given with a step decision pinned (so the step search runs) is in the plan
    that comes out: the final dp x tp operator plan once solved without it (a dropped hint)."""
    model = build("gpt-tiny", device="meta")
    forced = {"*.mlp.c_fc.weight": (Replicate(), Shard(0)), "*.mlp.c_proj.weight": (Replicate(), Shard(1))}
    plan = autoshard.plan(model, tokens(8, 16), "cpu:4", mesh={"dp": 2, "tp": 2}, zero_stage=0, param_placements=forced)
    assert dict(plan.mesh) == {"dp": 2, "tp": 2}
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert plan.params[name] == "(R, S(0))", plan.params
    assert plan.params["transformer.h.0.mlp.c_proj.weight"] == "(R, S(1))"


def test_the_winners_operator_plan_keeps_the_tp_placements_the_search_priced(small_gpt) -> None:
    # the search prices configurations from replica plans solved on tp alone; the winner's plan on
    # dp x tp keeps each node's tp placements from it (solver/axis_choices.py), leaving the dp axis to
    # the ILP. Checked against the replica plan solved here, and against the unrestricted ILP, which a
    # restriction can never beat
    from autoshard.solver.axis_choices import AxisChoices
    from autoshard.solver.planner import plan_on_mesh
    from autoshard.strategies import MeshSpec
    from autoshard.strategies.mesh import spec_str

    cluster = Cluster.parse("a100-80g:4")
    # a replica plan the free ILP on dp x tp would not choose: every weight replicated on tp
    replica = plan_on_mesh(small_gpt.recapture(8), Cluster.parse("a100-80g:2"), MeshSpec.of({"tp": 2}),
                           param_placements={"*": (Replicate(),)})
    keep = AxisChoices.of(replica, "tp")
    mesh = MeshSpec.of({"dp": 2, "tp": 2})
    kept = plan_on_mesh(small_gpt, cluster, mesh, dp_params="replicate", keep=keep)
    free = plan_on_mesh(small_gpt, cluster, mesh, dp_params="replicate")
    decided = {d.node: d.output for d in replica.nodes}

    def on_tp(plan: Plan) -> dict[str, tuple]:
        return {d.node: tuple(None if o is None else spec_str((spec_from_str(o)[1],)) for o in d.output)
                for d in plan.nodes}

    assert on_tp(kept) == decided
    assert on_tp(free) != decided  # the restriction decided something
    assert kept.solver.objective_s >= free.solver.objective_s * (1 - 1e-9)
    with pytest.raises(ValueError, match="single axis"):
        AxisChoices.of(kept, "tp")
