"""The generated code of a tensor-parallel GPT block reads like Megatron's."""

from __future__ import annotations

import re

import torch

import autoshard
from autoshard.models.gpt import GPTConfig
from autoshard.passes.codegen import codegen

from test_planner import HintedBlock


def test_tensor_parallel_gpt_block_code_reads_like_megatron() -> None:
    config = GPTConfig(n_layer=1, n_head=32, n_embd=4096, block_size=2048, vocab_size=50304)
    with torch.device("meta"):
        model = HintedBlock(config, replicate_residual=True)
    x = torch.empty(1, 2048, 4096, device="meta")
    ir = autoshard.capture(model, (x,))
    code = codegen(ir, autoshard.plan_graph(ir, "a100-80g:8", mesh={"tp": 8}, precision="fp32")).code  # 32 MiB = 2048 x 4096 x 4 B
    comments = [line.strip() for line in code.splitlines() if line.strip().startswith("#")]
    forward = [c for c in comments if not c.startswith("# gradient")]
    # Megatron's g: one all-reduce of the row-parallel output per attention and per MLP, nothing else
    assert forward == ["# (P,) -> (R,): all_reduce over tp, 32 MiB"] * 2
    # Megatron's f: identity forward, all-reduce of the input gradient in backward, before each
    # column-parallel matmul
    backward = [c for c in comments if c.startswith("# gradient")]
    assert backward == ["# gradient -> (R,): backward: all_reduce over tp, 32 MiB"] * 2
    assert len(re.findall(r"aten\.linear\.default", code)) == 4  # the four sharded matmuls, local
    assert "local_chunk" in code  # q, k, v split locally from the column-parallel fused projection
