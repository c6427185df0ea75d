"""Cost model: profiles, cluster parsing, mesh-axis placement, collective and roofline formulas, memory."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autoshard.cost_model import (
    Cluster,
    Collective,
    HardwareSpec,
    Link,
    backward_factor,
    collective_bytes_per_device,
    collective_time,
    compute_time,
    known_hardware,
    load_hardware,
    optimizer_state_bytes_per_param,
    training_memory,
)
from autoshard.cost_model.cluster import _groups_inside_nodes
from autoshard.errors import InputError

PROFILES = ["a100-40g", "a100-80g", "cpu", "h100", "h200"]
SCALARS = {
    "hbm_bytes": "bytes",
    "hbm_bandwidth": "bytes/s",
    "intra_node_bandwidth": "bytes/s",
    "intra_node_latency": "s",
    "inter_node_bandwidth": "bytes/s",
    "inter_node_latency": "s",
    "compute_efficiency": "fraction",
    "memory_efficiency": "fraction",
    "collective_efficiency": "fraction",
}


# --- profiles -------------------------------------------------------------------------------------------


def test_known_hardware_lists_the_bundled_profiles() -> None:
    assert known_hardware() == PROFILES


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_constant_has_value_unit_and_source(name: str) -> None:
    raw = json.loads((resources.files("autoshard.cost_model") / "profiles" / f"{name}.json").read_text())
    assert raw["name"] == name
    assert raw["description"]
    entries = {f"peak_flops.{k}": (v, "FLOP/s") for k, v in raw["peak_flops"].items()}
    entries.update({k: (raw[k], unit) for k, unit in SCALARS.items()})
    assert {"peak_flops.fp32", "peak_flops.bf16", "peak_flops.fp16"} <= set(entries)
    for key, (entry, unit) in entries.items():
        assert set(entry) == {"value", "unit", "source"}, key
        assert entry["unit"] == unit, key
        assert isinstance(entry["value"], (int, float)) and entry["value"] > 0, key
        assert len(entry["source"]) > 20, key
    spec = load_hardware(name)
    assert set(spec.sources) == set(entries)
    assert 0 < spec.compute_efficiency <= 1 and 0 < spec.memory_efficiency <= 1
    assert 0 < spec.collective_efficiency <= 1
    assert spec.intra_node_bandwidth >= spec.inter_node_bandwidth
    assert spec.intra_node_latency <= spec.inter_node_latency


def test_cpu_profile_says_its_figures_are_estimates() -> None:
    spec = load_hardware("cpu")
    assert all("estimate" in source.lower() for source in spec.sources.values())


def test_datasheet_figures() -> None:
    a40, a80, h100, h200 = (load_hardware(n) for n in ("a100-40g", "a100-80g", "h100", "h200"))
    assert a80.peak_flops_for(torch.bfloat16) == 312e12 and a80.peak_flops_for(torch.float32) == 19.5e12
    assert a40.hbm_bandwidth == 1.555e12 and a80.hbm_bandwidth == 2.039e12
    assert a40.hbm_bytes == 40 * 10**9 and a80.hbm_bytes == 80 * 10**9
    assert a80.intra_node_bandwidth == 600e9 / 2  # NVLink3 600 GB/s bidirectional
    assert a80.inter_node_bandwidth == 200e9 / 8  # one 200 Gb/s HDR port per GPU
    assert h100.peak_flops_for(torch.bfloat16) == 989e12 and h100.hbm_bandwidth == 3.35e12
    assert h100.intra_node_bandwidth == 900e9 / 2 and h100.inter_node_bandwidth == 400e9 / 8
    assert h200.peak_flops == h100.peak_flops and h200.hbm_bytes == 141 * 10**9
    assert h200.hbm_bandwidth == 4.8e12


def test_load_is_case_insensitive_cached_and_immutable() -> None:
    spec = load_hardware(" A100-80G ")
    assert spec is load_hardware("a100-80g")
    assert isinstance(hash(spec), int)
    with pytest.raises(TypeError):
        spec.peak_flops["fp32"] = 1.0  # type: ignore[index]


def test_unknown_hardware_lists_known_names() -> None:
    with pytest.raises(InputError, match="a100-80g.*h100") as info:
        load_hardware("v100")
    assert "'v100'" in str(info.value)


def test_peak_flops_for_dtypes() -> None:
    spec = load_hardware("a100-80g")
    assert spec.peak_flops_for(torch.float16) == 312e12
    with pytest.raises(InputError, match="torch.float32"):
        spec.peak_flops_for(torch.int64)
    # fp64 is a dtype the model prices, but a GPU profile carries no fp64 figure: the error names the gap.
    with pytest.raises(InputError, match="no peak_flops entry 'fp64'.*it has bf16, fp16, fp32, tf32"):
        spec.peak_flops_for(torch.float64)
    assert load_hardware("cpu").peak_flops_for(torch.float64) == 16e9


def _write_profile(tmp_path: Path, **changes: object) -> str:
    data = json.loads((resources.files("autoshard.cost_model") / "profiles" / "cpu.json").read_text())
    data.update(changes)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_custom_profile_from_path(tmp_path: Path) -> None:
    spec = load_hardware(_write_profile(tmp_path, name="my-box", devices_per_node=2))
    assert spec.name == "my-box" and spec.devices_per_node == 2
    assert str(Cluster(hardware=spec, nodes=1, devices_per_node=2)) == "1 x 2 my-box (2 devices)"


def test_profile_with_wrong_unit_is_refused(tmp_path: Path) -> None:
    bad = {"value": 1.0, "unit": "GB/s", "source": "typo"}
    with pytest.raises(InputError, match="'bytes/s'.*'GB/s'"):
        load_hardware(_write_profile(tmp_path, hbm_bandwidth=bad))


def test_profile_with_missing_source_or_bad_efficiency_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="source"):
        load_hardware(_write_profile(tmp_path, inter_node_latency={"value": 1e-5, "unit": "s"}))
    with pytest.raises(InputError, match=r"fraction in \(0, 1\]"):
        load_hardware(_write_profile(tmp_path, compute_efficiency={"value": 1.5, "unit": "fraction",
                                                                    "source": "wishful"}))
    with pytest.raises(InputError, match="no such file"):
        load_hardware(str(tmp_path / "absent.json"))


# --- cluster --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "nodes", "per_node"),
    [
        ("a100-80g:16x8", "a100-80g", 16, 8),
        ("h100:4x8", "h100", 4, 8),
        ("cpu:4", "cpu", 1, 4),
        ("a100-80g:8", "a100-80g", 1, 8),
        (" H200 : 2 X 8 ", "h200", 2, 8),
    ],
)
def test_parse_cluster(text: str, name: str, nodes: int, per_node: int) -> None:
    cluster = Cluster.parse(text)
    assert (cluster.hardware.name, cluster.nodes, cluster.devices_per_node) == (name, nodes, per_node)
    assert cluster.num_devices == nodes * per_node


def test_cluster_str() -> None:
    assert str(Cluster.parse("a100-80g:16x8")) == "16 x 8 a100-80g (128 devices)"
    assert str(Cluster.parse("cpu:4")) == "1 x 4 cpu (4 devices)"


@pytest.mark.parametrize(
    "text", ["a100-80g", "a100-80g:", ":8", "a100-80g:16x8x2", "a100-80g:4y8", "", "a100:-1"]
)
def test_bad_cluster_strings_show_grammar_and_example(text: str) -> None:
    with pytest.raises(InputError, match=r"<hardware>:<nodes>x<devices_per_node>.*a100-80g:16x8"):
        Cluster.parse(text)


def test_bad_cluster_values() -> None:
    with pytest.raises(InputError, match="positive"):
        Cluster.parse("a100-80g:0x8")
    with pytest.raises(InputError, match="known hardware profiles"):
        Cluster.parse("tpu:8")
    with pytest.raises(InputError, match="a100-80g:2x8"):
        Cluster.parse("a100-80g:16")  # a DGX node holds 8 GPUs
    with pytest.raises(InputError, match="a100-80g:16x8"):
        Cluster.parse(16)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="positive integer"):
        Cluster(hardware=load_hardware("h100"), nodes=0, devices_per_node=8)


def test_mesh_axis_placement_on_16x8() -> None:
    cluster = Cluster.parse("a100-80g:16x8")
    hw = cluster.hardware
    tp = cluster.axis_link({"dp": 16, "tp": 8}, "tp")  # last axis: ranks 8k..8k+7, one node each
    dp = cluster.axis_link({"dp": 16, "tp": 8}, "dp")  # stride 8: one GPU per node
    assert tp == Link(bandwidth=hw.intra_node_bandwidth, latency=hw.intra_node_latency, group_size=8,
                      intra_node=True, efficiency=hw.collective_efficiency)
    assert dp == Link(bandwidth=hw.inter_node_bandwidth, latency=hw.inter_node_latency, group_size=16,
                      intra_node=False, efficiency=hw.collective_efficiency)
    # Reversed order: dp is now contiguous (ranks 16k..16k+15 span two nodes), tp strided by 16.
    assert not cluster.axis_link({"tp": 8, "dp": 16}, "dp").intra_node
    assert not cluster.axis_link({"tp": 8, "dp": 16}, "tp").intra_node
    assert not cluster.axis_link({"dp": 128}, "dp").intra_node
    # A 4-wide inner axis and a 2-wide middle axis both fit in a node; the outer one does not.
    mesh = {"pp": 16, "dp": 2, "tp": 4}
    assert [cluster.axis_link(mesh, a).intra_node for a in mesh] == [False, True, True]


def test_mesh_axis_placement_single_node_and_uneven() -> None:
    cpu = Cluster.parse("cpu:8")
    assert cpu.axis_link({"dp": 8}, "dp").intra_node
    assert all(cpu.axis_link({"dp": 2, "tp": 4}, a).intra_node for a in ("dp", "tp"))
    six = Cluster.parse("a100-80g:2x6")
    assert six.axis_link({"x": 4, "y": 3}, "y").intra_node  # groups of 3 tile a 6-GPU node
    assert not six.axis_link({"x": 3, "y": 4}, "y").intra_node  # ranks 4..7 straddle nodes 0 and 1
    assert six.axis_link({"x": 12, "one": 1}, "one").group_size == 1


def test_mesh_errors() -> None:
    cluster = Cluster.parse("a100-80g:16x8")
    with pytest.raises(InputError, match=r"128 devices.*= 64 devices"):
        cluster.axis_link({"dp": 8, "tp": 8}, "dp")
    with pytest.raises(InputError, match=r"\['dp', 'tp'\].*'pp'"):
        cluster.axis_link({"dp": 16, "tp": 8}, "pp")
    with pytest.raises(InputError, match="positive integer"):
        cluster.axis_link({"dp": 0, "tp": 8}, "tp")
    with pytest.raises(InputError, match="mesh shape"):
        cluster.axis_link({}, "tp")


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    per_node=st.integers(1, 12),
    data=st.data(),
)
def test_axis_rule_matches_brute_force(sizes: list[int], per_node: int, data: st.DataObject) -> None:
    num = math.prod(sizes)
    ranks = np.arange(num).reshape(sizes)  # row-major: last axis fastest
    axis = data.draw(st.integers(0, len(sizes) - 1))
    groups = np.moveaxis(ranks, axis, -1).reshape(-1, sizes[axis]) // per_node
    expected = bool((groups.min(axis=1) == groups.max(axis=1)).all())
    stride = math.prod(sizes[axis + 1:])
    assert _groups_inside_nodes(num, sizes[axis], stride, per_node) == expected


# --- collectives ----------------------------------------------------------------------------------------

GB = 10**9


def test_all_reduce_of_1gb_over_8_a100s() -> None:
    link = Cluster.parse("a100-80g:8").axis_link({"tp": 8}, "tp")
    bw = 300e9 * 0.75  # NVLink per direction times collective efficiency
    expected = 2 * (7 / 8 * 1e9 / bw + 7 * 2e-6)  # reduce-scatter then all-gather, 7 ring steps each
    assert collective_time(Collective.ALL_REDUCE, GB, link) == pytest.approx(expected)
    assert expected == pytest.approx(7.806e-3, rel=1e-3)


def test_collective_formulas_by_hand() -> None:
    link = Link(bandwidth=100e9, latency=1e-5, group_size=4, intra_node=False, efficiency=0.5)
    bw = 100e9 * 0.5
    one_pass = 3 / 4 * 2 * GB / bw + 3 * 1e-5
    assert collective_time(Collective.ALL_GATHER, 2 * GB, link) == pytest.approx(one_pass)
    assert collective_time(Collective.REDUCE_SCATTER, 2 * GB, link) == pytest.approx(one_pass)
    assert collective_time(Collective.ALL_REDUCE, 2 * GB, link) == pytest.approx(2 * one_pass)
    assert collective_time(Collective.ALL_TO_ALL, 2 * GB, link) == pytest.approx(one_pass)
    assert collective_time(Collective.SEND_RECV, 2 * GB, link) == pytest.approx(2 * GB / bw + 1e-5)
    single = Link(bandwidth=1e9, latency=1.0, group_size=1, intra_node=True)
    assert all(collective_time(kind, GB, single) == 0.0 for kind in Collective)
    # an empty all-reduce is pure latency: the tree's 2 * log2(4) steps beat the ring's 2 * 3
    assert collective_time(Collective.ALL_REDUCE, 0, link) == pytest.approx(2 * 2 * 1e-5)
    # a small one too: tree 2 * (1 MB / bw + 2 a) < ring 2 * (3/4 MB / bw + 3 a)
    small = 2 * (1e6 / bw + 2 * 1e-5)
    assert collective_time(Collective.ALL_REDUCE, 10**6, link) == pytest.approx(small)
    assert small < 2 * (3 / 4 * 1e6 / bw + 3 * 1e-5)


def test_inter_node_all_reduce_is_slower() -> None:
    cluster = Cluster.parse("h100:4x8")
    mesh = {"dp": 4, "tp": 8}
    dp = collective_time(Collective.ALL_REDUCE, GB, cluster.axis_link(mesh, "dp"))
    tp = collective_time(Collective.ALL_REDUCE, GB, cluster.axis_link(mesh, "tp"))
    assert dp == pytest.approx(2 * (3 / 4 * 1e9 / (50e9 * 0.8) + 3 * 5e-6))
    assert dp > tp


def test_collective_bytes_per_device() -> None:
    assert collective_bytes_per_device(Collective.ALL_GATHER, 8000, 8) == 7000
    assert collective_bytes_per_device(Collective.REDUCE_SCATTER, 8000, 8) == 7000
    assert collective_bytes_per_device(Collective.ALL_REDUCE, 8000, 8) == 14000
    assert collective_bytes_per_device(Collective.ALL_TO_ALL, 8000, 8) == 7000
    assert collective_bytes_per_device(Collective.SEND_RECV, 8000, 2) == 8000
    assert collective_bytes_per_device(Collective.ALL_REDUCE, 8000, 1) == 0


links = st.builds(
    Link,
    bandwidth=st.floats(1e6, 1e13),
    latency=st.floats(0, 1e-3),
    group_size=st.integers(1, 1024),
    intra_node=st.booleans(),
    efficiency=st.floats(0.01, 1.0),
)


@given(kind=st.sampled_from(Collective), link=links, a=st.integers(0, 10**12), b=st.integers(0, 10**12))
def test_collective_time_is_monotone_and_non_negative(kind: Collective, link: Link, a: int, b: int) -> None:
    small, large = sorted((a, b))
    t_small, t_large = collective_time(kind, small, link), collective_time(kind, large, link)
    assert 0 <= t_small <= t_large
    n = link.group_size
    assert 0 <= collective_bytes_per_device(kind, small, n) <= collective_bytes_per_device(kind, large, n)


# --- compute --------------------------------------------------------------------------------------------


def test_matmul_is_compute_bound_and_elementwise_memory_bound() -> None:
    hw = load_hardware("a100-80g")
    n = 4096
    mm_flops, mm_bytes = 2 * n**3, 3 * n * n * 2  # read A and B, write C, bf16
    mm = compute_time(mm_flops, mm_bytes, torch.bfloat16, hw)
    assert mm == pytest.approx(mm_flops / (312e12 * 0.75))
    assert mm > mm_bytes / (2.039e12 * 0.85)
    numel = 2**26
    add_flops, add_bytes = numel, 3 * numel * 2  # one add per element; read two, write one
    add = compute_time(add_flops, add_bytes, torch.bfloat16, hw)
    assert add == pytest.approx(add_bytes / (2.039e12 * 0.85))
    assert add > add_flops / (312e12 * 0.75)


def test_roofline_crossover_at_ridge_point() -> None:
    hw = load_hardware("h100")
    flop_rate = hw.peak_flops_for(torch.bfloat16) * hw.compute_efficiency
    ridge = flop_rate / (hw.hbm_bandwidth * hw.memory_efficiency)  # FLOPs per byte where the roofs meet
    nbytes = 10**9
    at_ridge = compute_time(ridge * nbytes, nbytes, torch.bfloat16, hw)
    assert at_ridge == pytest.approx(nbytes / (hw.hbm_bandwidth * hw.memory_efficiency))
    assert compute_time(2 * ridge * nbytes, nbytes, torch.bfloat16, hw) == pytest.approx(2 * at_ridge)
    assert compute_time(ridge * nbytes / 2, nbytes, torch.bfloat16, hw) == pytest.approx(at_ridge)


def test_zero_flop_ops_price_by_bytes_in_any_dtype() -> None:
    hw = load_hardware("cpu")
    assert compute_time(0, 8000, torch.int64, hw) == pytest.approx(8000 / (10e9 * 0.7))
    with pytest.raises(InputError):
        compute_time(10, 8000, torch.int64, hw)


def test_backward_factors() -> None:
    assert backward_factor(10).flops == 2.0 and backward_factor(10).bytes_moved == 2.0
    assert backward_factor(0).bytes_moved == 2.0


# --- memory ---------------------------------------------------------------------------------------------


def test_optimizer_state_bytes() -> None:
    assert optimizer_state_bytes_per_param("adamw", torch.float32) == 8
    assert optimizer_state_bytes_per_param("Adam", torch.bfloat16) == 8  # fp32 moments
    assert optimizer_state_bytes_per_param("adamw", torch.float64) == 16
    assert optimizer_state_bytes_per_param("sgd", torch.float32) == 0
    assert optimizer_state_bytes_per_param("sgd-momentum", torch.float32) == 4


def test_optimizer_errors() -> None:
    with pytest.raises(InputError, match=r"\['adam', 'adamw', 'sgd', 'sgd-momentum'\].*'lion'"):
        optimizer_state_bytes_per_param("lion", torch.float32)
    with pytest.raises(InputError, match="floating-point"):
        optimizer_state_bytes_per_param("adamw", torch.int64)


def test_training_memory_breakdown() -> None:
    params = 3 * 10**9  # bf16 weights and grads, fp32 Adam moments: 41 GB in all
    mem = training_memory(param_bytes=2 * params, grad_bytes=2 * params, optimizer_bytes=8 * params,
                          activation_bytes=5 * params / 3)
    assert (mem.parameters, mem.gradients, mem.optimizer_state) == (2 * params, 2 * params, 8 * params)
    assert mem.activations == math.ceil(5 * params / 3)
    assert mem.total == 12 * params + math.ceil(5 * params / 3)
    assert mem.fits(load_hardware("h100").hbm_bytes) and not mem.fits(load_hardware("a100-40g").hbm_bytes)
    assert "optimizer state" in str(mem)


def test_hardware_spec_validates_direct_construction() -> None:
    spec = load_hardware("cpu")
    fields = {name: getattr(spec, name) for name in HardwareSpec.__dataclass_fields__}
    with pytest.raises(InputError, match="hbm_bandwidth"):
        HardwareSpec(**{**fields, "hbm_bandwidth": 0})
    with pytest.raises(InputError, match="peak_flops.fp32"):
        HardwareSpec(**{**fields, "peak_flops": {"fp32": "fast"}})
