"""Activation memory kept for backward per block under no, selective and full recomputation, measured.

One process, gpt-small-test (4 blocks, C = 128, T = 64, vocab 256) at batch 16 x 64 tokens, fp32: for
each mode every block runs through the same `checkpoint_block` the generated code calls, and
`autoshard.runtime.recompute.saved_activation_bytes_by_block` counts the storages still alive after
forward (what autograd and checkpoint hold for backward), attributed to the block that created them.
The cost model's activation estimate can be compared with these numbers.

Run: PYTHONPATH=. python benchmarks/recompute_memory.py  -> benchmarks/results/recompute_memory.json
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from autoshard.models import build
from autoshard.runtime.recompute import OUTSIDE, saved_activation_bytes_by_block

MODEL = "gpt-small-test"
BATCH, SEQ = 16, 64
MODES = ("none", "selective", "full")
RESULTS = Path(__file__).parent / "results" / "recompute_memory.json"


def main() -> dict:
    torch.manual_seed(0)
    model = build(MODEL, device="cpu")
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    targets = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    residual = BATCH * SEQ * cfg.n_embd * 4  # one (B, T, C) fp32 tensor, bytes
    modes = {}
    for mode in MODES:
        by_block = saved_activation_bytes_by_block(model, (idx, targets), mode)
        blocks = {k: v for k, v in by_block.items() if k != OUTSIDE}
        modes[mode] = {
            "total_bytes": sum(by_block.values()),
            "blocks_bytes": sum(blocks.values()),
            "outside_blocks_bytes": by_block[OUTSIDE],
            "per_block_bytes": blocks,
            "per_block_in_residuals": {k: round(v / residual, 2) for k, v in blocks.items()},
        }
        print(f"{mode:>9}: {sum(by_block.values()) / 2**20:7.2f} MiB total, per block "
              f"{[round(v / 2**20, 2) for v in blocks.values()]} MiB ({modes[mode]['per_block_in_residuals']} residuals)")
    result = {
        "model": MODEL,
        "batch": BATCH,
        "seq": SEQ,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "dtype": "float32",
        "residual_bytes": residual,
        "method": "storages created during forward and alive after it (weak refs via a dispatch mode), "
                  "parameters and inputs excluded, views counted once, attributed to the creating block",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "modes": modes,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
