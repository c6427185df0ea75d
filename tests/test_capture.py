"""Capture: shapes, module paths, parameter identities, FLOPs against closed forms, and error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoshard
from autoshard.ir import NodeKind
from autoshard.models import build, preset


def tokens(batch: int, seq: int, device: str = "meta") -> torch.Tensor:
    return torch.zeros(batch, seq, dtype=torch.long, device=device)


def gpt_forward_flops(*, batch: int, seq: int, d: int, layers: int, vocab: int) -> int:
    """Matmul FLOPs of a GPT forward pass, derived by hand (2 FLOPs per multiply-add).

    Per layer: qkv 2*B*T*d*3d, attention scores Q K^T 2*B*T*T*d (all heads together), scores times V
    2*B*T*T*d, output projection 2*B*T*d*d, MLP up 2*B*T*d*4d and down 2*B*T*4d*d; after the layers the
    vocabulary projection 2*B*T*d*V. This is Narayanan et al. (2021)'s 24*B*s*l*h^2*(1 + s/(6h) +
    V/(12*l*h)) forward count.
    """
    per_layer = 2 * batch * seq * d * (3 * d + d + 4 * d + 4 * d) + 2 * 2 * batch * seq * seq * d
    return layers * per_layer + 2 * batch * seq * d * vocab


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small-test", "gpt2-small", "gpt3-175b"])
def test_gpt_forward_flops_match_closed_form(name: str) -> None:
    cfg = preset(name)
    batch, seq = 2, cfg.block_size
    model = build(name, device="meta")
    ir = autoshard.capture(model, (tokens(batch, seq), tokens(batch, seq)))
    expected = gpt_forward_flops(
        batch=batch, seq=seq, d=cfg.n_embd, layers=cfg.n_layer, vocab=cfg.vocab_size
    )
    got = ir.summary()["forward_flops"]
    assert abs(got - expected) / expected < 0.01, (got, expected)


def test_gpt3_175b_captures_on_meta_without_parameter_memory() -> None:
    model = build("gpt3-175b", device="meta")
    ir = autoshard.capture(model, (tokens(1, 2048), tokens(1, 2048)))
    assert all(p.is_meta for p in model.parameters())
    s = ir.summary()
    # GPT-3 175B has 175e9 parameters (Brown et al. 2020, Table 2.1); fp32 bytes are 4 per parameter.
    assert abs(s["parameters"] - 175e9) / 175e9 < 0.01
    assert s["parameter_bytes"] == 4 * s["parameters"]
    assert s["parameters"] == model.num_parameters()


def test_tied_weights_are_one_parameter() -> None:
    model = build("gpt-tiny", device="meta")
    ir = autoshard.capture(model, (tokens(2, 8), tokens(2, 8)))
    tied = [p for p in ir.params if len(p.names) > 1]
    assert len(tied) == 1
    assert set(tied[0].names) == {"transformer.wte.weight", "lm_head.weight"}
    assert len(tied[0].nodes) >= 1
    for node in tied[0].nodes:
        assert ir.param_of(node) is tied[0]
    assert ir.summary()["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["llama-tiny", "llama2-7b", "moe-tiny", "mixtral-8x7b", "gpt2-medium"])
def test_reference_models_capture_with_all_parameters(name: str) -> None:
    model = build(name, device="meta")
    ir = autoshard.capture(model, (tokens(1, 16), tokens(1, 16)))
    assert ir.summary()["parameters"] == model.num_parameters()
    names = {n for p in ir.params for n in p.names}
    assert names == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert ir.summary()["forward_flops"] > 0
    assert ir.nodes[-1].kind is NodeKind.OUTPUT


def test_llama_matmul_flops_match_closed_form() -> None:
    cfg = preset("llama-tiny")
    b, t = 2, cfg.max_seq_len
    ir = autoshard.capture(build("llama-tiny", device="meta"), (tokens(b, t), tokens(b, t)))
    d, kv = cfg.dim, cfg.dim // cfg.n_head * cfg.n_kv_head
    # q and o are d x d, k and v are d x kv (grouped-query), SwiGLU has three d x ffn matmuls.
    per_layer = 2 * b * t * (2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_hidden) + 4 * b * t * t * d
    expected = cfg.n_layer * per_layer + 2 * b * t * d * cfg.vocab_size
    assert ir.summary()["forward_flops"] == pytest.approx(expected, rel=0.01)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x))).sum()


def test_node_facts_for_a_small_mlp() -> None:
    ir = autoshard.capture(TwoLinear(), torch.randn(4, 8))
    (up,) = [n for n in ir.calls if n.module == "up"]
    assert up.op == "aten.linear.default"
    assert up.module_type == "Linear"
    assert up.outputs[0].shape == (4, 32)
    assert up.flops == 2 * 4 * 8 * 32
    # reads x (4x8), weight (32x8), bias (32); writes 4x32; fp32
    assert up.bytes_moved == 4 * (4 * 8 + 32 * 8 + 32 + 4 * 32)
    assert up.source.endswith(":" + str(TwoLinear.forward.__code__.co_firstlineno + 1))
    kinds = [n.kind for n in ir.nodes]
    assert kinds.count(NodeKind.PARAMETER) == 3 and kinds.count(NodeKind.INPUT) == 1


def test_views_are_flagged_and_cost_nothing() -> None:
    class Reshaper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).view(2, 3, 6).transpose(0, 1).sum()

    ir = autoshard.capture(Reshaper(), torch.randn(6, 6))
    views = {n.op for n in ir.calls if n.is_view}
    assert {"aten.view.default", "aten.transpose.int"} <= views
    assert all(n.flops == 0 and n.bytes_moved == 0 for n in ir.calls if n.is_view)


def test_summary_and_table_are_readable() -> None:
    ir = autoshard.capture(build("gpt-tiny", device="meta"), (tokens(2, 8), tokens(2, 8)))
    s = ir.summary()
    for key in ("nodes", "parameters", "parameter_bytes", "forward_flops"):
        assert s[key] > 0
    text = str(ir)
    assert "GraphIR of GPT" in text
    assert "aten.linear.default" in text and "transformer.h.0.attn" in text
    assert len(ir.fingerprint) == 16
    same = autoshard.capture(build("gpt-tiny", device="meta"), (tokens(2, 8), tokens(2, 8)))
    other = autoshard.capture(build("gpt-tiny", device="meta"), (tokens(2, 4), tokens(2, 4)))
    assert same.fingerprint == ir.fingerprint != other.fingerprint


def test_inputs_on_another_device_are_moved_by_shape() -> None:
    cpu_inputs = (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    ir = autoshard.capture(build("gpt-tiny", device="meta"), cpu_inputs)
    assert ir.summary()["forward_flops"] > 0


# ---- error paths -------------------------------------------------------------------------------


def test_not_a_module_is_refused() -> None:
    with pytest.raises(autoshard.InputError, match="expected a torch.nn.Module, found function"):
        autoshard.capture(lambda x: x, torch.randn(2))


def test_model_without_parameters_is_refused() -> None:
    class NoParams(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [nn.Linear(2, 2)]  # a plain list: not registered

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers[0](x)

    with pytest.raises(autoshard.InputError, match="NoParams has no parameters.*nn.ModuleList"):
        autoshard.capture(NoParams(), torch.randn(2, 2))


def test_parameters_on_several_devices_are_refused() -> None:
    model = TwoLinear()
    model.down.to("meta")
    with pytest.raises(autoshard.InputError, match="several devices.*cpu.*meta"):
        autoshard.capture(model, torch.randn(4, 8))


@pytest.mark.parametrize(
    ("bad", "found"),
    [("tokens", "str"), (np.zeros((2, 8)), "ndarray"), ((torch.randn(4, 8), object()), "object")],
)
def test_inputs_of_the_wrong_kind_are_refused(bad: object, found: str) -> None:
    with pytest.raises(autoshard.InputError, match="expected") as info:
        autoshard.capture(TwoLinear(), bad)
    assert found in str(info.value)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if y.sum() > 0:  # branches on a value: cannot be captured on shapes
            return y
        return -y


def test_uncapturable_model_names_module_and_line() -> None:
    with pytest.raises(autoshard.CaptureError) as info:
        autoshard.capture(DataDependent(), torch.randn(2, 4))
    message = str(info.value)
    assert "module `inner` (Branchy)" in message
    assert "test_capture.py" in message and "if y.sum() > 0" in message
    assert "How to fix" in message and "torch.where" in message


def test_wrong_input_shape_is_a_capture_error_at_the_user_line() -> None:
    with pytest.raises(autoshard.CaptureError, match="module `up` .*Linear|mat1 and mat2"):
        autoshard.capture(TwoLinear(), torch.randn(4, 5))


@pytest.mark.parametrize(("p", "norm", "expected"), [(0.0, False, 0), (0.1, False, 1), (0.0, True, 1)])
def test_nodes_that_differ_in_eval_mode_are_found(p: float, norm: bool, expected: int) -> None:
    """Dropout of nonzero probability and train-mode BatchNorm compute otherwise under model.eval(); the
    compiled model refuses an eval-mode forward of a graph holding them (captured in training mode)."""
    layers: list[nn.Module] = [nn.Linear(8, 8), nn.Dropout(p)]
    if norm:
        layers.append(nn.BatchNorm1d(8))
    ir = autoshard.capture(nn.Sequential(*layers), (torch.randn(4, 8),))
    assert len(ir.train_mode_ops()) == expected, ir.train_mode_ops()
