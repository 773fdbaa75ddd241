"""The GPUs people own, as data: the table in ``fluxtune/data/gpus.yaml`` and its capability classes. No torch.

The table (SM, memory, dense TFLOPS per precision, memory bandwidth, PCIe link and the host->device
rate seen in practice, each with its source) serves three purposes: matching the detected GPU
(``fluxtune env``), emulating a named card on a bigger GPU (``--emulate``) and predicting latency
(``fluxtune predict``).

A **capability class** groups the compute capabilities by what fluxtune's knobs can run on them; a
preset's variants are keyed by class (see :mod:`fluxtune.profile`):

- ``ampere`` (SM 8.0-8.8): bf16 and int8 tensor cores; fp8 only as storage (layerwise casting).
- ``ada`` (SM 8.9): fp8 matmuls with tensor-wise scales.
- ``hopper`` (SM 9.0): fp8 with row-wise scales (torchao ``PerRow``).
- ``blackwell`` (SM 10.x, 12.x): fp8 with tensor-wise scales. Row-wise fp8 is not assumed: no card
  of this class was measured here.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fluxtune.errors import ProfileError

__all__ = [
    "CAPABILITY_CLASSES",
    "CapabilityClass",
    "GpuSpec",
    "capability_class",
    "class_allows",
    "find_gpu",
    "gpu_table",
    "match_gpu",
]

CapabilityClass = Literal["ampere", "ada", "hopper", "blackwell"]
CAPABILITY_CLASSES: tuple[CapabilityClass, ...] = ("ampere", "ada", "hopper", "blackwell")

_CLASS_TEXT = {
    "ampere": "SM 8.0-8.8: bf16/int8 compute, fp8 only as storage",
    "ada": "SM 8.9: fp8 tensor-wise",
    "hopper": "SM 9.0: fp8 row-wise",
    "blackwell": "SM 10.x/12.x: fp8 tensor-wise (row-wise not measured)",
}

_GIB = 2**30
TABLE_PATH = Path(__file__).resolve().parent / "data" / "gpus.yaml"


def capability_class(sm: tuple[int, int]) -> CapabilityClass:
    """The capability class of a compute capability.

    Raises:
        ProfileError: the GPU is older than Ampere (no bf16 tensor cores).
    """
    if sm >= (10, 0):
        return "blackwell"
    if sm >= (9, 0):
        return "hopper"
    if sm >= (8, 9):
        return "ada"
    if sm >= (8, 0):
        return "ampere"
    raise ProfileError(f"compute capability {sm[0]}.{sm[1]} is older than Ampere (SM 8.0); fluxtune needs bf16 "
                       "tensor cores: use an RTX 30xx or newer")


def class_description(cls: str) -> str:
    """One line saying which SMs a class covers and what it computes in."""
    return _CLASS_TEXT.get(cls, cls)


def class_allows(cls: str, method: str, granularity: str = "row") -> bool:
    """Whether a quantization method (and fp8 granularity) computes on GPUs of a class."""
    if method.startswith("fp8"):
        if cls == "ampere":
            return False
        if method == "fp8_dynamic" and granularity == "row":
            return cls == "hopper"
    return True


class GpuSpec(BaseModel):
    """One row of the GPU table. TFLOPS are dense (no sparsity); GeForce figures with fp32 accumulate."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    nvml_names: tuple[str, ...] = ()
    arch: str = ""
    sm: tuple[int, int]
    memory_gib: float = Field(gt=0)
    memory_bandwidth_gbs: float | None = None
    pcie_gen: int | None = None
    pcie_lanes: int | None = None
    h2d_gbs: float = Field(gt=0, description="host->device GB/s from page-locked memory seen in practice")
    h2d_source: str = ""
    tflops: dict[str, float | None] = Field(default_factory=dict)
    sources: tuple[str, ...] = ()
    notes: str = ""

    @field_validator("sm", mode="before")
    @classmethod
    def _sm(cls, value: Any) -> Any:
        if isinstance(value, str | float | int):
            major, _, minor = str(value).partition(".")
            return (int(major), int(minor or 0))
        return value

    @property
    def memory_bytes(self) -> int:
        """The card's memory: a card sold as "12 GB" has 12 GiB."""
        return int(self.memory_gib * _GIB)

    @property
    def capability(self) -> CapabilityClass:
        return capability_class(self.sm)

    def rate(self, precision: str) -> float | None:
        """Dense TFLOPS (TOPS for int8) of a precision, None when the card has no such tensor cores.

        ``fp16acc`` (float16 inputs, float16 accumulate) is derived, not listed: half the dense int8 rate
        on every architecture in the table (GA10x, AD10x, GB20x: 1024 of 2048 int8 ops per SM clock; Ampere
        and Hopper data-center parts: their float32-accumulate rate, also half of int8). So twice ``bf16``
        on GeForce, L4/L40 and A10G cards, equal to it elsewhere; ``bf16`` where no int8 rate is known."""
        if precision == "fp16acc":
            int8 = self.rate("int8")
            return int8 / 2 if int8 else self.rate("bf16")
        value = self.tflops.get(precision)
        return float(value) if value else None

    def describe(self) -> str:
        link = f"PCIe {self.pcie_gen}.0 x{self.pcie_lanes}" if self.pcie_gen and self.pcie_lanes else "link ?"
        rates = ", ".join(f"{k} {v:g}" for k, v in self.tflops.items() if v)
        return (f"{self.name}: SM {self.sm[0]}.{self.sm[1]} ({self.capability}), {self.memory_gib:g} GiB, "
                f"{link} ~{self.h2d_gbs:g} GB/s host->device, dense TFLOPS {rates}")


@functools.cache
def gpu_table() -> tuple[GpuSpec, ...]:
    """The shipped GPU table, in file order."""
    data = yaml.safe_load(TABLE_PATH.read_text())
    rows = []
    for i, raw in enumerate(data.get("gpus", [])):
        raw = dict(raw)
        pcie = raw.pop("pcie", None) or {}
        raw.setdefault("pcie_gen", pcie.get("gen"))
        raw.setdefault("pcie_lanes", pcie.get("lanes"))
        try:
            rows.append(GpuSpec.model_validate(raw))
        except ValidationError as e:  # a broken shipped table is a packaging bug, said plainly
            raise ProfileError(f"{TABLE_PATH}: entry {i} ({raw.get('name')!r}) is invalid: {e.errors()[0]['msg']}") from None
    return tuple(rows)


def _key(text: str) -> str:
    text = text.lower().replace("nvidia", "").replace("geforce", "")
    return re.sub(r"[^a-z0-9]+", "", text)


def find_gpu(name: str, *, field: str = "--gpu") -> GpuSpec:
    """The table row a user named ("RTX 4060", "rtx4060", "NVIDIA GeForce RTX 4060", "L4").

    Raises:
        ProfileError: no such card; the message lists the closest names.
    """
    key = _key(name)
    for spec in gpu_table():
        if key and (key == _key(spec.name) or key in {_key(n) for n in spec.nvml_names}):
            return spec
    names = [spec.name for spec in gpu_table()]
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.3) or difflib.get_close_matches(
        key, [_key(n) for n in names], n=4, cutoff=0.3)
    by_key = {_key(n): n for n in names}
    close = [by_key.get(c, c) for c in close]
    hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(names)}"
    raise ProfileError(f"{field}={name!r} is not a GPU in fluxtune's table; {hint} (fluxtune env --gpus lists all)")


def match_gpu(nvml_name: str | None, memory_bytes: int | None = None) -> GpuSpec | None:
    """The table row of a detected GPU (its NVML name), or None when the card is not listed.

    Some names cover several memory sizes (RTX 4060 Ti 8/16 GB, RTX 3060 8/12 GB): the row whose memory
    is closest to ``memory_bytes`` (NVML's total, a little under the marketed GiB) wins.
    """
    if not nvml_name:
        return None
    key = _key(nvml_name)
    rows = [s for s in gpu_table() if key in {_key(n) for n in s.nvml_names} or key == _key(s.name)]
    if not rows:
        return None
    if memory_bytes is None:
        return rows[0]
    return min(rows, key=lambda s: abs(s.memory_bytes - memory_bytes))
