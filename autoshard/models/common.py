"""Pieces shared by the reference models: RMSNorm, rotary embeddings, parameter counting.

Everything here is written so that a model using it stays capturable by ``torch.export`` on meta
tensors and shardable with DTensor tensor parallelism: no buffers (RoPE tables are rebuilt from
``torch.arange`` on every forward, so a model materialised from meta needs no fix-up), no Python
control flow on tensor values, and no assumption about how many heads the local shard holds.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RMSNorm", "rope_cos_sin", "apply_rope", "count_parameters"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) with a learned scale and no bias.

    The statistic is computed in float32 and cast back, because the mean of squares of bf16
    activations loses too much precision; the scale is applied in the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for rotary position embeddings, each of shape (seq_len, head_dim).

    Convention: "half-split" (GPT-NeoX / Hugging Face Llama). Channel ``i`` of a head is paired
    with channel ``i + head_dim/2``, and pair ``i`` rotates by angle ``t * theta**(-2i/head_dim)``
    at position ``t``. Both halves of a table row therefore hold the same angles.

    The tables are built from ``torch.arange`` rather than cached in a buffer so that capture on
    meta tensors and later materialisation need no special handling; the cost is a few tiny ops
    per forward. Angles are computed in float32 (float64 if ``dtype`` is float64) and only the
    final tables are cast to ``dtype``.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    # Never below float32: bf16 angles would be off by whole radians at long positions.
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=angle_dtype) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hs/2,)
    positions = torch.arange(seq_len, device=device, dtype=angle_dtype)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) on the two halves of the last dim: multiplication by i for each pair."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys laid out as (B, T, n_heads, head_dim) by their positions.

    ``cos``/``sin`` come from :func:`rope_cos_sin` with shape (T, head_dim); they broadcast over
    batch and heads, so this works unchanged on a tensor-parallel shard holding fewer heads.
    """
    cos = cos.unsqueeze(1)  # (T, 1, hs)
    sin = sin.unsqueeze(1)  # (T, 1, hs)
    return x * cos + _rotate_half(x) * sin


def count_parameters(module: nn.Module) -> int:
    """Number of unique parameters; a tied weight reachable from two modules counts once."""
    return sum(p.numel() for p in module.parameters())  # parameters() de-duplicates by identity
