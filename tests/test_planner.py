"""The planner end to end: Megatron's structure, data vs tensor parallel under memory, hints,
consistency of the plan with the ILP, determinism, persistence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autoshard
from autoshard.cost_model import Cluster
from autoshard.models import build
from autoshard.models.gpt import Block, GPTConfig
from autoshard.solver.planner import plan_on_mesh
from autoshard.solver.search import plan_graph
from autoshard.strategies import MeshSpec, Replicate, Shard

COLUMN = {"(S(0),)", "(SS(0,3),)"}  # SS(0,3): each of q, k, v column-sharded (fused qkv)
ROW = {"(S(1),)"}


def tokens(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return idx, idx.clone()


class HintedBlock(nn.Module):
    """A GPT block; with `replicate_residual`, the residual stream and the norms' outputs are hinted
    replicated: Megatron's original layout, where only attention and MLP interiors are split."""

    def __init__(self, config: GPTConfig, replicate_residual: bool) -> None:
        super().__init__()
        self.block = Block(config)
        self.replicate_residual = replicate_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.attn(self.hint(b.ln_1(x)))
        x = self.hint(x)
        x = x + b.mlp(self.hint(b.ln_2(x)))
        return self.hint(x)

    def hint(self, x: torch.Tensor) -> torch.Tensor:
        return autoshard.shard(x, (1, 1, 1)) if self.replicate_residual else x


def gpt3_block_plan(*, replicate_residual: bool) -> autoshard.Plan:
    config = GPTConfig(n_layer=1, n_head=32, n_embd=4096, block_size=2048, vocab_size=50304)
    with torch.device("meta"):
        model = HintedBlock(config, replicate_residual)
    x = torch.empty(1, 2048, 4096, device="meta")
    return autoshard.plan(model, (x,), "a100-80g:8", mesh={"tp": 8})


def forward_reductions(plan: autoshard.Plan) -> list:
    return [c for c in plan.forward_collectives() if c.collective in ("all_reduce", "reduce_scatter")]


def assert_megatron_matmuls(plan: autoshard.Plan) -> None:
    p = plan.params
    assert p["block.attn.c_attn.weight"] in COLUMN and p["block.mlp.c_fc.weight"] in COLUMN
    assert p["block.attn.c_proj.weight"] in ROW and p["block.mlp.c_proj.weight"] in ROW
    (sdpa,) = [d for d in plan.nodes if d.op == "aten.scaled_dot_product_attention.default"]
    assert sdpa.inputs == ("(S(1),)",) * 3  # (B, heads, T, hs): heads split
    # the row-parallel projections produce partial sums
    for d in plan.nodes:
        if d.op == "aten.linear.default" and d.module.endswith("c_proj"):
            assert d.output == ("(P,)",)


def test_gpt_block_on_tp8_gets_megatron_plan_with_one_reduction_per_sublayer() -> None:
    # The solver's own choice: Megatron's column/row split with sequence parallelism, whose
    # reduce-scatter + all-gather moves the bytes of one all-reduce and also splits the norms.
    plan = gpt3_block_plan(replicate_residual=False)
    assert_megatron_matmuls(plan)
    reductions = forward_reductions(plan)
    assert len(reductions) == 2  # one after attention, one after the MLP
    for c in reductions:
        assert plan.decision(c.src).output == ("(P,)",)  # what is reduced is a row-parallel sum
        assert c.axis == "tp" and c.full_bytes == 2048 * 4096 * 2  # bf16 activations (default on GPUs)


def test_gpt_block_with_replicated_residual_is_classic_megatron() -> None:
    plan = gpt3_block_plan(replicate_residual=True)
    assert_megatron_matmuls(plan)
    fwd = plan.forward_collectives()
    assert [c.collective for c in fwd] == ["all_reduce", "all_reduce"]
    free = gpt3_block_plan(replicate_residual=False)
    # the hint can only constrain: the free plan is never predicted slower
    assert free.predicted.step_time_s <= plan.predicted.step_time_s * (1 + 1e-9)


@pytest.fixture(scope="module")
def small_gpt() -> autoshard.GraphIR:
    return autoshard.capture(build("gpt-small-test", device="meta"), tokens(32, 64))


def test_data_parallel_wins_for_a_small_model_that_fits(small_gpt: autoshard.GraphIR) -> None:
    plan = plan_graph(small_gpt, "a100-80g:8")
    assert plan.mesh == {"dp": 8}
    assert set(plan.params.values()) == {"(R,)"}
    assert "dp: batch" in plan.report()  # the axis splits the batch
    assert plan.alternatives and all("slower" in a["reason"] for a in plan.alternatives)


def test_memory_limit_below_the_replicated_states_shards_them(small_gpt: autoshard.GraphIR) -> None:
    roomy = plan_graph(small_gpt, "a100-80g:8")
    p = roomy.predicted
    unsharded_optimizer = p.optimizer_bytes * (roomy.axis_size("dp") if roomy.training.zero_stage >= 1 else 1)
    replicated = p.parameters_bytes + p.gradients_bytes + unsharded_optimizer
    limit = 0.9 * replicated  # replicated states alone no longer fit: recomputation cannot help
    tight = plan_graph(small_gpt, "a100-80g:8", memory_limit=limit)
    t = tight.predicted
    assert t.peak_memory_bytes <= limit
    assert t.parameters_bytes + t.gradients_bytes + t.optimizer_bytes < replicated
    assert t.step_time_s >= p.step_time_s * (1 - 1e-9)


def test_tensor_parallel_when_the_batch_cannot_be_split() -> None:
    # one sequence: data parallelism has nothing to split, so the layers themselves are split
    ir = autoshard.capture(build("gpt2-medium", device="meta", n_layer=4), tokens(1, 256))
    plan = plan_graph(ir, "a100-80g:8")
    assert plan.params["transformer.h.0.attn.c_attn.weight"] in COLUMN
    assert "S(0)" in plan.params["transformer.h.0.mlp.c_fc.weight"]
    assert "S(1)" in plan.params["transformer.h.0.mlp.c_proj.weight"]


def test_nothing_fits_says_the_smallest_memory_that_would(small_gpt: autoshard.GraphIR) -> None:
    with pytest.raises(autoshard.NoFeasiblePlan, match="smallest memory per device that would fit") as info:
        plan_graph(small_gpt, "a100-80g:8", memory_limit=1e3)
    assert info.value.minimum_memory > 1e3


@settings(max_examples=6, deadline=None)
@given(st.lists(st.floats(min_value=0.2, max_value=3.0), min_size=2, max_size=3))
def test_more_memory_never_slower_and_peak_within_limit(fractions: list[float]) -> None:
    ir = _tiny_ir()
    cluster = Cluster.parse("a100-80g:4")
    base = plan_on_mesh(ir, cluster, MeshSpec.of({"dp": 2, "tp": 2}))
    times = []
    for f in sorted(fractions):
        limit = base.predicted.peak_memory_bytes * f
        try:
            p = plan_on_mesh(ir, cluster, MeshSpec.of({"dp": 2, "tp": 2}), memory_limit=limit)
        except autoshard.NoFeasiblePlan:
            times.append(math.inf)
            continue
        assert p.predicted.peak_memory_bytes <= limit * (1 + 1e-9)
        times.append(p.predicted.step_time_s)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(times, times[1:]))


_TINY: list[autoshard.GraphIR] = []


def _tiny_ir() -> autoshard.GraphIR:
    if not _TINY:
        _TINY.append(autoshard.capture(build("gpt-tiny", device="meta"), tokens(8, 32)))
    return _TINY[0]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "moe-tiny"])
def test_plan_totals_equal_the_ilp_objective_and_folding_is_exact(name: str) -> None:
    ir = autoshard.capture(build(name, device="meta"), tokens(8, 32))
    cluster = Cluster.parse("cpu:4")
    mesh = MeshSpec.of({"dp": 2, "tp": 2})
    folded = plan_on_mesh(ir, cluster, mesh)
    # two computations of one number: the ILP's objective and the sum over the expanded plan
    assert folded.predicted.step_time_s == pytest.approx(folded.solver.objective_s, rel=1e-9)
    flat = plan_on_mesh(ir, cluster, mesh, fold=False)
    assert flat.solver.folded_blocks == {}
    # identical blocks: making them choose alike costs nothing
    assert folded.predicted.step_time_s == pytest.approx(flat.predicted.step_time_s, rel=1e-6)


def test_a_limit_spent_on_building_the_problem_still_returns_a_plan_with_its_gap() -> None:
    """time_limit_s bounds the whole plan: with 0 s, construction uses it all, HiGHS never runs, and the
    plan is the reductions' incumbent with its gap to a lower bound (no better than the solved plan)."""
    cluster, mesh = Cluster.parse("cpu:4"), MeshSpec.of({"dp": 2, "tp": 2})
    quick = plan_on_mesh(_tiny_ir(), cluster, mesh, time_limit_s=0.0)
    solved = plan_on_mesh(_tiny_ir(), cluster, mesh, time_limit_s=math.inf)
    assert solved.solver.status == "optimal"
    assert quick.predicted.step_time_s == pytest.approx(quick.solver.objective_s, rel=1e-9)
    assert quick.solver.objective_s >= solved.solver.objective_s * (1 - 1e-9)
    assert quick.solver.status == "feasible" and 0 < quick.solver.gap <= 1
    # the gap's bound is below the optimum
    assert quick.solver.objective_s * (1 - quick.solver.gap) <= solved.solver.objective_s * (1 + 1e-9)


def test_same_input_gives_the_same_plan() -> None:
    a = plan_on_mesh(_tiny_ir(), Cluster.parse("cpu:4"), MeshSpec.of({"dp": 2, "tp": 2}))
    b = plan_on_mesh(_tiny_ir(), Cluster.parse("cpu:4"), MeshSpec.of({"dp": 2, "tp": 2}))
    assert [(d.node, d.output, d.inputs) for d in a.nodes] == [(d.node, d.output, d.inputs) for d in b.nodes]
    assert a.params == b.params


class HintedMLP(nn.Module):
    def __init__(self, spec: object) -> None:
        super().__init__()
        self.up, self.down, self.spec = nn.Linear(64, 256), nn.Linear(256, 64), spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = autoshard.shard(torch.relu(self.up(x)), self.spec)
        return self.down(h).sum()


@pytest.mark.parametrize(
    ("spec", "axes"),
    [
        (("dp", None, "tp"), (("dp",), (), ("tp",))),
        ((1, 1, 4), None),  # split counts: the solver picks which axes make 4 ways
        ((2, 1, 1), None),
    ],
)
def test_hints_are_honoured(spec: object, axes: object) -> None:
    model = HintedMLP(spec)
    x = torch.empty(8, 16, 64, device="meta")
    model.to("meta")
    plan = autoshard.plan(model, (x,), "cpu:4", mesh={"dp": 2, "tp": 2})
    (hinted,) = [d for d in plan.nodes if d.op == "autoshard.shard.default"]
    placement = hinted.output[0]
    assert "P" not in placement
    if axes is not None:
        assert placement == "(S(0), S(2))"
    else:
        counts = [1, 1, 1]
        for p in placement.strip("()").split(", "):
            if p.startswith("S("):
                counts[int(p[2])] *= 2
        assert tuple(counts) == spec


def test_impossible_hints_are_refused_with_what_was_expected() -> None:
    x = torch.empty(8, 16, 64, device="meta")
    with pytest.raises(autoshard.InputError, match="cannot be split 3 ways"):
        autoshard.capture(HintedMLP((3, 1, 1)).to("meta"), (x,))
    with pytest.raises(autoshard.InputError, match="8"):
        autoshard.plan(HintedMLP((8, 1, 1)).to("meta"), (x,), "cpu:4", mesh={"dp": 2, "tp": 2})


def test_plan_summary_report_save_and_load(tmp_path, small_gpt: autoshard.GraphIR) -> None:
    plan = plan_graph(small_gpt, "a100-80g:8", mesh={"dp": 4, "tp": 2})
    s = plan.summary()
    for key in ("mesh", "dp", "tp", "step_time_s", "peak_memory_bytes", "comm_bytes", "solver"):
        assert key in s
    assert s["dp"] == 4 and s["tp"] == 2 and s["solver"]["status"] in ("optimal", "feasible")
    report = plan.report()
    assert "transformer.h.*.attn.c_attn" in report and "total" in report
    # the project's GPT: F.cross_entropy's default mean over labels != -100 (capture/loss_reduction.py)
    assert "loss: token mean: cross_entropy_loss (mean over targets != -100)" in report
    path = plan.save(tmp_path / "plan.json")
    again = autoshard.Plan.load(path, graph=small_gpt)
    assert again == plan
    json.loads(path.read_text())  # plain JSON
    other = autoshard.capture(build("gpt-tiny", device="meta"), tokens(8, 32))
    with pytest.raises(autoshard.InputError, match="fingerprint"):
        autoshard.Plan.load(path, graph=other)


def test_manual_megatron_strategy_is_priced_by_the_same_model(small_gpt: autoshard.GraphIR) -> None:
    megatron = {
        "*.attn.c_attn.weight": (Replicate(), Shard(0)),
        "*.attn.c_attn.bias": (Replicate(), Shard(0)),
        "*.mlp.c_fc.weight": (Replicate(), Shard(0)),
        "*.mlp.c_fc.bias": (Replicate(), Shard(0)),
        "*.attn.c_proj.weight": (Replicate(), Shard(1)),
        "*.mlp.c_proj.weight": (Replicate(), Shard(1)),
    }
    manual = plan_graph(small_gpt, "a100-80g:8", mesh={"dp": 4, "tp": 2}, param_placements=megatron)
    assert manual.params["transformer.h.0.mlp.c_fc.weight"] == "(R, S(0))"
    free = plan_graph(small_gpt, "a100-80g:8", mesh={"dp": 4, "tp": 2})
    assert free.predicted.step_time_s <= manual.predicted.step_time_s * (1 + 1e-9)
    with pytest.raises(autoshard.InputError, match="cannot take placement"):
        plan_graph(small_gpt, "a100-80g:8", mesh={"dp": 4, "tp": 2}, param_placements={"*.ln_1.weight": (Shard(1), Shard(0))})


def test_bad_mesh_is_refused(small_gpt: autoshard.GraphIR) -> None:
    with pytest.raises(autoshard.InputError, match="has 6 devices; the cluster"):
        plan_graph(small_gpt, "a100-80g:8", mesh={"dp": 3, "tp": 2})
    with pytest.raises(autoshard.InputError, match="unknown mesh axes"):
        plan_graph(small_gpt, "a100-80g:8", mesh={"data": 8})


@autoshard.shardable
class ShardableMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))).sum()


def test_module_hints_in_mindspore_style_are_honoured() -> None:
    model = ShardableMLP().to("meta")
    # MindSpore Cell.shard: the input of `down` is split 4 ways along its last dim (row-parallel)
    model.down.shard(in_strategy=((1, 1, 4),))
    x = torch.empty(8, 16, 64, device="meta")
    plan = autoshard.plan(model, (x,), "cpu:4", mesh={"tp": 4})
    (hinted,) = [d for d in plan.nodes if d.op == "autoshard.shard.default"]
    assert hinted.output == ("(S(2),)",)
    assert plan.params["down.weight"] == "(S(1),)"  # the only way to consume that input without a gather


def test_a_data_parallel_axis_reads_every_parameter_whole() -> None:
    # with ZeRO decided outside the ILP (dp_params), the dp axis is data parallelism as the step search
    # priced it. At one sequence per replica on a CPU cluster the free ILP turns dp into a tensor-
    # parallel axis for the MLPs (weights read as S(0)/S(1) over dp); the planner must not
    from autoshard.strategies.mesh import spec_from_str

    model = build("gpt-small-test", device="meta", n_layer=2, n_embd=256, n_head=8, vocab_size=512, block_size=128)
    ir = autoshard.capture(model, tokens(2, 128))
    params = {n for p in ir.params for n in p.nodes}
    mesh, cluster = MeshSpec.of({"dp": 2}), Cluster.parse("cpu:2")

    def weights_split_over_dp(plan) -> list[str]:
        split = []
        for d in plan.nodes:
            node = next(n for n in ir.exported.graph.nodes if n.name == d.node)
            for src, spec in zip(node.all_input_nodes, d.inputs):
                if src.name in params and spec is not None and not spec_from_str(spec)[0].is_replicate():
                    split.append(f"{d.node} reads {src.name} as {spec}")
        return split

    assert weights_split_over_dp(plan_on_mesh(ir, cluster, mesh)), "the free ILP no longer splits weights here"
    assert weights_split_over_dp(plan_on_mesh(ir, cluster, mesh, dp_params="replicate")) == []
