"""GPT-2/GPT-3 style decoder-only transformer, shaped like nanoGPT.

Module and parameter names follow nanoGPT (``transformer.h.{i}.attn.c_attn`` ...) so that sharding
plans and checkpoints written against that layout apply here. Differences from nanoGPT are all in
service of capture and sharding: forward always returns full (B, T, vocab) logits, dropout is not
called at all when its probability is zero, and attention reshapes heads with ``-1`` so a
tensor-parallel shard holding a fraction of the heads runs the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import count_parameters

__all__ = ["GPTConfig", "GPT"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    """Hyper-parameters of :class:`GPT`. The MLP width is fixed at ``4 * n_embd`` as in GPT-2/3."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # maximum sequence length (size of the learned position table)
    vocab_size: int
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that leaves no op in a captured graph when it would be the identity."""
    if p > 0.0 and training:
        return F.dropout(x, p=p, training=True)
    return x


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # chunk(3) rather than split(n_embd): on a column shard of c_attn that keeps q, k, v blocks
        # together, the local width is 3 * n_embd / tp and only the thirds are meaningful.
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # each (B, T, C)
        # -1 heads: a tensor-parallel shard holds n_head / tp of them.
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return _dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> GELU -> d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.c_proj(self.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT language model with learned positions and an output head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter ``transformer.wte.weight``.

        Moving a module off the meta device (``to_empty``) replaces each module's Parameter
        separately and so unties them; :meth:`to_empty` and :meth:`init_weights` call this again.
        """
        self.lm_head.weight = self.transformer.wte.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GPT:
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from the current torch RNG (GPT-2 / nanoGPT scheme).

        Weights ~ N(0, 0.02); residual output projections (``c_proj``) get std 0.02/sqrt(2*n_layer)
        so the residual stream's variance does not grow with depth; biases zero; norms one.
        Deterministic given the RNG state, and a no-op on meta tensors.
        """
        self.tie_weights()
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if name == "lm_head":
                continue  # its weight is wte's, initialised as an embedding below
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("c_proj")
                module_std = residual_std if is_residual_out else std
                nn.init.normal_(module.weight, mean=0.0, std=module_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Unique parameters, including the position table; the tied head counts once."""
        return count_parameters(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, vocab), or the mean cross-entropy loss."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = _dropout(x, self.config.dropout, self.training)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
