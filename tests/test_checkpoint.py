"""Checkpoints in one process (no process group): round trip, export, and bad input refused with
nothing changed. The sharded paths (every plan, resharding, resume after SIGKILL) are
tests/test_checkpoint_reshard.py and tests/test_checkpoint_resume.py."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

import autoshard
from autoshard.models import build
from autoshard.runtime.checkpoint import INCOMPLETE, MANIFEST

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trained(n_layer: int = 2, optimizer: type = torch.optim.AdamW) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build("gpt-tiny", device="cpu", n_layer=n_layer)
    opt = optimizer(model.parameters(), lr=1e-2)
    x = torch.randint(0, model.config.vocab_size, (4, 16))
    for _ in range(2):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "optim": copy.deepcopy(opt.state_dict())}


def _same(a: object, b: object) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, opt = _trained()
    return autoshard.save_checkpoint(tmp_path / "step2", model, opt, step=2, sched={"last_epoch": 2, "base_lrs": [0.01]})


def test_round_trip_restores_model_optimizer_extras_and_rng(tmp_path: Path) -> None:
    model, opt = _trained()
    torch.manual_seed(7)
    autoshard.save_checkpoint(tmp_path / "c", model, opt, step=2, position=[3, 4])
    after_save = torch.rand(3)
    fresh = build("gpt-tiny", device="cpu", n_layer=2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    torch.manual_seed(99)
    extra = autoshard.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    assert extra == {"step": 2, "position": [3, 4]}
    assert torch.equal(torch.rand(3), after_save)  # the RNG continues where the saving run was
    assert _same(_snapshot(fresh, fresh_opt), _snapshot(model, opt))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        ".metadata", "__0_0.distcp", MANIFEST, "extra.pt", "rng"
    ]  # no plan.json: a plain model has none


def test_export_loads_into_the_original_model(saved: Path, tmp_path: Path) -> None:
    model, _ = _trained()
    for name in ("weights.safetensors", "weights.pt"):
        out = autoshard.export_checkpoint(saved, tmp_path / name)
        if out.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(out))
        else:
            state = torch.load(out, weights_only=True)
        fresh = build("gpt-tiny", device="cpu", n_layer=2)
        fresh.load_state_dict(state, strict=True)
        assert _same(fresh.state_dict(), model.state_dict())


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    model, opt = _trained()
    with pytest.raises(autoshard.InputError, match="found none; check the path"):
        autoshard.load_checkpoint(tmp_path / "nope", model, opt)
    (tmp_path / f"nope{INCOMPLETE}").mkdir()
    with pytest.raises(autoshard.InputError, match="did not finish"):
        autoshard.load_checkpoint(tmp_path / "nope", model, opt)


def test_interrupted_save_is_never_taken_for_a_checkpoint(saved: Path, tmp_path: Path) -> None:
    """A save killed before its manifest and rename: under its own name it is refused, and
    latest_checkpoint passes it by."""
    partial = saved.with_name(saved.name + INCOMPLETE)
    shutil.copytree(saved, partial)
    (partial / MANIFEST).unlink()
    with pytest.raises(autoshard.InputError, match=f"no {MANIFEST}"):
        autoshard.load_checkpoint(partial, *_trained())
    assert autoshard.latest_checkpoint(tmp_path) == saved


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_checkpoint_is_refused_and_changes_nothing(saved: Path, damage: str) -> None:
    data = saved / "__0_0.distcp"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    model, opt = _trained(optimizer=torch.optim.AdamW)
    torch.nn.init.zeros_(model.transformer.wte.weight)
    before = _snapshot(model, opt)
    with pytest.raises(autoshard.InputError, match="truncated or missing: __0_0.distcp"):
        autoshard.load_checkpoint(saved, model, opt)
    assert _same(_snapshot(model, opt), before)


def test_checkpoint_of_another_model_is_refused_and_changes_nothing(saved: Path) -> None:
    other, opt = _trained(n_layer=3)
    before = _snapshot(other, opt)
    with pytest.raises(autoshard.InputError, match=r"1 of the model's tensors missing|tensors missing"):
        autoshard.load_checkpoint(saved, other, opt)
    assert _same(_snapshot(other, opt), before)
    torch.manual_seed(0)
    wider = build("gpt-tiny", device="cpu", n_layer=2, n_embd=96)
    with pytest.raises(autoshard.InputError, match="of another shape or dtype"):
        autoshard.load_checkpoint(saved, wider)


def test_optimizer_over_other_parameters_or_of_another_class_is_refused(saved: Path, tmp_path: Path) -> None:
    model, _ = _trained()
    torch.nn.init.zeros_(model.transformer.wte.weight)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(autoshard.InputError, match="hold SGD state, found AdamW's"):
        autoshard.load_checkpoint(saved, model, torch.optim.SGD(model.parameters(), lr=1e-2))
    # saved by an optimizer over the vectors alone, loaded by one over every parameter: the 10 matrices
    # (4 per block, 2 blocks, wte (lm_head is tied to it), wpe) lack state
    vectors_only, _ = _trained()
    opt = torch.optim.AdamW([p for p in vectors_only.parameters() if p.ndim < 2], lr=1e-2)
    vectors_only(*(torch.zeros(2, 16, dtype=torch.long),) * 2).backward()
    opt.step()
    partial = autoshard.save_checkpoint(tmp_path / "vectors", vectors_only, opt)
    with pytest.raises(autoshard.InputError, match=r"found none for 10 \(transformer.h.0.attn.c_attn.weight, "):
        autoshard.load_checkpoint(partial, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    no_optim = autoshard.save_checkpoint(tmp_path / "model-only", vectors_only)
    with pytest.raises(autoshard.InputError, match="found none \\(saved without an optimizer\\)"):
        autoshard.load_checkpoint(no_optim, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert _same(model.state_dict(), before)


def test_save_refuses_to_overwrite_and_bad_extras_before_writing(saved: Path, tmp_path: Path) -> None:
    model, opt = _trained()
    with pytest.raises(autoshard.InputError, match="pass overwrite=True"):
        autoshard.save_checkpoint(saved, model, opt)
    with pytest.raises(autoshard.InputError, match="weights_only=True"):
        autoshard.save_checkpoint(tmp_path / "bad", model, opt, sched=lambda step: step)
    assert not (tmp_path / "bad").exists() and not (tmp_path / f"bad{INCOMPLETE}").exists()
    again = autoshard.save_checkpoint(saved, model, opt, overwrite=True, step=3)
    assert autoshard.load_checkpoint(again, model, opt)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2"]
