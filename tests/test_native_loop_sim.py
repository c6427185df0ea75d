"""The torch-native interface on 4 simulated ranks: the compiled model is an nn.Module under the model's
own names, and a user's loop (AdamW with two param groups, a warmup schedule, global-norm clipping)
over its `parameters()` equals the same loop on the single-device model.

Simulation as in test_runtime_sim.py (fake process group, LocalTensorMode: collectives really combine
the ranks' pieces). The multi-process matrix, with ZeRO and pipelines, is test_native_loop_torchrun.py.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

import autoshard
from autoshard.errors import InputError
from autoshard.models import build
from native_loop import LR, MAX_NORM, STEPS, user_loop
from test_runtime_sim import WORLD, forced, local_mode, value



def gpt_tiny() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = build("gpt-tiny", device="cpu")
    vocab = model.config.vocab_size
    return model, (torch.randint(0, vocab, (8, 16)), torch.randint(0, vocab, (8, 16)))


def compiled(model: nn.Module, batch: tuple, mesh: dict[str, int], optimizer: str = "adamw") -> autoshard.ShardedModule:
    plan = autoshard.plan(model, batch, f"cpu:{WORLD}", mesh=mesh, param_placements=forced("gpt-tiny", mesh),
                          zero_stage=0, recompute="none", optimizer=optimizer)  # fmt: skip
    return autoshard.compile(model, batch, plan=plan)


def test_named_parameters_and_state_dict_use_the_models_names(fake_world) -> None:
    model, batch = gpt_tiny()
    with local_mode():
        sharded = compiled(model, batch, {"dp": 2, "tp": 2}, optimizer="sgd")
        names = [n for n, _ in sharded.named_parameters()]
        assert isinstance(sharded, nn.Module)
        assert names == [n for n, _ in model.named_parameters()]  # tied lm_head.weight: once, as in the model
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        assert set(sharded.state_dict()) == set(model.state_dict())  # the tied name too
        assert sharded.get_parameter("lm_head.weight") is sharded.get_parameter("transformer.wte.weight")
        sharded_qkv = sharded.get_parameter("transformer.h.0.attn.c_attn.weight")
        assert not all(p.is_replicate() for p in sharded_qkv.placements)  # the plan's tensor-parallel split
        full = value(sharded_qkv.full_tensor())
        torch.testing.assert_close(full, model.transformer.h[0].attn.c_attn.weight.detach(), rtol=0, atol=0)
        sharded.eval()  # gpt-tiny has no dropout or BatchNorm: the eval-mode forward is the model's
        torch.testing.assert_close(value(sharded(*batch)), model.eval()(*batch), rtol=1e-5, atol=1e-6)
        sharded.train()
        model.train()
        _optimizer_with_more_state_than_planned_is_reported_once(sharded, batch)


def _optimizer_with_more_state_than_planned_is_reported_once(sharded: autoshard.ShardedModule, batch: tuple) -> None:
    """The plan sized optimizer state for SGD (none); the user's AdamW keeps two tensors per parameter,
    said once however many steps it takes. An SGD without momentum keeps none: nothing to say."""
    assert sharded.plan.optimizer == "sgd"
    for optimizer, expected in ((torch.optim.AdamW, 1), (torch.optim.SGD, 0)):
        opt = optimizer(sharded.parameters(), lr=1e-3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                sharded.step(*batch)
                opt.step()
                opt.zero_grad()
        said = [w for w in caught if "budgeted memory for optimizer='sgd'" in str(w.message)]
        assert len(said) == expected, [str(w.message) for w in caught]


def test_user_loop_with_param_groups_schedule_and_clipping_equals_one_device(fake_world) -> None:
    """dp x tp here; every other plan kind on real ranks (test_native_loop_torchrun.py)."""
    mesh = {"dp": 2, "tp": 2}
    model, batch = gpt_tiny()
    batches = [batch] * STEPS
    want = user_loop(copy.deepcopy(model), batches, native=False)
    assert any(n > MAX_NORM for n in want.norms), f"clipping never acts (norms {want.norms}): the test would prove nothing"
    with local_mode():
        got = user_loop(compiled(model, batch, mesh), batches, native=True)
        got = got.reconciled(value)
    for step, (g, w) in enumerate(zip(got.losses, want.losses, strict=True)):
        assert math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-6), f"loss of step {step}: {g} != {w}"
    for step, (g, w) in enumerate(zip(got.norms, want.norms, strict=True)):
        assert math.isclose(g, w, rel_tol=1e-5), f"clipped norm of step {step}: {g} != {w}"
    assert got.params.keys() == want.params.keys()
    # AdamW divides by sqrt(v) + eps: reduction-order noise in near-zero gradients grows to ~1% of a step
    # of size LR (FACTS.md); the clipped gradients above are compared tightly
    for name, w in want.params.items():
        torch.testing.assert_close(got.params[name], w, rtol=1e-5, atol=LR / 100, msg=lambda m, n=name: f"{n}: {m}")
    for name, w in want.first_grads.items():  # clipped gradients of the first step
        torch.testing.assert_close(got.first_grads[name], w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


def test_step_accumulates_gradients_as_backward_does(fake_world) -> None:
    """Two `step`s without zero_grad hold the sum of both steps' gradients, as two backward calls do."""
    model, batch = gpt_tiny()
    reference = copy.deepcopy(model)
    for _ in range(2):
        reference(*batch).backward()
    with local_mode():
        sharded = compiled(model, batch, {"dp": 2, "tp": 2})
        sharded.step(*batch)
        sharded.step(*batch)
        grads = {n: value(p.grad.full_tensor()) for n, p in sharded.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


class Clash(nn.Module):
    """A model whose top-level submodule is named like an attribute of the compiled model."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan(x).pow(2).mean()


def test_a_top_level_name_that_clashes_with_the_compiled_models_is_refused(fake_world) -> None:
    with local_mode(), pytest.raises(InputError, match="'plan'.*rename that submodule"):
        autoshard.compile(Clash(), (torch.randn(4, 4),), mesh={"dp": 4})


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(self.up(x))).pow(2).mean()


def test_eval_mode_forward_turns_dropout_off_as_the_model_does(fake_world) -> None:
    """The graph is captured in training mode; after `.eval()` the compiled forward runs its dropouts as
    the identity and equals the single-device model's eval forward, and `.train()` turns them on again
    (dropping half the units changes the loss)."""
    torch.manual_seed(0)
    model, x = DropoutMLP(), torch.randn(8, 4)
    with local_mode():
        sharded = autoshard.compile(model, (x,), mesh={"dp": 4})
        sharded.eval()
        got = value(sharded(x))
        sharded.train()
        dropped = value(sharded(x))
    want = model.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dropped, want), "the training-mode forward dropped nothing"


class BatchNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x))).pow(2).mean()


def test_eval_mode_forward_of_a_graph_captured_with_train_batch_norm_is_refused(fake_world) -> None:
    """A train-mode BatchNorm normalises by the batch's statistics, eval mode by the running ones: another
    computation than the captured one, refused in eval mode (naming the BatchNorm); training mode runs."""
    with local_mode():
        sharded = autoshard.compile(BatchNormMLP(), (torch.randn(8, 4),), mesh={"dp": 4})
        sharded(torch.randn(8, 4))
        sharded.eval()
        with pytest.raises(InputError, match="eval-mode forward.*BatchNorm"):
            sharded(torch.randn(8, 4))
