"""Reference single-device models (GPT, LLaMA, Mixture-of-Experts) and their named presets.

Each model is a plain ``nn.Module`` built from a frozen config, constructible on the meta device,
with ``forward(idx, targets=None)`` returning logits (B, T, vocab) or a scalar training loss.
"""

from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .moe import MoEConfig, MoETransformer
from .presets import PRESETS, ModelConfig, build, model_class, preset

__all__ = [
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "MoEConfig",
    "MoETransformer",
    "ModelConfig",
    "PRESETS",
    "build",
    "model_class",
    "preset",
]
