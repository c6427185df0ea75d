"""Mixture-of-Experts transformer: LLaMA blocks whose MLP is a top-k routed set of SwiGLU experts.

Routing is GShard/Switch-style capacity-based dispatch, written entirely with dense static-shape
tensors (one-hot masks, cumsum, einsum) so that capture on meta tensors yields one graph whatever
the router decides, and so that expert parallelism can later shard the expert dim (dim 0) of the
batched expert weights and of the (E, C, dim) dispatched activations.

Dispatch, for S = B*T tokens, E experts, top-k routing and capacity C:

1. ``probs = softmax(router(x))`` (S, E); each token picks its ``top_k`` experts. The combine
   weights of the chosen experts are renormalised to sum to one when ``top_k > 1``; with
   ``top_k == 1`` (Switch) the raw probability is kept, otherwise the router would get no gradient
   from the task loss.
2. Each (choice, token) pair gets a slot in its expert's buffer by a cumsum over the one-hot expert
   masks, in GShard priority order: every token's first choice (in token order) before any
   token's second choice, and so on. Pairs whose slot is ``>= C`` are dropped: they contribute
   nothing, and the gates of a token's surviving choices are *not* renormalised again. A token
   with all its choices dropped gets a zero MoE output (the residual connection carries it).
3. ``dispatch`` (S, E, C) is 0/1; ``combine`` (S, E, C) holds the gates. Experts run as batched
   einsums over (E, C, dim); outputs are gathered back with ``combine``.

Capacity is ``C = ceil(capacity_factor * top_k * S / E)``, clamped to ``[1, S]``; since a token's
top-k experts are distinct, ``C = S`` (e.g. ``capacity_factor >= E / top_k``) never drops.

Two consequences of capacity dropping worth knowing: a token's output depends on the other tokens
in the batch, and because later tokens' first choices outrank earlier tokens' second choices, a
*future* token can cause an earlier token's second choice to be dropped. The model is strictly
causal only when nothing is dropped.

The auxiliary load-balancing loss is Switch's ``E * sum_e f_e * P_e``, where ``f_e`` is the
fraction of the S*top_k routing assignments that chose expert ``e`` (before capacity dropping) and
``P_e`` the mean router probability of ``e``. It equals 1 under perfectly uniform routing. The
model averages it over layers (so ``aux_loss_coef`` means the same at any depth) and returns
``cross_entropy + aux_loss_coef * mean_aux``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import RMSNorm, count_parameters, rope_cos_sin
from .llama import Attention, init_llama_style

__all__ = ["MoEConfig", "MoETransformer", "MoELayer", "MoEBlock"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """Hyper-parameters of :class:`MoETransformer`; attention fields mean what they do in LLaMA."""

    n_layer: int
    n_head: int
    n_kv_head: int
    dim: int
    ffn_hidden: int  # hidden size of each expert's SwiGLU
    vocab_size: int
    max_seq_len: int
    n_experts: int
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_head != 0:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        if (self.dim // self.n_head) % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim // self.n_head}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts with static-shape capacity dispatch. Returns (output, aux_loss).

    Expert weights are batched parameters with the expert dim first: ``w1``/``w3`` (E, dim, hidden)
    and ``w2`` (E, hidden, dim), i.e. ``x @ w`` orientation (no transpose), for expert parallelism.
    """

    def __init__(
        self, *, dim: int, hidden: int, n_experts: int, top_k: int, capacity_factor: float
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # up
        # Own parameters are drawn before the router's: the same order as `model.modules()` (a parent
        # before its children), so replaying each module's reset_parameters() in that order reproduces
        # a CPU build exactly (runtime/materialize.py builds meta models shard by shard that way).
        self.reset_parameters()
        self.router = nn.Linear(dim, n_experts, bias=False)

    def reset_parameters(self) -> None:
        """The construction-time draw of the expert weights (init_weights rescales w2 afterwards)."""
        self.init_expert_weights(std=0.02, residual_std=0.02)

    def init_expert_weights(self, *, std: float, residual_std: float) -> None:
        """w1/w3 ~ N(0, std); the residual output projection w2 ~ N(0, residual_std)."""
        with torch.no_grad():
            nn.init.normal_(self.w1, mean=0.0, std=std)
            nn.init.normal_(self.w2, mean=0.0, std=residual_std)
            nn.init.normal_(self.w3, mean=0.0, std=std)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert: ceil(capacity_factor * top_k * tokens / E), clamped to [1, tokens]."""
        c = math.ceil(self.capacity_factor * self.top_k * num_tokens / self.n_experts)
        return max(1, min(c, num_tokens))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        S, E, K = B * T, self.n_experts, self.top_k
        C = self.capacity(S)
        tokens = x.reshape(S, D)  # (S, D)

        probs = F.softmax(self.router(tokens), dim=-1)  # (S, E)
        gates, chosen = probs.topk(K, dim=-1)  # (S, K), (S, K)
        if K > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)

        # One-hot masks by comparison with arange: static shapes, fine on meta tensors.
        expert_ids = torch.arange(E, device=x.device)
        choice_mask = chosen.t().unsqueeze(-1) == expert_ids  # (K, S, E): choice k of token s -> e
        choice_mask_i = choice_mask.long()
        # Running count per expert over (choice, token) in GShard priority: all first choices, then
        # all second choices, ... The count at a pair's own position, minus one, is its slot.
        slot = choice_mask_i.flatten(0, 1).cumsum(dim=0).view(K, S, E) - 1  # (K, S, E)
        slot = (slot * choice_mask_i).sum(dim=-1)  # (K, S): slot of each choice in its expert
        # Comparing with arange(C) both one-hots the slot and drops slot >= C (no match).
        slot_mask = slot.unsqueeze(-1) == torch.arange(C, device=x.device)  # (K, S, C)

        expert_onehot = choice_mask.to(x.dtype)  # (K, S, E)
        slot_onehot = slot_mask.to(x.dtype)  # (K, S, C)
        dispatch = torch.einsum("kse,ksc->sec", expert_onehot, slot_onehot)  # (S, E, C)
        weighted = expert_onehot * gates.t().unsqueeze(-1)  # (K, S, E)
        combine = torch.einsum("kse,ksc->sec", weighted, slot_onehot)  # (S, E, C)

        expert_in = torch.einsum("sec,sd->ecd", dispatch, tokens)  # (E, C, D)
        h = F.silu(torch.einsum("ecd,edh->ech", expert_in, self.w1))  # (E, C, H)
        h = h * torch.einsum("ecd,edh->ech", expert_in, self.w3)  # (E, C, H)
        expert_out = torch.einsum("ech,ehd->ecd", h, self.w2)  # (E, C, D)
        out = torch.einsum("sec,ecd->sd", combine, expert_out)  # (S, D)

        # Switch load-balancing loss; f is piecewise constant, so its gradient flows through P.
        fraction = expert_onehot.mean(dim=(0, 1))  # (E,) sums to 1
        mean_prob = probs.mean(dim=0)  # (E,)
        aux_loss = E * (fraction * mean_prob).sum()
        return out.view(B, T, D), aux_loss


class MoEBlock(nn.Module):
    """LLaMA block with the MLP replaced by :class:`MoELayer`. Returns (x, aux_loss)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(dim=config.dim, n_head=config.n_head, n_kv_head=config.n_kv_head)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = MoELayer(
            dim=config.dim,
            hidden=config.ffn_hidden,
            n_experts=config.n_experts,
            top_k=config.top_k,
            capacity_factor=config.capacity_factor,
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        moe_out, aux_loss = self.feed_forward(self.ffn_norm(x))
        return x + moe_out, aux_loss


class MoETransformer(nn.Module):
    """Decoder-only MoE language model (Mixtral-shaped) with an untied output head."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(MoEBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """LLaMA-style init for the dense parts, then each layer's experts, from the torch RNG."""
        init_llama_style(self, self.config.n_layer)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for layer in self.layers:
            layer.feed_forward.init_expert_weights(std=0.02, residual_std=residual_std)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T). Returns logits (B, T, vocab), or cross-entropy + coef * mean aux loss."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        h = self.tok_embeddings(idx)  # (B, T, dim)
        cos, sin = rope_cos_sin(
            T, self.config.head_dim, self.config.rope_theta, device=idx.device, dtype=h.dtype
        )  # each (T, hs)
        aux_losses = []
        for layer in self.layers:
            h, aux = layer(h, cos, sin)
            aux_losses.append(aux)
        logits = self.output(self.norm(h))  # (B, T, vocab)
        if targets is None:
            return logits
        ce = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return ce + self.config.aux_loss_coef * torch.stack(aux_losses).mean()
