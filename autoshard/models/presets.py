"""Named model configurations, from test-sized to published sizes, and a builder.

Published sizes follow their papers / releases: GPT-2 (Radford et al. 2019, 1024-token context,
50257-token vocabulary), GPT-3 (Brown et al. 2020, Table 2.1, 2048-token context), Llama 2 and 3
(Meta model cards / params.json), Mixtral 8x7B (Jiang et al. 2024). Large presets are meant to be
built on the meta device, which allocates nothing.

One deviation: GPT-3 "XL" (1.3B) is listed in Table 2.1 with d_model 2048, 24 heads and d_head 128,
which are inconsistent (24 * 128 = 3072). ``gpt3-1.3b`` keeps d_model 2048 and d_head 128, so it
has 16 heads; the parameter count does not depend on the head count.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .moe import MoEConfig, MoETransformer

__all__ = ["ModelConfig", "PRESETS", "preset", "build", "model_class"]

ModelConfig = GPTConfig | LlamaConfig | MoEConfig


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    return GPTConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257
    )


def _gpt3(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    return GPTConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=2048, vocab_size=50257
    )


PRESETS: dict[str, ModelConfig] = {
    # GPT: test sizes, then GPT-2 and GPT-3.
    "gpt-tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128),
    "gpt-small-test": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256),
    "gpt2-small": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt3-1.3b": _gpt3(24, 16, 2048),  # see the module docstring about the head count
    "gpt3-175b": _gpt3(96, 96, 12288),
    # LLaMA.
    "llama-tiny": LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=2, dim=64, ffn_hidden=128, vocab_size=128, max_seq_len=32
    ),
    "llama2-7b": LlamaConfig(
        n_layer=32, n_head=32, n_kv_head=32, dim=4096, ffn_hidden=11008, vocab_size=32000,
        max_seq_len=4096,
    ),
    "llama3-8b": LlamaConfig(
        n_layer=32, n_head=32, n_kv_head=8, dim=4096, ffn_hidden=14336, vocab_size=128256,
        max_seq_len=8192, rope_theta=500000.0,
    ),
    # Mixture of experts.
    "moe-tiny": MoEConfig(
        n_layer=2, n_head=4, n_kv_head=2, dim=64, ffn_hidden=64, vocab_size=128, max_seq_len=32,
        n_experts=4, top_k=2,
    ),
    "mixtral-8x7b": MoEConfig(
        n_layer=32, n_head=32, n_kv_head=8, dim=4096, ffn_hidden=14336, vocab_size=32000,
        max_seq_len=32768, n_experts=8, top_k=2, rope_theta=1e6,
    ),
}  # fmt: skip

_MODEL_CLASSES: dict[type, type[nn.Module]] = {
    GPTConfig: GPT,
    LlamaConfig: Llama,
    MoEConfig: MoETransformer,
}


def preset(name: str) -> ModelConfig:
    """The config registered under ``name``; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown model preset {name!r}; valid presets: {valid}") from None


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class a config builds."""
    return _MODEL_CLASSES[type(config)]


def build(name: str, *, device: torch.device | str = "meta", **overrides: object) -> nn.Module:
    """Build preset ``name`` on ``device`` (meta by default: no memory), overriding config fields.

    ``overrides`` go through :func:`dataclasses.replace`, so an unknown field raises TypeError and
    the config's own validation runs again. On a real device the weights come from the current
    torch RNG; seed it first for reproducibility.
    """
    config = dataclasses.replace(preset(name), **overrides)
    with torch.device(device):
        return model_class(config)(config)
