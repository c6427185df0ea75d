"""Sharding hints: spec parsing and checks, the autoshard::shard op through export, autograd and DTensor,
module hints with MindSpore Cell.shard semantics, @shardable, and every refusal."""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections import namedtuple
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import autoshard.hints as hints
from autoshard.errors import InputError
from autoshard.hints import DimSpec, TensorHint, parse_spec


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def shard_nodes(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if hints.is_shard_node(n)]


class Hinted(nn.Module):
    """A linear layer whose input is hinted inside forward."""

    def __init__(self, spec: object = (4, 1)) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(hints.shard(x, self.spec)).relu()


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, scale: float, y: torch.Tensor) -> torch.Tensor:
        return x * scale + y


# --- spec: parsing, text and JSON forms ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ((4, 1), "(4, 1)"),
        ([2, 2], "(2, 2)"),
        ((8,), "(8,)"),
        ((), "()"),
        (("dp", None, "tp"), "(dp, -, tp)"),
        ((("dp", "tp"), None), "((dp, tp), -)"),
        ((None, ()), "(-, -)"),
        (("ep",), "(ep,)"),
    ],
)
def test_spec_round_trips_through_text_and_json(spec: object, text: str) -> None:
    hint = parse_spec(spec, None, where="x")
    assert str(hint) == hint.serialize() == text
    assert TensorHint.deserialize(text) == hint
    assert parse_spec(text, None, where="x") == hint
    assert TensorHint.from_json(hint.to_json()) == hint
    assert repr(hint) == f"TensorHint({text!r})"


def test_spec_forms() -> None:
    counts = parse_spec((4, 1), 2, where="x")
    assert counts.dims == (DimSpec(count=4), DimSpec(count=1))
    assert counts.counts == (4, 1) and counts.axes is None and not counts.is_named
    named = parse_spec(("dp", None, ("tp", "pp")), 3, where="x")
    assert named.axes == (("dp",), (), ("tp", "pp"))
    assert named.counts is None and named.is_named
    assert named.split_counts({"dp": 2, "tp": 4, "pp": 2}) == (2, 1, 8)
    assert named.split_counts() is None
    assert counts.to_json() == {"dims": [4, 1]}
    assert named.to_json() == {"dims": [["dp"], [], ["tp", "pp"]]}


def test_serialised_text_tolerates_spacing_and_trailing_commas() -> None:
    assert TensorHint.deserialize(" ( 4 ,1, ) ") == parse_spec((4, 1), 2, where="x")
    assert TensorHint.deserialize("((dp,tp,),-)") == parse_spec((("dp", "tp"), None), 2, where="x")


# --- spec: axis assignments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh", "counts", "expected"),
    [
        ({"dp": 2, "tp": 4}, (1, 1), [((), ())]),
        ({"dp": 2, "tp": 4}, (2, 1), [(("dp",), ())]),
        ({"dp": 2, "tp": 4}, (4, 1), [(("tp",), ())]),
        ({"dp": 2, "tp": 4}, (8, 1), [(("dp", "tp"), ())]),
        ({"dp": 2, "tp": 4}, (2, 4), [(("dp",), ("tp",))]),
        ({"dp": 2, "tp": 4}, (1, 8), [((), ("dp", "tp"))]),
        ({"dp": 2, "tp": 4}, (2, 2), []),
        ({"dp": 2, "tp": 2}, (2,), [(("dp",),), (("tp",),)]),
        ({"dp": 2, "tp": 2}, (2, 2), [(("dp",), ("tp",)), (("tp",), ("dp",))]),
        ({"dp": 2, "tp": 2}, (4, 1), [(("dp", "tp"), ())]),
        ({"dp": 2, "tp": 2}, (2, 1, 2), [(("dp",), (), ("tp",)), (("tp",), (), ("dp",))]),
        ({"tp": 8}, (8, 1), [(("tp",), ())]),
        ({"tp": 8}, (1, 8), [((), ("tp",))]),
        ({"tp": 8}, (2, 1), []),
        ({"tp": 8}, (1, 1), [((), ())]),
        ({"dp": 1, "tp": 2}, (2, 1), [(("tp",), ())]),  # size-1 axes shard nothing: never assigned
    ],
)
def test_axis_assignments_of_counts(mesh: dict[str, int], counts: tuple[int, ...], expected: list) -> None:
    assert parse_spec(counts, None, where="x").axis_assignments(mesh) == expected


def test_axis_assignments_of_names_are_the_names() -> None:
    hint = parse_spec((("tp", "dp"), None), 2, where="x")
    assert hint.axis_assignments({"dp": 2, "tp": 4}) == [(("tp", "dp"), ())]
    assert parse_spec(("ep", None), 2, where="x").axis_assignments({"dp": 2, "tp": 4}) == []


def test_valid_hints_pass_mesh_and_shape_checks() -> None:
    mesh = {"dp": 2, "tp": 4}
    for counts in [(1, 1), (2, 1), (4, 2), (8, 1), (2, 4)]:
        parse_spec(counts, 2, where="x").check_mesh(mesh, (16, 8), "x")
    parse_spec((("dp", "tp"), None), 2, where="x").check_mesh(mesh, (16, 3), "x")


# --- spec: refusals ------------------------------------------------------------------------------------


def _refusals() -> list[tuple[str, Callable[[], object], list[str]]]:
    mesh = {"dp": 2, "tp": 4}
    return [
        ("non-dividing split", lambda: parse_spec((1, 4), 2, where="input 0").check_shape((8, 30), "input 0"),
         ["input 0", "dim 1 of size 30 cannot be split 4 ways", "expected a split count that divides 30"]),
        ("non-dividing named split", lambda: parse_spec((("dp", "tp"), None), 2, where="w").check_mesh(mesh, (12, 3), "w"),
         ["w", "size 12 cannot be split 8 ways", "dp=2xtp=4", "expected"]),
        ("more splits than devices", lambda: parse_spec((4, 4), 2, where="x").check_mesh(mesh, None, "x"),
         ["need 16 devices", "{dp: 2, tp: 4} has 8", "expected counts whose product is at most 8"]),
        ("count not a product of axis sizes", lambda: parse_spec((3, 1), 2, where="x").check_mesh(mesh, None, "x"),
         ["split 3 ways", "{dp: 2, tp: 4}", "1, 2, 4 or 8", "expected one of those"]),
        ("count not a product on {tp: 8}", lambda: parse_spec((2,), 1, where="x").check_mesh({"tp": 8}, None, "x"),
         ["split 2 ways", "{tp: 8}", "1 or 8", "expected"]),
        ("counts that need the same axis", lambda: parse_spec((2, 2), 2, where="x").check_mesh(mesh, None, "x"),
         ["(2, 2) cannot be laid on mesh {dp: 2, tp: 4}", "expected counts that use disjoint mesh axes"]),
        ("unknown axis name", lambda: parse_spec(("dp", "mp"), 2, where="input 1"),
         ["input 1", "unknown mesh axis 'mp'", "expected one of dp, tp, pp, ep"]),
        ("axis name in wrong case", lambda: parse_spec(("DP",), 1, where="x"), ["'DP'", "did you mean 'dp'", "expected"]),
        ("axis missing from the mesh", lambda: parse_spec(("ep", None), 2, where="x").check_mesh(mesh, None, "x"),
         ["'ep'", "only axes ['dp', 'tp']", "expected one of those"]),
        ("axis used twice", lambda: parse_spec(("dp", "dp"), 2, where="x"),
         ["'dp' is used by dims 0 and 1", "expected each axis at most once"]),
        ("axis used twice in a dim", lambda: parse_spec((("tp", "tp"),), 1, where="x"),
         ["'tp' is used twice in dim 0", "expected each axis at most once"]),
        ("wrong rank", lambda: parse_spec((4, 1, 1), 2, where="input 0"),
         ["input 0", "expected a spec with one entry per tensor dim (2)", "found 3 entries in (4, 1, 1)"]),
        ("zero count", lambda: parse_spec((0, 1), 2, where="x"), ["entry 0 of (0, 1) is 0", "expected a split count >= 1"]),
        ("negative count", lambda: parse_spec((2, -1), 2, where="x"), ["is -1", "expected a split count >= 1"]),
        ("bool count", lambda: parse_spec((True, 1), 2, where="x"), ["bool True", "expected a split count"]),
        ("float count", lambda: parse_spec((1.5,), 1, where="x"), ["float 1.5", "expected a split count"]),
        ("counts mixed with names", lambda: parse_spec((4, None), 2, where="x"),
         ["expected all split counts or all mesh axes", "found a mix in (4, None)"]),
        ("spec not a tuple", lambda: parse_spec(4, 1, where="x"), ["expected a sharding spec as a tuple", "found int 4"]),
        ("bad text", lambda: TensorHint.deserialize("(4 1)"), ["'(4 1)'", "expected ',' or ')', found '1'"]),
        ("bad text character", lambda: TensorHint.deserialize("(4; 1)"), ["unexpected character ';'", "expected"]),
        ("text not closed", lambda: TensorHint.deserialize("(dp, tp"), ["found 'the end'", "expected"]),
        ("bad JSON", lambda: TensorHint.from_json({"spec": [4]}), ["expected a dict {'dims': [...]}", "found"]),
        ("bad mesh", lambda: parse_spec((2,), 1, where="x").check_mesh({"dp": 0}, None, "x"),
         ["expected mesh axes as name -> positive integer size", "found 'dp': 0"]),
        ("both forms in one DimSpec", lambda: DimSpec(count=2, axes=("dp",)), ["either a split count or mesh axes", "found both"]),
    ]


@pytest.mark.parametrize(("case", "call", "phrases"), _refusals(), ids=[r[0] for r in _refusals()])
def test_spec_refusals_say_what_was_expected_and_found(
    case: str, call: Callable[[], object], phrases: list[str]
) -> None:
    with pytest.raises(InputError) as info:
        call()
    for phrase in phrases:
        assert phrase in str(info.value), (case, str(info.value))


# --- the op: export, gradients, refusals ----------------------------------------------------------------


def test_tensor_hint_survives_export_on_meta() -> None:
    model = Hinted(("dp", None)).to("meta")
    x = meta(8, 6)
    ep = torch.export.export(model, (x,), strict=False)
    (node,) = shard_nodes(ep)
    assert node.target is torch.ops.autoshard.shard.default
    assert node.args[1] == "(dp, -)"
    assert node.args[0].op == "placeholder"
    assert tuple(node.meta["val"].shape) == (8, 6)
    assert [u.target for u in node.users] == [torch.ops.aten.linear.default]
    found = hints.hints_in_graph(ep)
    assert found == {node.name: parse_spec(("dp", None), 2, where="x")}
    # Core-ATen decomposition keeps the custom op, so the planner may run either graph.
    assert hints.hints_in_graph(ep.run_decompositions()) == found


def test_gradient_passes_through_the_hint() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    hinted_model = copy.deepcopy(plain)
    x = torch.randn(4, 6)

    def run(model: nn.Sequential, hinted: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inp = x.clone().requires_grad_()
        h = model[1](model[0](hints.shard(inp, (2, 1)) if hinted else inp))
        out = model[2](hints.shard(h, (1, 2)) if hinted else h)
        (out**2).sum().backward()
        return inp.grad, [p.grad for p in model.parameters()]

    gx_plain, gp_plain = run(plain, False)
    gx_hint, gp_hint = run(hinted_model, True)
    assert torch.equal(gx_plain, gx_hint)
    for a, b in zip(gp_plain, gp_hint):
        assert torch.equal(a, b)


def test_op_registrations_are_consistent() -> None:
    # Checks the fake implementation, autograd formula and schema against the real kernel.
    torch.library.opcheck(hints.SHARD_OP, (torch.randn(4, 6, requires_grad=True), "(2, 1)"))


def test_shard_returns_a_new_tensor_with_equal_values() -> None:
    x = torch.randn(4, 6)
    y = hints.shard(x, (2, 3))
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def test_bad_tensor_hint_is_refused_during_export_as_input_error() -> None:
    with pytest.raises(InputError, match="dim 1 of size 6 cannot be split 4 ways; expected a split count that divides 6"):
        torch.export.export(Hinted((1, 4)).to("meta"), (meta(8, 6),), strict=False)
    with pytest.raises(InputError, match=r"one entry per tensor dim \(2\), found 1"):
        torch.export.export(Hinted((4,)).to("meta"), (meta(8, 6),), strict=False)


def test_op_refuses_a_malformed_spec_string() -> None:
    with pytest.raises(InputError, match="cannot read spec string"):
        hints.SHARD_OP(torch.randn(2), "four")


def test_hints_in_graph_refuses_other_objects() -> None:
    with pytest.raises(InputError, match="expected a torch.export ExportedProgram.*found Hinted"):
        hints.hints_in_graph(Hinted())


# --- module hints --------------------------------------------------------------------------------------


def test_module_hint_puts_a_shard_node_on_the_module_input() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU()).to("meta")
    assert hints.shard(model[0], in_strategy=((4, 1),)) is model[0]  # chainable
    ep = torch.export.export(model, (meta(8, 6),), strict=False)
    (node,) = shard_nodes(ep)
    assert node.args[0].op == "placeholder" and node.args[1] == "(4, 1)"
    assert [u.target for u in node.users] == [torch.ops.aten.linear.default]
    assert hints.module_hints(model[0]).in_strategy == (parse_spec((4, 1), 2, where="x"),)


def test_module_out_strategy_and_none_entries() -> None:
    model = TwoInputs()
    hints.shard_module(model, in_strategy=(None, ("dp", None)), out_strategy=((2, 1),))
    ep = torch.export.export(model, (meta(8, 6), 2.0, meta(8, 6)), strict=False)
    nodes = shard_nodes(ep)
    assert [n.args[1] for n in nodes] == ["(dp, -)", "(2, 1)"]
    assert nodes[0].args[0].name == "y"  # the first tensor input has no hint; the second (y) does
    output = next(n for n in ep.graph.nodes if n.op == "output")
    assert output.args[0][0] is nodes[1]


def test_module_hint_on_tuple_and_namedtuple_outputs() -> None:
    Pair = namedtuple("Pair", ["a", "b"])

    class Split(nn.Module):
        def __init__(self, as_namedtuple: bool) -> None:
            super().__init__()
            self.as_namedtuple = as_namedtuple

        def forward(self, x: torch.Tensor) -> object:
            return Pair(x + 1, x * 2) if self.as_namedtuple else (x + 1, 3, x * 2)

    for as_namedtuple in (False, True):
        module = hints.shard(Split(as_namedtuple), out_strategy=(None, (1, 2)))
        out = module(torch.ones(2, 4))
        assert type(out) is (Pair if as_namedtuple else tuple)
        assert torch.equal(out[-1], torch.full((2, 4), 2.0))


def test_sharding_a_module_twice_replaces_the_hints() -> None:
    module = nn.Linear(6, 6)
    hints.shard(module, in_strategy=((4, 1),), out_strategy=((2, 1),))
    hints.shard(module, in_strategy=((2, 1),))
    assert len(module._forward_pre_hooks) == 1 and len(module._forward_hooks) == 0
    ep = torch.export.export(module.to("meta"), (meta(8, 6),), strict=False)
    assert [n.args[1] for n in shard_nodes(ep)] == ["(2, 1)"]
    hints.clear_hints(module)
    assert hints.module_hints(module) is None and not module._forward_pre_hooks
    assert not shard_nodes(torch.export.export(module, (meta(8, 6),), strict=False))


def test_wrong_number_of_input_strategies_is_refused() -> None:
    module = hints.shard(TwoInputs(), in_strategy=((4, 1),))
    with pytest.raises(InputError) as info:
        module(torch.ones(8, 6), 2.0, torch.ones(8, 6))
    msg = str(info.value)
    assert "module TwoInputs" in msg and "has 1 entry" in msg and "2 positional tensor inputs" in msg
    assert "expected one entry per positional tensor input" in msg


def test_wrong_number_of_output_strategies_is_refused() -> None:
    module = hints.shard(nn.Linear(6, 6), out_strategy=((4, 1), (4, 1)))
    with pytest.raises(InputError, match="has 2 entries, but the forward returned 1 tensor; expected one entry"):
        module(torch.ones(8, 6))


def test_module_shape_errors_at_capture_name_the_module() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.ReLU(), nn.Linear(6, 6))).to("meta")
    hints.shard(model[1][1], in_strategy=((3, 1),))
    # Without the model's names the class is all the message can give.
    with pytest.raises(InputError, match=r"in_strategy\[0\] \(positional input 0\) of module Linear: "
                                         r"dim 0 of size 8 cannot be split 3 ways"):
        torch.export.export(model, (meta(8, 6),), strict=False)
    hints.record_module_names(model)
    with pytest.raises(InputError, match=r"of module `1.1` \(Linear\): dim 0 of size 8 cannot be split 3 ways; "
                                         r"expected a split count that divides 8"):
        torch.export.export(model, (meta(8, 6),), strict=False)


def test_module_strategy_syntax_is_checked_when_written() -> None:
    with pytest.raises(InputError, match=r"in_strategy\[1\] of module Linear.*unknown mesh axis 'xp'"):
        hints.shard(nn.Linear(2, 2), in_strategy=((4, 1), ("xp",)))
    with pytest.raises(InputError, match=r"expected a tuple with one spec \(or None\) per tensor.*"
                                         r"in_strategy=\(\(4, 1\),\)"):
        hints.shard(nn.Linear(2, 2), in_strategy=(4, 1))


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda: hints.shard([1, 2], (2,)), "expected a torch.Tensor or a torch.nn.Module, found list"),
        (lambda: hints.shard(3, (2,)), "expected a torch.Tensor or a torch.nn.Module, found int"),
        (lambda: hints.shard(torch.ones(2)), "expected a spec, found none"),
        (lambda: hints.shard(torch.ones(2), in_strategy=((2,),)), "expected a spec, found in_strategy/out_strategy"),
        (lambda: hints.shard(nn.Linear(2, 2), ((2, 1),)), "expected in_strategy=/out_strategy=, found a positional spec"),
        (lambda: hints.shard(nn.Linear(2, 2)), "expected in_strategy and/or out_strategy, found neither"),
        (lambda: hints.shard_tensor("x", (2,)), "expected a torch.Tensor to hint, found str"),
        (lambda: hints.shard_module(torch.ones(2), ((2,),)), "expected a torch.nn.Module, found Tensor"),
        (lambda: hints.shardable(42), "expected an nn.Module subclass (or a module instance), found 42"),
    ],
)
def test_dispatch_refusals(call: Callable[[], object], phrase: str) -> None:
    with pytest.raises(InputError) as info:
        call()
    assert phrase in str(info.value)


# --- @shardable ----------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(6, 6)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


@hints.shardable
class Net(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_shardable_gives_every_submodule_a_shard_method() -> None:
    net = Net()
    assert all(callable(getattr(m, "shard", None)) for m in net.modules())
    linear = net.blocks[1].mlp[0]
    assert linear.shard(in_strategy=((2, 1),), out_strategy=(("dp", "tp"),)) is linear
    assert net.shard(((4, 1),)) is net  # MindSpore-style positional in_strategy
    ep = torch.export.export(net.to("meta"), (meta(8, 6),), strict=False)
    assert [n.args[1] for n in shard_nodes(ep)] == ["(4, 1)", "(2, 1)", "(dp, tp)"]
    # torch's own classes are untouched: only these instances have the method.
    assert type(linear) is nn.Linear and not hasattr(nn.Linear, "shard") and not hasattr(nn.Linear(2, 2), "shard")


def test_shardable_names_modules_in_messages() -> None:
    net = Net()
    net.blocks[0].mlp[2].shard(in_strategy=((5, 1),))
    with pytest.raises(InputError, match=r"of module `blocks.0.mlp.2` \(Linear\): dim 0 of size 8 cannot be split 5"):
        net(torch.ones(8, 6))
    assert "blocks.0.mlp.2" in repr(net.blocks[0].mlp[2].shard)


def test_shardable_modules_copy_and_pickle() -> None:
    net = Net(layers=1)
    net.blocks[0].attn.shard(in_strategy=((2, 1),))
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone.blocks[0].attn.shard.module is clone.blocks[0].attn
        clone.blocks[0].attn.shard(in_strategy=((4, 1),))
        assert hints.module_hints(clone.blocks[0].attn).in_strategy[0].counts == (4, 1)
        assert hints.module_hints(net.blocks[0].attn).in_strategy[0].counts == (2, 1)


def test_shardable_on_an_instance_and_name_clashes() -> None:
    class HasShard(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shard = nn.Linear(2, 2)  # a submodule called "shard" must not be shadowed

    model = nn.Sequential(nn.Linear(2, 2), HasShard())
    with pytest.warns(UserWarning, match="already has an attribute called 'shard'"):
        assert hints.shardable(model) is model
    assert isinstance(model[1].shard, nn.Linear)
    assert callable(model[0].shard)


# --- DTensor -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A fake process group for this test alone; other tests never see it."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        from autoshard.strategies._dtensor import reset_caches

        reset_caches()  # DTensor caches this world's meshes by layout


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed._local_tensor import LocalTensor

    full = t.full_tensor()
    return full.reconcile() if isinstance(full, LocalTensor) else full


def test_dtensor_passes_through_the_op_on_simulated_ranks() -> None:
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    with fake_process_group(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        assert hints.mesh_sizes(mesh) == {"dp": 2, "tp": 2}
        x = torch.randn(8, 6, dtype=torch.float64)
        with LocalTensorMode(4):
            for placements in [(Shard(0), Shard(1)), (Replicate(), Replicate()), (Shard(1), Replicate()),
                               (Replicate(), Shard(0))]:
                d = distribute_tensor(x, mesh, list(placements))
                y = hints.shard(d, ("dp", "tp"))
                assert tuple(y.placements) == placements
                assert torch.equal(_full(y), x)
            # A Partial (pending sum) passes through as a Partial: the identity commutes with the reduction.
            w = torch.randn(6, 4, dtype=torch.float64)
            a = distribute_tensor(x, mesh, [Shard(0), Shard(1)])
            b = distribute_tensor(w, mesh, [Replicate(), Shard(0)])
            c = a @ b
            assert tuple(c.placements) == (Shard(0), Partial())
            y = hints.shard(c, (2, 1))
            assert tuple(y.placements) == (Shard(0), Partial())
            assert torch.allclose(_full(y), x @ w)


def test_dtensor_gradient_passes_through_on_one_rank() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with fake_process_group(1):
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        d = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]).requires_grad_()
        weight = torch.randn(4, 6)
        y = hints.shard(d, ("dp", None))
        assert tuple(y.placements) == (Shard(0),)
        (y.to_local() * weight).sum().backward()
        assert torch.equal(d.grad.full_tensor(), weight)


def test_a_hint_on_a_module_forward_never_calls_is_refused() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(6, 6)
            self.spare = nn.Linear(6, 6)  # kept for another task; this forward never calls it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x).sum()

    import autoshard

    model = WithSpare().to("meta")
    hints.shard(model.used, in_strategy=((4, 1),))
    autoshard.capture(model, (meta(8, 6),))  # a hint that takes effect is fine
    hints.shard(model.spare, in_strategy=((4, 1),))
    with pytest.raises(InputError, match=r"hint on module `spare` \(Linear\) cannot be honoured: the model's forward never called"):
        autoshard.capture(model, (meta(8, 6),))


def test_step_hints_on_an_operator_only_mesh_are_refused() -> None:
    import autoshard
    from autoshard.models import build

    model = build("gpt-tiny", device="meta")
    autoshard.recompute(model.transformer.h[0], "full")
    idx = torch.zeros(4, 16, dtype=torch.long, device="meta")
    with pytest.raises(InputError, match=r"recompute on transformer.h.0 hint\(s\) cannot be honoured on the operator-only mesh"):
        autoshard.plan(model, (idx, idx), "cpu:4", mesh={"dp": 4})
