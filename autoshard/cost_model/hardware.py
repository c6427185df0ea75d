"""Hardware profiles: the constants the cost model prices a plan with.

The numbers live as data in ``profiles/*.json`` rather than in code, so that every constant carries its unit
and the document it came from, and so a user can calibrate a machine by writing a JSON file instead of
editing Python. Units are checked on load: a profile that says "GB/s" where bytes/s is expected is refused
rather than silently read a billion times too small. Everything in :class:`HardwareSpec` is SI: bytes,
bytes/s, FLOP/s, seconds; bandwidths are per device and per direction.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from autoshard.errors import InputError

__all__ = ["DTYPE_NAMES", "HardwareSpec", "known_hardware", "load_hardware"]

#: torch dtype -> the key under ``peak_flops`` that prices it. fp32 means CUDA-core fp32 (PyTorch's default,
#: TF32 off); a "tf32" entry is kept in the profiles for callers that know TF32 is enabled.
DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType(
    {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
)

# Field -> the unit its JSON entry must declare. Scalar fields only; peak_flops entries are all "FLOP/s".
_SCALAR_UNITS: Mapping[str, str] = MappingProxyType(
    {
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
)
_FLOPS_UNIT = "FLOP/s"
_EFFICIENCIES = ("compute_efficiency", "memory_efficiency", "collective_efficiency")


@dataclass(frozen=True, kw_only=True, slots=True)
class HardwareSpec:
    """One device type and the node it sits in, in SI units.

    Peak figures are datasheet peaks; the ``*_efficiency`` fractions turn them into what real kernels and
    collectives achieve, kept separate so a calibration can change one without touching the datasheet.
    """

    name: str
    description: str = ""
    devices_per_node: int
    peak_flops: Mapping[str, float]  # dtype name ("fp32", "bf16", ...) -> FLOP/s, dense
    hbm_bytes: int  # device memory, bytes
    hbm_bandwidth: float  # bytes/s
    intra_node_bandwidth: float  # bytes/s per device, one direction
    intra_node_latency: float  # s per collective step
    inter_node_bandwidth: float  # bytes/s per device, one direction
    inter_node_latency: float  # s per collective step
    compute_efficiency: float  # fraction of peak FLOP/s achieved
    memory_efficiency: float  # fraction of hbm_bandwidth achieved
    collective_efficiency: float  # fraction of link bandwidth achieved by collectives
    sources: Mapping[str, str] = field(default_factory=dict)  # field (e.g. "peak_flops.bf16") -> source

    def __post_init__(self) -> None:
        where = f"hardware profile {self.name!r}"
        for key, value in self.peak_flops.items():
            _check_positive(where, f"peak_flops.{key}", value)
        # Freeze the mappings so a shared, cached spec cannot be edited behind another caller's back.
        flops = MappingProxyType({str(k): float(v) for k, v in self.peak_flops.items()})
        object.__setattr__(self, "peak_flops", flops)
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        per_node = self.devices_per_node
        if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
            raise InputError(f"{where}: expected devices_per_node to be a positive integer, found "
                             f"{self.devices_per_node!r}; fix the profile.")
        if not self.peak_flops:
            raise InputError(f"{where}: expected peak_flops for at least one dtype, found none; add e.g. "
                             f'"fp32": {{"value": ..., "unit": "FLOP/s", "source": ...}}.')
        for name in _SCALAR_UNITS:
            _check_positive(where, name, getattr(self, name))
        for name in _EFFICIENCIES:
            if getattr(self, name) > 1:
                raise InputError(f"{where}: expected {name} to be a fraction in (0, 1], found "
                                 f"{getattr(self, name)!r}; fix the profile.")

    def __hash__(self) -> int:
        # The generated hash would fail on the mapping fields; specs are used as cache keys (via Cluster).
        scalars = tuple(getattr(self, name) for name in _SCALAR_UNITS)
        return hash((self.name, self.devices_per_node, tuple(sorted(self.peak_flops.items())), scalars))

    def peak_flops_for(self, dtype: torch.dtype) -> float:
        """Datasheet peak FLOP/s for matmuls in ``dtype`` (no efficiency applied)."""
        key = DTYPE_NAMES.get(dtype)
        if key is None:
            known = ", ".join(str(d) for d in DTYPE_NAMES)
            raise InputError(f"expected a floating dtype the cost model can price ({known}), found {dtype}; "
                             "cast the model to one of those (e.g. model.to(torch.bfloat16)).")
        if key not in self.peak_flops:
            raise InputError(f"hardware profile {self.name!r} has no peak_flops entry {key!r} for {dtype} "
                             f"(it has {', '.join(sorted(self.peak_flops))}); add one to the profile or use "
                             "another dtype.")
        return self.peak_flops[key]


def _check_positive(where: str, name: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: expected {name} to be a positive finite number, found {value!r}; "
                         "fix the profile.")


def _profiles_dir() -> Any:
    return resources.files("autoshard.cost_model") / "profiles"


def known_hardware() -> list[str]:
    """Names of the bundled profiles, sorted, as accepted by :func:`load_hardware` and ``Cluster.parse``."""
    files = _profiles_dir().iterdir()
    return sorted(p.name.removesuffix(".json") for p in files if p.name.endswith(".json"))


def load_hardware(name: str) -> HardwareSpec:
    """The bundled profile called ``name`` (case-insensitive), or the profile JSON at path ``name``.

    A path is anything ending in ``.json``: that is how a user plugs in a calibrated machine.
    """
    if not isinstance(name, str):
        raise InputError(f"expected a hardware name such as 'a100-80g', found {name!r} "
                         f"({type(name).__name__}); pass one of {known_hardware()}.")
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"expected a hardware profile JSON file at {name!r}, found no such file; "
                             f"check the path or use a bundled profile: {known_hardware()}.")
        return _spec_from_json(_read_json(path.read_text(), str(path)), str(path))
    key = name.strip().lower()
    if key not in known_hardware():
        raise InputError(f"expected one of the known hardware profiles {known_hardware()}, found {name!r}; "
                         "use one of those names, or a path to your own profile JSON (copy a bundled one).")
    return _load_bundled(key)


@functools.lru_cache(maxsize=None)
def _load_bundled(key: str) -> HardwareSpec:
    # Bundled profiles cannot change while running, and specs are immutable: one shared object each.
    text = (_profiles_dir() / f"{key}.json").read_text()
    return _spec_from_json(_read_json(text, f"{key}.json"), f"{key}.json")


def _read_json(text: str, origin: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"expected valid JSON in hardware profile {origin}, found a syntax error: {exc}; "
                         "fix the file.") from exc


def _entry(data: Mapping[str, Any], key: str, unit: str, origin: str) -> tuple[Any, str]:
    """(value, source) of one ``{"value", "unit", "source"}`` entry, checking that the unit is ``unit``."""
    shape = f'{{"value": <number>, "unit": "{unit}", "source": "<document>"}}'
    entry = data.get(key)
    if not isinstance(entry, Mapping):
        raise InputError(f"hardware profile {origin}: expected {key!r} to be {shape}, found {entry!r}; "
                         "add the entry.")
    if entry.get("unit") != unit:
        raise InputError(f"hardware profile {origin}: expected {key!r} in unit {unit!r}, found "
                         f"{entry.get('unit')!r}; convert the value to {unit} and say so in the unit field.")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"hardware profile {origin}: expected {key!r} to name its source, found "
                         f"{source!r}; add a \"source\" (datasheet, benchmark or 'estimate').")
    return entry.get("value"), source


def _spec_from_json(data: Any, origin: str) -> HardwareSpec:
    if not isinstance(data, Mapping):
        raise InputError(f"expected hardware profile {origin} to hold a JSON object, found "
                         f"{type(data).__name__}; see the bundled profiles for the layout.")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"hardware profile {origin}: expected a \"name\" string, found {name!r}; add one.")
    flops_entries = data.get("peak_flops")
    if not isinstance(flops_entries, Mapping) or not flops_entries:
        raise InputError(f"hardware profile {origin}: expected \"peak_flops\" to map dtype names to entries, "
                         f"found {flops_entries!r}; add e.g. \"fp32\".")
    sources: dict[str, str] = {}
    peak_flops: dict[str, float] = {}
    for dtype_name in flops_entries:
        value, sources[f"peak_flops.{dtype_name}"] = _entry(flops_entries, dtype_name, _FLOPS_UNIT, origin)
        peak_flops[dtype_name] = value
    scalars: dict[str, Any] = {}
    for key, unit in _SCALAR_UNITS.items():
        scalars[key], sources[key] = _entry(data, key, unit, origin)
    hbm = scalars["hbm_bytes"]
    if isinstance(hbm, float) and hbm.is_integer():
        scalars["hbm_bytes"] = int(hbm)
    return HardwareSpec(
        name=name,
        description=str(data.get("description", "")),
        devices_per_node=data.get("devices_per_node"),
        peak_flops=peak_flops,
        sources=sources,
        **scalars,
    )
