"""Losses whose value depends on how the batch is split, on 4 real gloo ranks: equal to one device.

tests/dist/loss_semantics.py trains a padded causal-LM batch (Hugging Face GPT-2: rows of different
lengths, `-100` labels), a masked-LM batch (BERT) and a sum-reduced loss (nanoGPT, reduction="sum")
with the user's SGD around `model.step`, under dp4, dp2 x tp2, pp2 x dp2 (1F1B) and ZeRO-3 over dp4,
each with several micro-batches, and compares every step's loss, the first gradients and the final
parameters with one device. Before the loss reduction was read from the graph, the token means
averaged per-micro-batch means (parameters off by ~1e-3) and the sum lost a factor of the
micro-batch count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autoshard.runtime.launch import run_local

DIST = Path(__file__).parent / "dist"
CASES = [f"{kind}/{plan}" for kind in ("causal", "masked", "sum")
         for plan in ("dp4-mb2", "dp2xtp2-mb2", "pp2xdp2-1f1b", "dp4-zero3-mb2")]  # fmt: skip

pytestmark = pytest.mark.slow


def test_padded_masked_and_summed_losses_match_one_device_on_4_ranks() -> None:
    run = run_local(DIST / "loss_semantics.py", 4, *CASES, timeout=1200)
    failures = [
        f"rank {rank} {case}: {v['problems']}"
        for rank, verdicts in enumerate(run.results)
        for case, v in verdicts.items()
        if not v["ok"]
    ]
    assert not failures, "\n".join(failures)
    for case in CASES:
        verdict = run.results[0][case]
        assert verdict["micro_batches"] > 1, case  # the split the loss must survive
        assert ("token mean" if not case.startswith("sum") else "sum") in verdict["reduction"], verdict["reduction"]
