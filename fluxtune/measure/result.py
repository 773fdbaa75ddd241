"""What a measurement saw: :class:`Measurement`, and the budget check of a peak."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fluxtune.status import Status


@dataclass
class Measurement:
    """What one :func:`measure` saw. Seconds are per ``pipe()`` call; bytes are peaks over the timed runs
    (``host_ram_peak``: over the whole measurement). None = not measured / not applicable here."""

    status: Status = Status.OK
    error: str | None = None
    first_call_s: float | None = None
    latency_s: float | None = None
    latency_runs: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    text_encode_s: float | None = None
    denoise_s: float | None = None
    step_s: float | None = None
    decode_s: float | None = None
    steps: int | None = None
    step_times: list[float] = field(default_factory=list)
    calls_per_run: int = 0
    images_per_call: int | None = None
    """Images one call renders (DiT: class labels x images per label; text: images per prompt)."""
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_nvml: int | None = None
    peak_device_used: int | None = None
    host_ram_peak: int | None = None
    device: str = "cpu"
    workload: dict[str, Any] | None = None
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    quality: dict[str, float] = field(default_factory=dict)
    projected_latency_s: float | None = None
    """Pruned runs: the call latency projected from the first warm steps (steps x their median; a lower
    bound, text encoding and decoding left out)."""

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # from stored data: the plain string

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def throughput(self) -> float | None:
        """Images per second in steady state."""
        return self.images_per_call / self.latency_s if self.images_per_call and self.latency_s else None

    @property
    def peak(self) -> int | None:
        """The peak compared with a budget: the larger of reserved and NVML process memory."""
        known = [v for v in (self.peak_reserved, self.peak_nvml) if v is not None]
        return max(known) if known else None

    def summary(self) -> str:
        """One human line."""
        from fluxtune.units import format_bytes

        if self.status in (Status.OOM, Status.ERROR):
            return f"{self.status}: {self.error}"
        parts = [f"{self.latency_s:.3f} s/call" if self.latency_s is not None else "no timing"]
        if self.first_call_s is not None:
            parts.append(f"first call {self.first_call_s:.2f} s")
        if self.peak_allocated is not None:
            parts.append(f"peak {format_bytes(self.peak_allocated)} allocated")
        if self.peak_reserved is not None:
            parts.append(f"{format_bytes(self.peak_reserved)} reserved")
        if self.peak_nvml is not None:
            parts.append(f"{format_bytes(self.peak_nvml)} NVML")
        text = ", ".join(parts)
        return f"over budget: {self.error}; {text}" if self.status == Status.OVER_BUDGET else text

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data without the tensors (their shapes are kept); non-finite floats become None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("images", "latents"):
                t = getattr(self, f.name)
                out[f"{f.name}_shape"] = list(t.shape) if t is not None else None
                continue
            out[f.name] = json_safe(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Rebuild a measurement (without tensors) from :meth:`to_dict`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"images", "latents"}
        return cls(**{k: v for k, v in data.items() if k in known})


def json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def classify_peak(peak_reserved: int | None, peak_nvml: int | None, budget_bytes: int | None) -> Status:
    """``"over_budget"`` when the process's peak exceeds the budget, else ``"ok"``.

    The budget is the card: the whole process as NVML sees it (:class:`fluxtune.knobs.Budget`), so the
    larger of the allocator's reserved peak and the NVML process peak is charged (the sampled NVML peak
    can miss a short spike the allocator saw). Unknown peaks (CPU) never make a run over budget.
    """
    known = [p for p in (peak_reserved, peak_nvml) if p is not None]
    if budget_bytes is None or not known:
        return Status.OK
    return Status.OVER_BUDGET if max(known) > budget_bytes else Status.OK


def one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    text = lines[0].strip() if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
