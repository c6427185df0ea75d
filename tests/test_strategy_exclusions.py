"""The table of DTensor sharding rules found wrong (autoshard/strategies/exclusions.py).

- every rule still describes a wrong rule on the installed torch: its excluded options, run through
  DTensor on the simulated world, still give wrong values or gradients (or raise) -- so a torch upgrade
  that fixes one fails here and the rule is revisited;
- the options autoshard offers no longer contain them (mse_loss under {"dp": 4}: no sharded input);
- the planner, on an MLP trained with F.mse_loss, no longer feeds the loss a sharded batch;
- docs/architecture.md holds exactly the current table.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

import autoshard
import dtensor_sim as sim
from autoshard.strategies import MeshSpec, ShardingOption, clear_option_cache, exclusions, node_options
from autoshard.strategies._dtensor import reset_caches

aten = torch.ops.aten
MESHES = ({"dp": 4}, {"dp": 2, "tp": 2})
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


class _Residual(torch.nn.Module):
    """`h += x` after a Linear, as HF ResNet writes its residual: exports to aten.add_.Tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h += x
        return h


def _export(name: str, model: torch.nn.Module, *args: torch.Tensor) -> sim.Captured:
    ep = torch.export.export(model, args, strict=False)
    return sim.capture_values(name, ep, list(ep._graph_module_flat_inputs(args, {})))

# A small graph holding each rule's op, to run the rule's excluded options on.
WITNESSES: dict[object, Callable[[], sim.Captured]] = {
    aten.mse_loss.default: sim.capture_mse_mlp,
    aten.cross_entropy_loss.default: lambda: sim.capture_zoo("gpt2"),  # right-padded rows: -100 labels
    aten.add_.Tensor: lambda: _export("residual", _Residual(), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))),
}


@pytest.fixture
def without_exclusions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DTensor's options as they come, the table disabled (and the option cache cleared both ways)."""
    monkeypatch.setattr(exclusions, "RULES", ())
    clear_option_cache()
    yield
    monkeypatch.undo()
    clear_option_cache()


@pytest.fixture(scope="module")
def fake_world() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=sim.WORLD)
    yield
    dist.destroy_process_group()
    reset_caches()


def _node(cap: sim.Captured, op: object) -> torch.fx.Node:
    return next(n for n in cap.ep.graph.nodes if n.target is op)


@pytest.mark.slow
@pytest.mark.parametrize("rule", exclusions.RULES, ids=lambda r: str(r.op))
def test_each_excluded_option_is_still_wrong_on_this_torch(
    fake_world: None, without_exclusions: None, rule: exclusions.ExclusionRule
) -> None:
    assert rule.op in WITNESSES, f"rule for {rule.op} has no witness graph in WITNESSES"
    cap = WITNESSES[rule.op]()
    node = _node(cap, rule.op)
    excluded = 0
    for mesh_dict in MESHES:
        spec_mesh = MeshSpec.of(mesh_dict)
        mesh = init_device_mesh("cpu", spec_mesh.sizes, mesh_dim_names=spec_mesh.names)
        for opt in node_options(node, spec_mesh):
            if not rule.excludes(rule.op, opt, spec_mesh):
                continue
            excluded += 1
            try:
                problem = sim.backward_problem(node, opt, cap, mesh, spec_mesh)
            except Exception as exc:  # noqa: BLE001 - DTensor refusing to run it is the wrongness of some rules
                problem = f"raised {type(exc).__name__}"
            assert problem is not None, f"{spec_mesh} {opt} is right on torch {torch.__version__}: revisit {rule.op}"
    assert excluded, f"the rule for {rule.op} excludes none of its witness's options"


def test_mse_loss_under_dp4_is_offered_no_sharded_input() -> None:
    cap = sim.capture_mse_mlp()
    opts = node_options(_node(cap, aten.mse_loss.default), MeshSpec.of({"dp": 4}))
    assert opts, "mse_loss must keep an option (the replicated one)"
    sharded = [o for o in opts if any(isinstance(p, Shard) for s in o.inputs if s for p in s)]
    assert not sharded, [str(o) for o in sharded]


def test_no_offered_option_matches_a_rule() -> None:
    for rule in exclusions.RULES:
        node = _node(WITNESSES[rule.op](), rule.op)
        for mesh_dict in MESHES:
            spec_mesh = MeshSpec.of(mesh_dict)
            offered: list[ShardingOption] = node_options(node, spec_mesh)
            assert not [str(o) for o in offered if rule.excludes(rule.op, o, spec_mesh)]


def _mse_loss_inputs(plan: autoshard.Plan) -> tuple[str | None, ...]:
    decision = next(d for d in plan.nodes if d.op.startswith("aten.mse_loss"))
    return decision.inputs


def test_planner_feeds_mse_loss_no_sharded_batch_on_dp4() -> None:
    """A mean mse_loss inside a larger loss (a loss that is mse_loss alone becomes its sum, which DTensor
    shards right: capture/loss_reduction.py) is fed no batch-sharded input."""
    x, y = sim.mse_batch(rows=64)
    plan = autoshard.plan(sim.MsePlusPenalty(), (x, y), "cpu:4", mesh={"dp": 4})
    inputs = _mse_loss_inputs(plan)
    assert inputs and all(s is not None and "S(" not in s for s in inputs), inputs


def test_without_the_table_the_planner_would_shard_the_mse_batch(without_exclusions: None) -> None:
    """Control for the test above: the batch-sharded mse_loss is what the planner picks when offered."""
    x, y = sim.mse_batch(rows=64)
    plan = autoshard.plan(sim.MsePlusPenalty(), (x, y), "cpu:4", mesh={"dp": 4})
    assert any(s is not None and "S(0)" in s for s in _mse_loss_inputs(plan)), _mse_loss_inputs(plan)


def test_docs_hold_the_current_rule_table() -> None:
    text = DOCS.read_text()
    heading = "## Sharding rules found wrong\n"
    assert heading in text, f"docs/architecture.md lacks the heading {heading.strip()!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == exclusions.rule_table_markdown(), "paste exclusions.rule_table_markdown() into the docs"
