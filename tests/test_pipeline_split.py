"""Stage split (passes/stages.py) and pipelined-plan checks, in one process: what crosses each stage
boundary, who holds which parameter, and the errors for plans that cannot be pipelined.

The numerics of pipelined training are checked on real processes in tests/test_runtime_pipeline.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import autoshard
from autoshard.errors import InputError
from autoshard.ir.plan import Training
from autoshard.models import build
from autoshard.passes.codegen import codegen
from autoshard.passes.stages import split_stages
from autoshard.runtime.micro_batches import first_micro_batch
from autoshard.runtime.model import check_plan as _check_plan

from pipeline_plans import SkipModel, block_paths  # tests/ is on sys.path under pytest


def _captured(preset: str, layers: int, *, targets: bool = True):
    torch.manual_seed(0)
    model = build(preset, device="cpu", n_layer=layers)
    vocab = model.config.vocab_size
    example = (torch.randint(0, vocab, (2, 16)),) + ((torch.randint(0, vocab, (2, 16)),) if targets else ())
    ir = autoshard.capture(model, example)
    plan = autoshard.plan_graph(ir, "cpu:2", mesh={"dp": 2}, optimizer="sgd")
    return model, ir, plan, codegen(ir, plan)


@pytest.fixture(scope="module")
def gpt():
    return _captured("gpt-tiny", 4)


@pytest.fixture(scope="module")
def llama():
    return _captured("llama-tiny", 4)


def _training(model: nn.Module, stages: tuple[int, ...], **kw) -> Training:
    return Training(pp=2, blocks=block_paths(model), stages=stages, schedule=kw.pop("schedule", "gpipe"), **kw)


def test_gpt_stages_pass_only_the_residual_stream_and_both_ends_hold_the_tied_embedding(gpt) -> None:
    model, ir, _, gm = gpt
    split = split_stages(gm, ir, _training(model, (1, 3)))
    first, last = split.stages
    assert first.inputs == ("idx",)
    assert len(first.outputs) == 1 and last.inputs == first.outputs  # one (B, T, C) tensor crosses
    assert split.target == "targets" and split.loss.inputs[-1] == "targets"
    (tied,) = [info for info in ir.params if len(info.names) == 2]  # wte.weight is lm_head.weight
    assert set(tied.nodes) & set(first.state) and set(tied.nodes) & set(last.state)
    assert not any("h_1" in s or "h_2" in s for s in first.state)  # blocks 1-3 are the last stage's
    assert sum(1 for n in last.graph_module.graph.nodes if n.target is torch.ops.aten.layer_norm.default) == 7


def test_llama_rope_tables_are_recomputed_on_every_stage_not_sent(llama) -> None:
    model, ir, _, gm = llama
    split = split_stages(gm, ir, _training(model, (1, 1, 1, 1), schedule="interleaved-1f1b", virtual_stages=2))
    for piece in split.stages:
        assert len(piece.outputs) == 1  # the residual stream only
        ops = {n.target for n in piece.graph_module.graph.nodes}
        assert torch.ops.aten.cos.default in ops and torch.ops.aten.sin.default in ops


def test_blocks_listed_out_of_execution_order_are_refused(gpt) -> None:
    model, ir, _, gm = gpt
    training = dataclasses.replace(_training(model, (2, 2)), blocks=tuple(reversed(block_paths(model))))
    with pytest.raises(InputError, match="execution order"):
        split_stages(gm, ir, training)


def test_blocks_that_run_no_op_are_refused(gpt) -> None:
    model, ir, _, gm = gpt
    training = Training(pp=2, blocks=("transformer.h.0", "transformer.h.9"), stages=(1, 1), schedule="gpipe")
    with pytest.raises(InputError, match=r"transformer\.h\.9"):
        split_stages(gm, ir, training)


def test_stage_counts_must_cover_the_blocks(gpt) -> None:
    model = gpt[0]
    with pytest.raises(InputError, match="do not split the 4 blocks"):
        _training(model, (1, 1))


def test_a_model_that_returns_logits_cannot_be_pipelined() -> None:
    model, ir, _, gm = _captured("gpt-tiny", 2, targets=False)
    with pytest.raises(InputError, match="targets"):
        split_stages(gm, ir, _training(model, (1, 1)))


def test_pipelined_plans_are_checked_before_any_rank_starts(gpt) -> None:
    model, _, plan, _ = gpt
    good = dataclasses.replace(plan, mesh={"pp": 2, "dp": 2}, training=_training(model, (2, 2), num_micro_batches=4))
    _check_plan(good)
    with pytest.raises(InputError, match="'pp' as its first axis"):
        _check_plan(dataclasses.replace(good, mesh={"dp": 2, "pp": 2}))
    with pytest.raises(InputError, match="operator mesh"):
        _check_plan(dataclasses.replace(good, mesh={"pp": 2}))
    few = _training(model, (2, 2), schedule="1f1b", num_micro_batches=1)
    with pytest.raises(InputError, match="1f1b needs at least pp=2 micro-batches"):
        _check_plan(dataclasses.replace(good, training=few))


def test_example_inputs_of_the_global_batch_are_cut_to_one_micro_batch(gpt) -> None:
    model, _, plan, _ = gpt
    pipelined = dataclasses.replace(
        plan, mesh={"pp": 2, "dp": 2}, training=_training(model, (2, 2), num_micro_batches=4, micro_batch_size=1)
    )
    batch = (torch.zeros(8, 16, dtype=torch.long), torch.ones(8, 16, dtype=torch.long))
    assert [tuple(x.shape) for x in first_micro_batch(batch, pipelined)] == [(2, 16), (2, 16)]
    micro = tuple(x[:2] for x in batch)
    assert [tuple(x.shape) for x in first_micro_batch(micro, pipelined)] == [(2, 16), (2, 16)]


def test_a_value_read_two_stages_later_is_passed_through_the_stage_between() -> None:
    torch.manual_seed(0)
    model = SkipModel(n_layer=3)
    example = (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    ir = autoshard.capture(model, example)
    plan = autoshard.plan_graph(ir, "cpu:2", mesh={"dp": 2}, optimizer="sgd")
    training = Training(pp=3, blocks=block_paths(model), stages=(1, 1, 1), schedule="gpipe")
    first, middle, last = split_stages(codegen(ir, plan), ir, training).stages
    (embedding,) = [n.name for n in first.graph_module.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert embedding in first.outputs and embedding in middle.inputs and embedding in middle.outputs
    assert embedding in last.inputs
