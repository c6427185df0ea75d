"""Sharding options and transitions: the Megatron patterns exist, filters hold, collectives and bytes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.strategies._dtensor import reset_caches
from autoshard.strategies import (
    option_cache_info,
    CommStep,
    MeshSpec,
    Partial,
    Replicate,
    Shard,
    backward_transition,
    clear_option_cache,
    gradient_is_partial,
    node_options,
    spec_from_json,
    spec_str,
    spec_to_json,
    transition,
)

R, P, PAVG = Replicate(), Partial("sum"), Partial("avg")
S = Shard
TP8 = MeshSpec.of({"tp": 8})
DP_TP = MeshSpec.of({"dp": 2, "tp": 4})


class Block(nn.Module):
    """A GPT-like block with every op kind under test; batch 8, seq 16, width 64, 8 heads."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, 64)
        self.ln = nn.LayerNorm(64)
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, 8, 8).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        x = x + self.down(F.gelu(self.up(x)))
        return F.cross_entropy(x.view(b * t, c), targets.view(b * t))


@pytest.fixture(scope="module")
def graph() -> torch.fx.Graph:
    with torch.device("meta"):
        model = Block()
    idx = torch.zeros(8, 16, dtype=torch.long, device="meta")
    return torch.export.export(model, (idx, idx), strict=False).graph


def nodes(graph: torch.fx.Graph, target: object) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.target == target]


def node(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    return next(n for n in graph.nodes if n.name == name)


def pairs(n: torch.fx.Node, mesh: MeshSpec) -> set[tuple]:
    return {(o.output, o.inputs) for o in node_options(n, mesh)}


aten = torch.ops.aten


# ------------------------------------------------------------------------------------------- mesh


def test_mesh_spec_and_spec_json_round_trip() -> None:
    m = MeshSpec.of({"dp": 2, "tp": 4})
    assert m.names == ("dp", "tp") and m.sizes == (2, 4) and m.ndim == 2 and m.num_devices == 8
    assert m.size("tp") == 4 and m.size(0) == 2
    spec = (S(0), P)
    assert spec_str(spec) == "(S(0), P)" and spec_str((PAVG,)) == "(P(avg),)"
    assert spec_from_json(spec_to_json(spec)) == spec
    assert spec_from_json(spec_to_json((R, PAVG))) == (R, PAVG)
    with pytest.raises(ValueError):
        MeshSpec.of({"a": 2, "b": 0})


# ------------------------------------------------------------------------------------- options


def test_linear_column_and_row_parallel_on_tp(graph: torch.fx.Graph) -> None:
    up, down = node(graph, "linear_2"), node(graph, "linear_3")  # up: 64 -> 256, down: 256 -> 64
    assert up.args[1].name.endswith("up_weight") and down.args[1].name.endswith("down_weight")
    col = pairs(up, TP8)
    assert (((S(2),),), ((R,), (S(0),), (S(0),))) in col  # input R, weight S(0), bias S(0) -> S(-1)
    row = pairs(down, TP8)
    assert (((P,),), ((S(2),), (S(1),), (P,))) in row  # input S(-1), weight S(1) -> partial
    dp = pairs(up, MeshSpec.of({"dp": 8}))
    assert (((S(0),),), ((S(0),), (R,), (R,))) in dp  # batch sharded, weight replicated


def test_layer_norm_never_shards_the_normalised_dim(graph: torch.fx.Graph) -> None:
    (ln,) = nodes(graph, aten.layer_norm.default)
    opts = node_options(ln, DP_TP)
    assert opts and all(S(2) not in o.output[0] and S(2) not in o.inputs[0] for o in opts)
    assert all(o.inputs[1] == (R, R) for o in opts)  # the weight stays replicated
    assert (((S(0), S(1)),), ((S(0), S(1)), (R, R), (R, R))) in pairs(ln, DP_TP)


def test_sdpa_has_a_heads_sharded_option(graph: torch.fx.Graph) -> None:
    (sdpa,) = nodes(graph, aten.scaled_dot_product_attention.default)
    got = pairs(sdpa, DP_TP)
    assert (((S(0), S(1)),), ((S(0), S(1)),) * 3) in got  # batch on dp, heads on tp
    assert all(S(2) not in o.output[0] for o in node_options(sdpa, DP_TP))  # never the sequence


def test_embedding_and_cross_entropy(graph: torch.fx.Graph) -> None:
    (emb,) = nodes(graph, aten.embedding.default)
    got = pairs(emb, TP8)
    assert (((S(2),),), ((S(1),), (R,))) in got  # hidden-dim sharded table
    assert (((S(0),),), ((R,), (S(0),))) in got  # batch-sharded ids
    assert all(o.inputs[0] != (S(0),) for o in node_options(emb, TP8))  # no vocab-parallel (_MaskPartial)
    (ce,) = nodes(graph, aten.cross_entropy_loss.default)
    # DTensor also offers the batch split with P(avg), the mean of per-rank means: wrong on padded labels,
    # so strategies/exclusions.py drops it (capture rewrites a loss that is one such mean to a sum)
    assert pairs(ce, TP8) == {(((R,),), ((R,), (R,)))}


def test_views_chunk_and_getitem_follow_their_input(graph: torch.fx.Graph) -> None:
    (chunk,) = nodes(graph, aten.chunk.default)
    strided = 0
    for o in node_options(chunk, DP_TP):
        if any(isinstance(p, _StridedShard) for p in o.inputs[0]):
            # autoshard's own fused-split rule: the k-way strided layout chunks into plain shards locally
            strided += 1
            expected = tuple(S(2) if isinstance(p, _StridedShard) else p for p in o.inputs[0])
            assert o.output == (expected,) * 3
        else:  # DTensor's rule: the chunked dim is never sharded, the pieces follow the input
            assert o.output == (o.inputs[0],) * 3 and all(S(2) not in s for s in o.output)
    assert strided > 0
    getitem = next(u for u in chunk.users)
    opts = node_options(getitem, DP_TP)
    assert all(o.output == o.inputs for o in opts) and ((P, S(1)),) in [o.output for o in opts]
    view = nodes(graph, aten.view.default)[0]  # q: [8, 16, 64] -> [8, 16, 8, 8]
    got = pairs(view, TP8)
    assert (((S(2),),), ((S(2),),)) in got  # hidden split into heads: heads sharded


def test_placeholders_even_no_partial_and_even_filter(graph: torch.fx.Graph) -> None:
    w = next(n for n in graph.nodes if n.op == "placeholder" and n.name.endswith("qkv_weight"))  # [192, 64]
    specs = [o.output[0] for o in node_options(w, DP_TP)]
    assert (R, R) in specs and (S(0), S(1)) in specs and (S(0), S(0)) in specs  # 192 % 8 == 0
    assert not any(isinstance(p, Partial) for s in specs for p in s)
    m = MeshSpec.of({"tp": 5})  # neither 192 nor 64 divides by 5: replicated only
    assert [o.output[0] for o in node_options(w, m)] == [(R,)]
    (ln,) = nodes(graph, aten.layer_norm.default)
    for o in node_options(ln, MeshSpec.of({"tp": 32})):  # 8 x 16 x 64: only seq/hidden divide by 32
        assert S(0) not in o.output[0]


def test_options_are_deterministic_and_cached(graph: torch.fx.Graph) -> None:
    calls = [n for n in graph.nodes if n.op == "call_function"]
    mesh = MeshSpec.of({"dp": 8, "tp": 8})
    first = [node_options(n, mesh) for n in calls]
    before = option_cache_info()
    again = [node_options(n, mesh) for n in calls]
    assert first == again and option_cache_info() == before  # served from the cache: nothing new derived
    clear_option_cache()
    assert [node_options(n, mesh) for n in calls] == first


@pytest.fixture()
def gloo_world():
    """A real 1-rank gloo process group, as inside a torchrun job; destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    reset_caches()  # DTensor caches this world's meshes by layout


@pytest.mark.parametrize("with_pg", [False, True])
def test_enumeration_with_and_without_a_process_group(graph: torch.fx.Graph, request, with_pg: bool) -> None:
    if with_pg:
        request.getfixturevalue("gloo_world")
    clear_option_cache()
    mesh = MeshSpec.of({"dp": 8, "tp": 8})  # 64 devices, whatever the real world size
    linear = nodes(graph, aten.linear.default)[0]
    assert (((S(0), S(2)),), ((S(0), R), (R, S(0)), (R, S(0)))) in pairs(linear, mesh)
    assert transition((S(0), R), (R, R), (64, 64), 4, mesh) == (CommStep(axis="dp", collective="all_gather", full_bytes=64 * 64 * 4),)
    assert not dist.is_initialized() or dist.get_world_size() == 1


# ------------------------------------------------------------------------------------ transitions


def test_transition_collectives_and_bytes() -> None:
    m = MeshSpec.of({"dp": 2, "tp": 4})
    shape, full = (16, 32), 16 * 32 * 2  # bf16
    assert transition((R, S(0)), (R, R), shape, 2, m) == (CommStep(axis="tp", collective="all_gather", full_bytes=full),)
    assert transition((R, P), (R, R), shape, 2, m) == (CommStep(axis="tp", collective="all_reduce", full_bytes=full),)
    assert transition((P, R), (S(0), R), shape, 2, m) == (
        CommStep(axis="dp", collective="reduce_scatter", full_bytes=full),
    )
    assert transition((R, S(0)), (R, S(1)), shape, 2, m) == (CommStep(axis="tp", collective="all_to_all", full_bytes=full),)
    assert transition((R, R), (R, S(1)), shape, 2, m) == (CommStep(axis="tp", collective="local", full_bytes=full),)
    assert transition((S(0), R), (S(0), R), shape, 2, m) == ()
    # tp gathers a tensor already split in half by dp: 16 x 16 on that step, then dp gathers 16 x 32
    assert transition((S(1), S(1)), (R, R), shape, 2, m) == (
        CommStep(axis="tp", collective="all_gather", full_bytes=full // 2),
        CommStep(axis="dp", collective="all_gather", full_bytes=full),
    )
    assert transition((S(0), R), (P, R), shape, 2, m) is None  # Shard -> Partial: impossible
    assert transition((P, R), (PAVG, R), shape, 2, m) is None  # one reduction into another
    assert transition((R, R), (P, R), shape, 2, m) == (CommStep(axis="dp", collective="local", full_bytes=full),)


def test_redistribution_plan_does_not_depend_on_the_shape() -> None:
    """transitions asks DTensor for its plan once per (placements, rank, mesh), on a shape every axis
    divides: DTensor's greedy planner must choose the same steps at every real shape (uneven ones
    included), or the planner would price collectives the runtime does not run."""
    import itertools
    import random

    from autoshard.strategies import _dtensor
    from autoshard.strategies.mesh import all_specs
    from autoshard.strategies.transitions import _greedy_plan

    rng = random.Random(0)
    checked = 0
    for sizes in ({"dp": 2, "tp": 4}, {"dp": 2, "sp": 2, "tp": 2}):
        mesh = MeshSpec.of(sizes)
        for ndim in (1, 2, 3):
            specs = tuple(all_specs((8,) * ndim, mesh, partial=True))
            pairs = [(a, b) for a, b in itertools.product(specs, specs) if a != b]
            for src, dst in rng.sample(pairs, min(150, len(pairs))):
                if transition(src, dst, (8,) * ndim, 4, mesh) is None:
                    continue  # no redistribution exists (S -> P)
                for shape in ((8,) * ndim, tuple(rng.choice((1, 3, 6, 16, 40)) for _ in range(ndim))):
                    truth = _dtensor.transform_steps(src, dst, shape, torch.float32, mesh.sizes, mesh.names)
                    assert _greedy_plan(src, dst, ndim, mesh) == tuple((d, a, b) for d, a, b, _ in truth), (
                        src, dst, shape)
                    checked += 1
    assert checked > 300


def test_backward_transition_follows_megatron() -> None:
    m = MeshSpec.of({"tp": 4})
    shape = (8, 64)
    # input of a column-parallel linear: forward R -> R, output S(-1): the gradient is partial (f op)
    assert gradient_is_partial(R, [S(1)]) and not gradient_is_partial(R, [R]) and not gradient_is_partial(S(0), [S(0)])
    assert backward_transition((R,), (R,), [(S(1),)], shape, 4, m) == (
        CommStep(axis="tp", collective="all_reduce", full_bytes=8 * 64 * 4),
    )
    assert backward_transition((R,), (R,), (S(1),), shape, 4, m) == backward_transition(
        (R,), (R,), [(S(1),)], shape, 4, m
    )  # a single Spec is accepted for the consumer's output too
    # row-parallel input: forward S(-1), output P: gradient arrives S(-1), nothing to do
    assert backward_transition((S(1),), (S(1),), [(P,)], shape, 4, m) == ()
    # a partial producer: gradient of a partial sum is replicated, so a replicated gradient needs nothing
    assert backward_transition((P,), (R,), [(R,)], shape, 4, m) == ()
    # forward all-gather S(0) -> R into a replicated op: the gradient goes back R -> S(0), a local chunk
    assert backward_transition((S(0),), (R,), [(R,)], shape, 4, m) == (
        CommStep(axis="tp", collective="local", full_bytes=8 * 64 * 4),
    )
    # forward all-gather into a sharded-output op: partial gradient -> reduce-scatter
    assert backward_transition((S(0),), (R,), [(S(1),)], shape, 4, m) == (
        CommStep(axis="tp", collective="reduce_scatter", full_bytes=8 * 64 * 4),
    )


# ------------------------------------------------------------------------------- size-1 mesh axes


class Expands(nn.Module):
    """HF's patterns that DTensor's view/expand strategy raised KeyError on over a size-1 axis: a mask
    expanded from size-1 dims (causal mask), repeat_kv's expand+reshape, ViT's cls_token.expand."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=x.device).expand(b, 1, 4, 4)
        kv = x[:, :, None, :, :].expand(b, 2, 2, 4, 8).reshape(b, 4, 4, 8)
        cls = self.cls.expand(b, -1, -1)
        return kv.masked_fill(~mask[:, :, :, :1], 0.0).sum() + cls.sum()


@pytest.mark.parametrize("mesh", [{"dp": 1}, {"dp": 1, "tp": 2}, {"tp": 2, "dp": 1}])
def test_a_size_1_axis_offers_only_replicate_and_expands_enumerate(mesh: dict[str, int]) -> None:
    with torch.device("meta"):
        model = Expands()
    g = torch.export.export(model, (torch.zeros(2, 2, 4, 8, device="meta"),), strict=False).graph
    spec = MeshSpec.of(mesh)
    one = spec.names.index("dp")
    for n in g.nodes:
        for o in node_options(n, spec):  # raised KeyError from DTensor's expand strategy before
            for s in (*o.output, *o.inputs):
                assert s is None or s[one] == R, (n.name, str(o))
    assert any(n.target == aten.expand.default for n in g.nodes)


def test_a_strategy_that_refuses_everything_names_the_node(graph: torch.fx.Graph, monkeypatch) -> None:
    from autoshard.errors import ShardingError
    from autoshard.strategies import _dtensor

    def refuse(*args, **kwargs):
        raise KeyError(0)  # what DTensor's private view strategy raised

    n = nodes(graph, aten.view.default)[0]
    monkeypatch.setitem(_dtensor._propagator().op_strategy_funcs, aten.view.default, refuse)
    clear_option_cache()
    try:
        with pytest.raises(ShardingError, match=rf"node {n.name} \(aten.view.default\) at .*test_strategies.py:\d+"):
            node_options(n, TP8)
    finally:
        clear_option_cache()


@pytest.mark.slow
@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 4, 8, 16), (2, 4, 16, 16), (2, 4, 16, 16), (1, 4, 8, 16)),  # T5 cross-attention, bias broadcast on batch
        ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16), (2, 1, 8, 8)),  # a padding mask broadcast on heads
        ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16), (8, 8)),  # a 2-D mask
    ],
    ids=["cross-attention", "head-broadcast-mask", "2d-mask"],
)
def test_attention_rules_from_aligned_combinations_equal_the_full_product(shapes) -> None:
    # the planner derives masked attention's rules from `aligned_combos` (~100 traces) instead of every
    # combination of {R, S(d), P} per input (~2400): both must give DTensor's same rules
    from autoshard.strategies import _dtensor

    op = torch.ops.aten.scaled_dot_product_attention.default
    args = tuple(torch.empty(s, device="meta") for s in shapes)
    full = _dtensor.decomp_rules(op, args, {})
    aligned = _dtensor.decomp_rules(op, args, {}, _dtensor.aligned_combos(args, {}))
    assert full is not None and aligned is not None
    assert full[0] == aligned[0] == 1
    assert set(aligned[1]) == set(full[1])
    assert len(full[1]) >= 6  # replicate, batch, heads, query rows, v features, Partial v: not a vacuous equality


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


_F = torch.ops.aten
_PATTERN_CASES = {
    # op, its arguments at a micro-batch b, two b of one pattern of sizes, and whether DTensor has rules
    # (without, the op runs replicated: that must not change with the size either)
    "linear-3d": (_F.linear.default, lambda b: (_meta(b, 16, 32), _meta(64, 32), _meta(64)), (2, 3), True),
    "linear-2d": (_F.linear.default, lambda b: (_meta(b * 16, 24), _meta(48, 24)), (2, 5), True),
    "linear-square": (_F.linear.default, lambda b: (_meta(b, 16, 32), _meta(b * 16, 32)), (2, 3), True),
    "attention-batch-equals-heads": (_F.scaled_dot_product_attention.default,  # dimwise: equalities dropped
                                     lambda b: (_meta(b, 4, 8, 16), _meta(b, 4, 8, 16), _meta(b, 4, 8, 16),
                                                _meta(b, 1, 8, 8)), (4, 8), True),
    "attention-cross": (_F.scaled_dot_product_attention.default,
                        lambda b: (_meta(b, 4, 8, 16), _meta(b, 4, 12, 16), _meta(b, 4, 12, 16),
                                   _meta(1, 4, 8, 12)), (2, 8), True),
    "attention-masked": (_F.scaled_dot_product_attention.default,
                         lambda b: (_meta(b, 4, 8, 16), _meta(b, 4, 8, 16), _meta(b, 4, 8, 16), _meta(b, 1, 8, 8)),
                         (2, 3), True),
    "conv2d": (_F.conv2d.default, lambda b: (_meta(b, 3, 8, 8), _meta(5, 3, 3, 3)), (2, 4), True),
    "cross-entropy": (_F.cross_entropy_loss.default,
                      lambda b: (_meta(b * 8, 10), _meta(b * 8, dtype=torch.int64)), (2, 3), True),
    "attention-causal": (_F.scaled_dot_product_attention.default,  # a factory op inside: sdpa_rules' fallback
                         lambda b: (_meta(b, 4, 8, 16), _meta(b, 4, 8, 16), _meta(b, 4, 8, 16), None, 0.0, True),
                         (2, 5), True),
    "batch-norm-train": (_F.batch_norm.default, lambda b: (_meta(b, 8, 6, 6), _meta(8), _meta(8), _meta(8),
                                                          _meta(8), True, 0.1, 1e-5, False), (2, 4), False),
    "where-scalar": (_F.where.ScalarOther, lambda b: (_meta(b, 1, 8, 8, dtype=torch.bool), _meta(b, 4, 8, 8), 0.0),
                     (2, 3), False),
}


@pytest.mark.parametrize("case", list(_PATTERN_CASES))
def test_composite_rules_are_the_same_at_every_size_of_one_pattern(case) -> None:
    # the planner derives a composite op's rules once per pattern of sizes (options._size_pattern), so
    # a new micro-batch size reuses them: DTensor's decomposition must admit the same rules at both sizes
    from autoshard.strategies import options

    op, make, (small, large), has_rules = _PATTERN_CASES[case]
    a, b = make(small), make(large)
    assert options._size_pattern(a, {}, equalities=op not in options._DIMWISE_RULES) == options._size_pattern(
        b, {}, equalities=op not in options._DIMWISE_RULES)
    got_a, got_b = options._derive_rules(op, a, {}, None, "decomp"), options._derive_rules(op, b, {}, None, "decomp")
    if not has_rules:
        assert got_a is None and got_b is None
        return
    assert got_a is not None and got_b is not None and len(got_a[1]) >= 2  # not a vacuous equality
    assert got_a[0] == got_b[0] and set(got_a[1]) == set(got_b[1])


def test_size_pattern_tells_apart_what_changes_a_decomposition() -> None:
    from autoshard.strategies.options import _size_pattern

    assert _size_pattern((_meta(2, 16, 32),), {}) != _size_pattern((_meta(1, 16, 32),), {})  # size 1
    assert _size_pattern((_meta(2, 16, 32),), {}) != _size_pattern((_meta(16, 16, 32),), {})  # equal sizes
    assert _size_pattern((_meta(2, 6), [-1, 6]), {}) != _size_pattern((_meta(2, 8), [-1, 6]), {})  # int = size
    assert _size_pattern((_meta(5, 7), 1), {}) != _size_pattern((_meta(5, 7), 0), {})  # ints are literal
    assert _size_pattern((_meta(4, 6).t(),), {}) != _size_pattern((_meta(6, 4),), {})  # stride order
    assert _size_pattern((_meta(2, 6),), {}) == _size_pattern((_meta(3, 7),), {})
    assert _size_pattern((_meta(2, 2),), {}, equalities=False) == _size_pattern((_meta(2, 3),), {}, equalities=False)
    assert _size_pattern((_meta(1, 2),), {}, equalities=False) != _size_pattern((_meta(2, 2),), {}, equalities=False)
