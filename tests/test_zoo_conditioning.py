"""The zoo comparison with one device can tell a wrong program from rounding.

tests/dist/zoo_matches.py holds a distributed run to 1e-5 of the single-device fp32 run after a few SGD
steps. That only means something if the single-device run is itself that close to the exact answer: a
model whose training amplifies rounding (train-mode BatchNorm on a few images, at a large learning rate)
differs from itself by more than the tolerance as soon as the order of a sum changes, and a correct
distributed program then looks wrong. So, for each zoo entry compared in fp32, the fp32 run must pass
the comparison itself against the same run in fp64 (the exact answer to far more digits): losses, first
gradients and the final state dict, under the same elementwise criterion (|a - b| <= atol + rtol |b|,
rtol = atol = the tolerance). Its rounding is about 1e-7 for the transformers of the zoo.

ResNet is compared in fp64 (`compare_dtype`): train-mode BatchNorm on 8 small images (and max-pool
near-ties) amplify rounding, so its fp32 run is 3e-3 from fp64 after 3 SGD steps at lr 0.1 and its first
gradients 2.6e-5 (2.6 times the tolerance); fp32 could not tell a wrong program from rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

import zoo
from autoshard.runtime.reference import single_device_run

pytestmark = pytest.mark.slow


def _double(batch: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def _as_fp64_model(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model).double()
    if hasattr(model, "set_experts_implementation"):  # grouped_mm has no fp64 kernel on cpu
        model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.ENTRIES[n].compare_dtype == torch.float32])
def test_fp32_single_device_run_passes_the_comparison_against_fp64(name: str) -> None:
    model, batches = zoo.comparison(name, zoo.COMPARE_BATCH, zoo.COMPARE_STEPS)
    lr = zoo.COMPARE_LR
    fp32 = single_device_run(model, batches, lr=lr)
    fp64 = single_device_run(_as_fp64_model(model), [_double(b) for b in batches], lr=lr)
    bound = zoo.COMPARE_TOL
    for step, (a, b) in enumerate(zip(fp32.losses, fp64.losses, strict=True)):
        assert abs(a - b) <= bound * max(1.0, abs(b)), f"{name}: loss of step {step} {a} vs fp64 {b}"
    for kind, got, want in (("gradient", fp32.first_grads, fp64.first_grads), ("state", fp32.params, fp64.params)):
        assert set(got) == set(want), f"{name}: {kind} entries differ"
        for n, t in got.items():
            if not t.is_floating_point():
                assert torch.equal(t, want[n]), f"{name}: {kind} {n}"
                continue
            torch.testing.assert_close(
                t.double(), want[n], rtol=bound, atol=bound, msg=lambda m, n=n, kind=kind: f"{name}: {kind} {n}: {m}"
            )
