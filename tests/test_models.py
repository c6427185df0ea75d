"""Tests for the reference models in ``autoshard.models``.

Expected values come from published figures (parameter counts of released checkpoints) or from
formulas and reference implementations written independently here (RoPE as complex rotation,
attention head by head, MoE routing token by token), never from the models' own output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autoshard.models import (
    GPT,
    PRESETS,
    GPTConfig,
    Llama,
    LlamaConfig,
    MoEConfig,
    MoETransformer,
    build,
    preset,
)
from autoshard.models.common import apply_rope, rope_cos_sin
from autoshard.models.llama import Attention
from autoshard.models.moe import MoELayer

TINY = ["gpt-tiny", "llama-tiny", "moe-tiny"]


def _tokens(vocab: int, B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_tiny(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, device="cpu")
    V = model.config.vocab_size
    idx, targets = _tokens(V, seed=1), _tokens(V, seed=2)

    logits = model(idx)
    assert logits.shape == (2, 16, V)
    assert torch.isfinite(logits).all()

    loss = model(idx, targets)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    # Small init gives near-uniform predictions: the loss is close to ln(vocab).
    assert abs(loss.item() - math.log(V)) < 1.0

    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY)
def test_causal(name: str) -> None:
    """Changing token t0 leaves logits before t0 unchanged and changes the logits at t0."""
    overrides = {}
    if name.startswith("moe"):
        # Capacity dropping lets later tokens displace earlier tokens' second choices (see moe.py);
        # with capacity_factor = E / top_k nothing is dropped and the model is strictly causal.
        cfg = preset(name)
        overrides["capacity_factor"] = cfg.n_experts / cfg.top_k
    torch.manual_seed(0)
    model = build(name, device="cpu", **overrides).eval()
    V = model.config.vocab_size
    idx = _tokens(V, T=12)
    t0 = 7
    changed = idx.clone()
    changed[:, t0] = (idx[:, t0] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t0], b[:, :t0], rtol=0, atol=1e-6)
    assert (a[:, t0] - b[:, t0]).abs().max() > 1e-4


def test_gpt_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = build("gpt-tiny", device="cpu", dropout=0.5)
    idx = _tokens(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


# --------------------------------------------------------------------------- parameters


def test_gpt_tied_weights_counted_once() -> None:
    model = build("gpt-tiny")
    assert model.lm_head.weight is model.transformer.wte.weight
    c = model.config
    d, L, V, T = c.n_embd, c.n_layer, c.vocab_size, c.block_size
    # Per block: ln_1 2d, c_attn 3d^2+3d, attn c_proj d^2+d, ln_2 2d, c_fc 4d^2+4d,
    # mlp c_proj 4d^2+d.
    expected = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    assert model.num_parameters() == expected
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_duplicates == expected + V * d


def test_gpt_tie_survives_materialisation() -> None:
    model = build("gpt-tiny")
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.transformer.wte.weight
    model.init_weights()
    assert model.lm_head.weight is model.transformer.wte.weight


# Published totals of the released checkpoints.
PUBLISHED = {
    "gpt2-small": 124_439_808,  # GPT-2 124M (with wpe, head tied to wte)
    "llama2-7b": 6_738_415_616,  # Llama-2-7b
    "llama3-8b": 8_030_261_248,  # Meta-Llama-3-8B
    "mixtral-8x7b": 46_702_792_704,  # Mixtral-8x7B-v0.1
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_on_meta(name: str) -> None:
    model = build(name)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert model.num_parameters() == PUBLISHED[name]


def test_gpt3_175b_is_175b_on_meta() -> None:
    model = build("gpt3-175b")
    assert all(p.is_meta for p in model.parameters())
    assert abs(model.num_parameters() - 175e9) / 175e9 < 0.01


def _formula_count(cfg: GPTConfig | LlamaConfig | MoEConfig) -> int:
    """Parameter count from the architecture description alone."""
    if isinstance(cfg, GPTConfig):
        d = cfg.n_embd
        return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d
    d, hs = cfg.dim, cfg.dim // cfg.n_head
    attn = 2 * d * cfg.n_head * hs + 2 * d * cfg.n_kv_head * hs  # wq, wo; wk, wv
    if isinstance(cfg, MoEConfig):
        mlp = cfg.n_experts * 3 * d * cfg.ffn_hidden + d * cfg.n_experts  # experts + router
    else:
        mlp = 3 * d * cfg.ffn_hidden
    return 2 * cfg.vocab_size * d + cfg.n_layer * (attn + mlp + 2 * d) + d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_formula_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = {GPTConfig: GPT, LlamaConfig: Llama, MoEConfig: MoETransformer}[
            type(PRESETS[name])
        ](PRESETS[name])
    assert model.config is PRESETS[name]
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == _formula_count(PRESETS[name])


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("name", TINY)
def test_init_from_meta_matches_direct_init(name: str) -> None:
    """Materialising from meta + init_weights() gives the same model as building on CPU."""
    direct = build(name, device="cpu")
    torch.manual_seed(123)
    direct.init_weights()

    lazy = build(name)
    lazy.to_empty(device="cpu")
    torch.manual_seed(123)
    lazy.init_weights()

    a, b = direct.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    idx = _tokens(direct.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(direct(idx), lazy(idx), rtol=0, atol=0)


def test_gpt_init_statistics() -> None:
    torch.manual_seed(0)
    model = build("gpt-small-test", device="cpu")
    L = model.config.n_layer
    block = model.transformer.h[0]
    assert torch.equal(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    assert torch.equal(block.ln_1.bias, torch.zeros_like(block.ln_1.bias))
    assert torch.equal(block.attn.c_attn.bias, torch.zeros_like(block.attn.c_attn.bias))
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    residual = 0.02 / math.sqrt(2 * L)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.1)


def test_llama_and_moe_init_statistics() -> None:
    torch.manual_seed(0)
    llama = build("llama-tiny", device="cpu", dim=128, n_head=4, n_kv_head=4, ffn_hidden=256)
    residual = 0.02 / math.sqrt(2 * llama.config.n_layer)
    layer = llama.layers[0]
    assert torch.equal(layer.attention_norm.weight, torch.ones(128))
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.attention.wo.weight.std().item() == pytest.approx(residual, rel=0.1)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(residual, rel=0.1)

    moe = build("moe-tiny", device="cpu")
    residual = 0.02 / math.sqrt(2 * moe.config.n_layer)
    experts = moe.layers[0].feed_forward
    assert experts.w1.std().item() == pytest.approx(0.02, rel=0.1)
    assert experts.w2.std().item() == pytest.approx(residual, rel=0.1)


# --------------------------------------------------------------------------- RoPE and attention


def reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split RoPE as complex rotation: channel pair (i, i + D/2) is the complex number
    x_i + j x_{i+D/2}, multiplied by exp(j * t * theta^(-2i/D)) at position t. x: (B, T, H, D)."""
    B, T, H, D = x.shape
    half = D // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]  # (T, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    rotated = z * rotation
    return torch.cat((rotated.real, rotated.imag), dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_complex_rotation(theta: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(10, 16, theta, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, reference_rope(x, theta))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is not rotated
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations preserve length


def test_rope_scores_depend_on_relative_position_only() -> None:
    torch.manual_seed(0)
    T, D = 8, 16
    q = torch.randn(D, dtype=torch.float64).expand(1, T, 1, D)  # same vector at every position
    k = torch.randn(D, dtype=torch.float64).expand(1, T, 1, D)
    cos, sin = rope_cos_sin(T, D, 10000.0, dtype=torch.float64)
    scores = apply_rope(q, cos, sin)[0, :, 0] @ apply_rope(k, cos, sin)[0, :, 0].T  # (T, T)
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1])


def reference_attention(
    attn: Attention, x: torch.Tensor, n_head: int, n_kv_head: int
) -> torch.Tensor:
    """Causal attention computed head by head; query head h reads kv head h // n_rep."""
    B, T, D = x.shape
    hs = D // n_head
    q = reference_rope((x @ attn.wq.weight.T).view(B, T, n_head, hs), 10000.0)
    k = reference_rope((x @ attn.wk.weight.T).view(B, T, n_kv_head, hs), 10000.0)
    v = (x @ attn.wv.weight.T).view(B, T, n_kv_head, hs)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    heads = []
    for h in range(n_head):
        g = h // (n_head // n_kv_head)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        heads.append(weights @ v[:, :, g])  # (B, T, hs)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_matches_hand_computation(n_kv_head: int) -> None:
    """n_kv_head == n_head is plain multi-head attention; fewer kv heads is grouped-query."""
    torch.manual_seed(0)
    D, n_head, T = 32, 4, 6
    attn = Attention(dim=D, n_head=n_head, n_kv_head=n_kv_head).double()
    x = torch.randn(2, T, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(T, D // n_head, 10000.0, dtype=torch.float64)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, n_head, n_kv_head))


# --------------------------------------------------------------------------- mixture of experts


def _routing_layer(capacity_factor: float, seed: int = 0) -> MoELayer:
    """A float64 MoE layer with weights large enough that routing and outputs are not ~uniform."""
    torch.manual_seed(seed)
    layer = MoELayer(dim=8, hidden=12, n_experts=4, top_k=2, capacity_factor=capacity_factor)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def naive_moe(layer: MoELayer, x: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Token-by-token MoE. Slots are handed out in GShard order: every token's first choice (in
    token order), then every token's second choice; a choice finding its expert full is dropped."""
    D = x.shape[-1]
    tokens = x.reshape(-1, D)
    S, E, K = tokens.shape[0], layer.n_experts, layer.top_k
    routes = []
    for s in range(S):
        probs = torch.softmax(tokens[s] @ layer.router.weight.T, dim=-1)
        gate, experts = torch.topk(probs, K)
        routes.append((gate / gate.sum(), experts.tolist()))
    used = [0] * E
    kept = [[False] * K for _ in range(S)]
    for j in range(K):
        for s in range(S):
            e = routes[s][1][j]
            if capacity is None or used[e] < capacity:
                kept[s][j] = True
                used[e] += 1
    out = torch.zeros_like(tokens)
    for s in range(S):
        gate, experts = routes[s]
        for j, e in enumerate(experts):
            if kept[s][j]:
                v = tokens[s]
                y = (F.silu(v @ layer.w1[e]) * (v @ layer.w3[e])) @ layer.w2[e]
                out[s] += gate[j] * y
    return out.view_as(x)


@pytest.mark.parametrize(
    ("capacity_factor", "capacity"),
    [
        (2.0, None),  # C = ceil(2.0 * 2 * 16 / 4) = 16 = all tokens: nothing can be dropped
        (1.0, 8),  # ceil(1.0 * 2 * 16 / 4)
        (0.25, 2),  # ceil(0.25 * 2 * 16 / 4)
    ],
)
def test_moe_layer_matches_naive_loop(capacity_factor: float, capacity: int | None) -> None:
    layer = _routing_layer(capacity_factor)
    x = torch.randn(2, 8, 8, dtype=torch.float64)  # S = 16 tokens
    out, _ = layer(x)
    torch.testing.assert_close(out, naive_moe(layer, x, capacity))


def test_moe_tiny_capacity_drops_tokens_to_zero() -> None:
    layer = _routing_layer(0.25)  # C = 2 slots per expert, 8 in all, for 16 tokens x 2 choices
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    out, _ = layer(x)
    flat = out.reshape(16, 8)
    zero_rows = (flat == 0).all(dim=-1)
    # At most 8 slots are filled, so at least 8 tokens keep none of their choices...
    assert zero_rows.sum() >= 8
    # ...and exactly the tokens the naive loop drops completely come out zero.
    expected_zero = (naive_moe(layer, x, 2).reshape(16, 8) == 0).all(dim=-1)
    assert torch.equal(zero_rows, expected_zero)


def test_moe_aux_loss() -> None:
    layer = _routing_layer(1.25)
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    _, aux = layer(x)
    # Independent Switch formula: E * sum_e (fraction of top-k assignments to e) * (mean prob of e).
    probs = torch.softmax(x.reshape(16, 8) @ layer.router.weight.T, dim=-1)
    chosen = probs.topk(2, dim=-1).indices
    fraction = torch.tensor([(chosen == e).sum().item() / (16 * 2) for e in range(4)])
    expected = 4 * (fraction.double() * probs.mean(dim=0)).sum()
    torch.testing.assert_close(aux, expected)

    with torch.no_grad():
        layer.router.weight.zero_()  # uniform router: P_e = 1/E, so the loss is sum_e f_e = 1
    _, aux = layer(x)
    assert aux.item() == pytest.approx(1.0)


def test_moe_model_loss_includes_scaled_aux_loss() -> None:
    """With every router zeroed each layer's aux loss is exactly 1: the loss grows by the coef."""
    idx, targets = _tokens(128, seed=1), _tokens(128, seed=2)
    losses = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        model = build("moe-tiny", device="cpu", aux_loss_coef=coef)
        with torch.no_grad():
            for layer in model.layers:
                layer.feed_forward.router.weight.zero_()
            losses[coef] = model(idx, targets).item()
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5, abs=1e-5)
    assert preset("moe-tiny").aux_loss_coef == 0.01


# --------------------------------------------------------------------------- capture


@pytest.mark.parametrize("name", TINY)
def test_export_on_meta(name: str) -> None:
    model = build(name)
    idx = torch.zeros(2, 16, dtype=torch.long, device="meta")
    targets = torch.zeros(2, 16, dtype=torch.long, device="meta")
    ep = torch.export.export(model, (idx, targets), strict=False)
    (output,) = [n for n in ep.graph.nodes if n.op == "output"]
    loss = output.args[0][0].meta["val"]
    assert loss.shape == () and loss.is_floating_point()
    # dropout p == 0 must leave no op behind (the graph is captured in training mode).
    assert not any("dropout" in str(n.target) for n in ep.graph.nodes)


# --------------------------------------------------------------------------- presets


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        preset("nope")
    for name in ("gpt2-small", "llama-tiny", "mixtral-8x7b"):
        assert name in str(info.value)
    with pytest.raises(ValueError):
        build("nope")


def test_build_overrides_and_validation() -> None:
    model = build("gpt-tiny", n_layer=3)
    assert model.config.n_layer == 3 and len(model.transformer.h) == 3
    assert PRESETS["gpt-tiny"].n_layer == 2  # presets are frozen, overrides copy
    with pytest.raises(TypeError):
        build("gpt-tiny", not_a_field=1)
    with pytest.raises(ValueError):
        build("gpt-tiny", n_head=5)  # 64 is not divisible by 5
    with pytest.raises(ValueError):
        build("llama-tiny", n_kv_head=3)


def test_meta_context_manager_builds_without_storage() -> None:
    with torch.device("meta"):
        model = GPT(preset("gpt2-xl"))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == _formula_count(preset("gpt2-xl"))


# --------------------------------------------------------------------------- tensor-parallel shape


def test_llama_attention_runs_on_a_head_shard() -> None:
    """Heads are reshaped with -1, so a column shard of wq/wk/wv (row shard of wo) runs as is and
    the shards' outputs sum to the full output, as in Megatron-style tensor parallelism."""
    torch.manual_seed(0)
    D, n_head, n_kv_head, tp, T = 32, 4, 2, 2, 5
    full = Attention(dim=D, n_head=n_head, n_kv_head=n_kv_head).double()
    x = torch.randn(2, T, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(T, D // n_head, 10000.0, dtype=torch.float64)
    total = torch.zeros(2, T, D, dtype=torch.float64)
    for r in range(tp):
        shard = Attention(dim=D, n_head=n_head, n_kv_head=n_kv_head).double()
        with torch.no_grad():
            for name in ("wq", "wk", "wv"):
                w = getattr(full, name).weight.chunk(tp, dim=0)[r]
                getattr(shard, name).weight = torch.nn.Parameter(w.clone())
            shard.wo.weight = torch.nn.Parameter(full.wo.weight.chunk(tp, dim=1)[r].clone())
            total += shard(x, cos, sin)
    torch.testing.assert_close(total, full(x, cos, sin))


def test_gpt_attention_runs_on_a_head_shard() -> None:
    """Same for GPT's fused c_attn when each shard holds its slice of the q, k and v blocks."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=8, vocab_size=16, bias=False)
    full = GPT(cfg).double().transformer.h[0].attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    tp, total = 2, torch.zeros(2, 5, 32, dtype=torch.float64)
    for r in range(tp):
        shard = GPT(cfg).double().transformer.h[0].attn
        q, k, v = full.c_attn.weight.chunk(3, dim=0)
        local = torch.cat([w.chunk(tp, dim=0)[r] for w in (q, k, v)], dim=0)
        with torch.no_grad():
            shard.c_attn.weight = torch.nn.Parameter(local.clone())
            shard.c_proj.weight = torch.nn.Parameter(full.c_proj.weight.chunk(tp, dim=1)[r].clone())
            total += shard(x)
    torch.testing.assert_close(total, full(x))
