"""A zoo of models nobody here wrote, for tests and benchmarks: Hugging Face `transformers` models built
from configs (random init, nothing downloaded) and a nanoGPT-style model written the way nanoGPT is.

Every entry has a tiny config (trains on 4 CPU ranks in seconds) and a large one (7B-class, GPT-2 XL,
BERT-large, T5-large, ViT-L, ResNet-152) for planning on meta. `inputs(entry, batch)` returns the
keyword arguments a user would pass (`input_ids=..., labels=...`, `pixel_values=..., labels=...`;
causal-LM batches right-padded with an attention mask and `-100` labels, masked-LM batches labelled
on about 15% of tokens):
the models are called exactly as their own documentation calls them, with no wrapper.

Dropout is 0 everywhere, so a run can be compared with one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ENTRIES", "Entry", "NanoGPT", "build", "comparison", "inputs", "names"]

VOCAB = 128
SEQ = 16
# how the zoo is compared with one device (tests/dist/zoo_matches.py, tests/test_zoo_conditioning.py):
# COMPARE_STEPS SGD steps at COMPARE_LR on batches of COMPARE_BATCH rows, in each entry's compare_dtype,
# to COMPARE_TOL (relative and absolute)
COMPARE_LR = 0.1
COMPARE_STEPS = 3
COMPARE_BATCH = 8
COMPARE_TOL = 1e-5


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """One zoo model: how to build it at a size, and what kind of batch it takes."""

    name: str
    make: Callable[[bool], nn.Module]  # make(large) -> the model (built on the current default device)
    kind: str  # "causal-lm" | "masked-lm" | "seq2seq" | "image"
    blocks: bool = True  # has repeated blocks a pipeline can cut between
    large_seq: int = 2048
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # the dtype the few-step comparison with one device runs in: fp32, unless rounding alone moves this
    # model's fp32 run past the comparison's tolerance (tests/test_zoo_conditioning.py checks fp32 entries)
    compare_dtype: torch.dtype = torch.float32


def _tf() -> Any:
    import transformers

    return transformers


def _gpt2(large: bool) -> nn.Module:
    t = _tf()
    size = dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024) if large else dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=SEQ
    )
    cfg = t.GPT2Config(vocab_size=50257 if large else VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **size)
    return t.GPT2LMHeadModel(cfg)


def _llama_like(cls_cfg: str, cls_model: str, large: bool, **extra: Any) -> nn.Module:
    t = _tf()
    size = dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
    ) if large else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ * 4,
    )
    cfg = getattr(t, cls_cfg)(attention_dropout=0.0, **size, **extra)
    return getattr(t, cls_model)(cfg)


def _llama(large: bool) -> nn.Module:
    return _llama_like("LlamaConfig", "LlamaForCausalLM", large)


def _mistral(large: bool) -> nn.Module:
    # a sliding window shorter than the tiny sequence, so the window mask really cuts
    return _llama_like("MistralConfig", "MistralForCausalLM", large, sliding_window=4096 if large else SEQ // 2)


def _qwen2(large: bool) -> nn.Module:
    return _llama_like("Qwen2Config", "Qwen2ForCausalLM", large)


def _mixtral(large: bool) -> nn.Module:
    t = _tf()
    size = dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, num_local_experts=8, max_position_embeddings=4096,
    ) if large else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=4, max_position_embeddings=SEQ * 4,
    )
    cfg = t.MixtralConfig(num_experts_per_tok=2, attention_dropout=0.0, router_aux_loss_coef=0.0, **size)
    return t.MixtralForCausalLM(cfg)


def _neox(large: bool) -> nn.Module:
    t = _tf()
    size = dict(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=50432, max_position_embeddings=2048) if large else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=SEQ * 4)
    cfg = t.GPTNeoXConfig(attention_dropout=0.0, hidden_dropout=0.0, **size)
    return t.GPTNeoXForCausalLM(cfg)


def _bert(large: bool) -> nn.Module:
    t = _tf()
    size = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                vocab_size=30522, max_position_embeddings=512) if large else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=SEQ * 4)
    cfg = t.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **size)
    return t.BertForMaskedLM(cfg)


def _t5(large: bool) -> nn.Module:
    t = _tf()
    size = dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16, d_kv=64, vocab_size=32128) if large else dict(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB)
    # a start token other than the padding id: _shift_right writes it in place into a tensor of zeros,
    # and with 0 a lost write would be invisible
    cfg = t.T5Config(dropout_rate=0.0, decoder_start_token_id=1, pad_token_id=0, **size)
    return t.T5ForConditionalGeneration(cfg)


def _vit(large: bool) -> nn.Module:
    t = _tf()
    size = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=16) if large else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)
    cfg = t.ViTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10, **size)
    return t.ViTForImageClassification(cfg)


def _resnet(large: bool) -> nn.Module:
    t = _tf()
    size = dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 8, 36, 3],
                layer_type="bottleneck") if large else dict(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="basic")
    cfg = t.ResNetConfig(num_labels=10, **size)
    return t.ResNetForImageClassification(cfg)


# ---- nanoGPT, written the way nanoGPT writes it -------------------------------------------------------


@dataclass
class NanoConfig:
    block_size: int = SEQ
    vocab_size: int = VOCAB
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanoConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: NanoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: NanoConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's model.py GPT, trimmed of generation: returns `(logits, loss)`."""

    def __init__(self, config: NanoConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def _nanogpt(large: bool) -> nn.Module:
    cfg = NanoConfig(block_size=1024, vocab_size=50304, n_layer=48, n_head=25, n_embd=1600) if large else NanoConfig()
    return NanoGPT(cfg)


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(name="gpt2", make=_gpt2, kind="causal-lm", large_seq=1024),
        Entry(name="llama", make=_llama, kind="causal-lm"),
        Entry(name="mistral", make=_mistral, kind="causal-lm"),
        Entry(name="qwen2", make=_qwen2, kind="causal-lm"),
        Entry(name="gpt-neox", make=_neox, kind="causal-lm"),
        Entry(name="mixtral", make=_mixtral, kind="causal-lm"),
        Entry(name="bert", make=_bert, kind="masked-lm", large_seq=512),
        Entry(name="t5", make=_t5, kind="seq2seq", blocks=False, large_seq=512,
              notes="encoder-decoder: two block stacks"),
        Entry(name="vit", make=_vit, kind="image"),
        # train-mode BatchNorm on 8 small images amplifies rounding: one device's own fp32 run is 3e-3
        # from its fp64 run after 3 SGD steps at lr 0.1, its first gradients 2.6e-5; in fp64 a correct
        # distributed run agrees with one device to 1e-14
        Entry(name="resnet", make=_resnet, kind="image", notes="BatchNorm", compare_dtype=torch.float64),
        Entry(name="nanogpt", make=_nanogpt, kind="nanogpt", large_seq=1024),
    )
}


def names() -> list[str]:
    return list(ENTRIES)


def comparison(name: str, batch: int, steps: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    """`name`'s model and `steps` batches (seeds 1, 2, ...) in the entry's `compare_dtype`."""
    dtype = ENTRIES[name].compare_dtype
    model = build(name).to(dtype)
    batches = [
        {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs(name, batch, seed=1 + s).items()}
        for s in range(steps)
    ]
    return model, batches


def build(name: str, *, large: bool = False, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The zoo model `name`, with random weights from `seed` (on meta: no memory)."""
    entry = ENTRIES[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model = entry.make(large)
    return model


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """1 on the real tokens of each row, 0 on its right padding: row r has a different length, from the
    full sequence down to a quarter of it, so micro-batches and ranks hold different numbers of labels."""
    lengths = [seq - (r * 5) % (seq * 3 // 4) for r in range(batch)]
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()


def inputs(name: str, batch: int, *, large: bool = False, device: str = "cpu", seed: int = 1) -> dict[str, Any]:
    """The keyword arguments a user passes this model for one training batch of `batch` rows."""
    entry = ENTRIES[name]
    g = torch.Generator().manual_seed(seed)
    seq = entry.large_seq if large else SEQ
    vocab = 32000 if large else VOCAB

    def ids(*shape: int) -> torch.Tensor:
        if device == "meta":
            return torch.zeros(shape, dtype=torch.long, device="meta")
        return torch.randint(0, vocab, shape, generator=g)

    if entry.kind == "causal-lm":  # right-padded as a collator pads: rows of different lengths
        input_ids = ids(batch, seq)
        if device == "meta":
            return {"input_ids": input_ids, "labels": ids(batch, seq), "use_cache": False}
        mask = padding_mask(batch, seq)
        input_ids = input_ids.masked_fill(mask == 0, 0)
        labels = input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "use_cache": False}
    if entry.kind == "nanogpt":
        return {"idx": ids(batch, seq), "targets": ids(batch, seq)}
    if entry.kind == "masked-lm":
        labels = ids(batch, seq)
        if device != "meta":  # about 15% of tokens carry a label, the rest are ignored (-100)
            labels = torch.where(torch.rand(batch, seq, generator=g) < 0.15, labels, torch.full_like(labels, -100))
            labels[:, 0] = ids(batch)  # at least one label per row
        return {"input_ids": ids(batch, seq), "labels": labels}
    if entry.kind == "seq2seq":
        return {"input_ids": ids(batch, seq), "labels": ids(batch, seq // 2), "use_cache": False}
    size = 224 if large else 32
    if device == "meta":
        pixels = torch.zeros(batch, 3, size, size, device="meta")
        labels = torch.zeros(batch, dtype=torch.long, device="meta")
    else:
        pixels = torch.randn(batch, 3, size, size, generator=g)
        labels = torch.randint(0, 10, (batch,), generator=g)
    return {"pixel_values": pixels, "labels": labels}
