"""LLaMA-style decoder-only transformer: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Names follow Meta's reference implementation (``tok_embeddings``, ``layers.{i}.attention.wq``,
``layers.{i}.feed_forward.w1``, ``norm``, ``output``), which is also torchtitan's layout, so
tensor-parallel plans written for those apply here. RoPE uses the half-split convention (see
:func:`autoshard.models.common.rope_cos_sin`); Meta's checkpoints use the interleaved one, which
differs only by a fixed permutation of the rows of ``wq`` and ``wk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import RMSNorm, apply_rope, count_parameters, rope_cos_sin

__all__ = [
    "LlamaConfig",
    "Llama",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "init_llama_style",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class LlamaConfig:
    """Hyper-parameters of :class:`Llama`. ``ffn_hidden`` is explicit (no multiple-of rounding)."""

    n_layer: int
    n_head: int
    n_kv_head: int  # < n_head: grouped-query attention; == n_head: plain multi-head attention
    dim: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class Attention(nn.Module):
    """Causal grouped-query attention with rotary positions on q and k.

    Each group of ``n_head // n_kv_head`` consecutive query heads shares one key/value head:
    query head ``h`` reads kv head ``h // n_rep``, which is what ``repeat_interleave`` on the head
    dim produces. Head counts are inferred with ``-1`` so a column shard of wq/wk/wv (holding
    ``n_head/tp`` query and ``n_kv_head/tp`` kv heads, same ratio) runs unchanged.
    """

    def __init__(self, *, dim: int, n_head: int, n_kv_head: int) -> None:
        super().__init__()
        self.head_dim = dim // n_head
        self.n_rep = n_head // n_kv_head
        self.wq = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hs)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=2)  # (B, T, nh, hs)
            v = v.repeat_interleave(self.n_rep, dim=2)  # (B, T, nh, hs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020): w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-RMSNorm block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(dim=config.dim, n_head=config.n_head, n_kv_head=config.n_kv_head)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(dim=config.dim, hidden=config.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


def init_llama_style(model: nn.Module, n_layer: int) -> None:
    """Shared LLaMA/MoE initialisation: N(0, 0.02) everywhere, residual outputs scaled, norms one.

    The residual output projections (attention ``wo`` and feed-forward ``w2``) get std
    0.02/sqrt(2*n_layer) as in GPT-2, so the residual stream's variance does not grow with depth.
    Modules are visited in registration order, so the result is a function of the RNG state only.
    Only ``nn.Linear``, ``nn.Embedding`` and :class:`RMSNorm` are touched; a model with other
    parameters (the MoE experts) initialises those itself afterwards.
    """
    std = 0.02
    residual_std = std / math.sqrt(2 * n_layer)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                out_proj = name.endswith(".wo") or name.endswith(".w2")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if out_proj else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()


class Llama(nn.Module):
    """LLaMA language model with an untied output head."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Deterministic re-initialisation from the torch RNG; see :func:`init_llama_style`."""
        init_llama_style(self, self.config.n_layer)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, vocab), or the mean cross-entropy loss."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        h = self.tok_embeddings(idx)  # (B, T, dim)
        cos, sin = rope_cos_sin(
            T, self.config.head_dim, self.config.rope_theta, device=idx.device, dtype=h.dtype
        )  # each (T, hs)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.output(self.norm(h))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
