"""Turning a measured (or predicted) trial into Optuna values and constraints.

The budget, the quality floor and the latency cap are constraints (``trial.set_constraint``): a
value above zero is a violation, and an infeasible trial still completes, so the sampler learns
where the boundary is. Memory is in GB and latency in seconds so the numbers read naturally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fluxtune.status import Status

if TYPE_CHECKING:
    from fluxtune.measure import Measurement
    from fluxtune.worker import RunOutcome

PENALTY_LATENCY = 1e4  # seconds: what an infeasible trial "costs" when it never ran
GB = 1e9


@dataclass(frozen=True)
class Goal:
    """What the user asked for."""

    objective: str  # latency | quality | pareto | throughput
    budget_bytes: int | None
    min_psnr: float | None = None
    max_latency: float | None = None
    images: int | None = None  # amortise first-call (compile) cost over this many images
    on_gpu: bool = True


@dataclass
class Score:
    """A trial's values and constraints, plus the headline numbers for tables."""

    values: list[float]
    constraints: dict[str, float] = field(default_factory=dict)
    latency: float | None = None
    peak: int | None = None
    psnr: float | None = None
    throughput: float | None = None
    """Images per second: images per call over the (amortised) latency per call."""

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())


def peak_of(measurement: Measurement | None, on_gpu: bool) -> int | None:
    """The peak compared with the budget: allocator reserved on a GPU (what the cap limits), host RSS on CPU."""
    if measurement is None:
        return None
    if on_gpu:
        return measurement.peak_reserved or measurement.peak_allocated
    return measurement.host_ram_peak


def effective_latency(measurement: Measurement | None, images: int | None) -> float | None:
    """Steady-state latency, plus the first call's extra cost spread over ``images`` images."""
    lat = measurement.latency_s if measurement is not None else None
    if measurement is None or lat is None:
        return None
    first = measurement.first_call_s or lat
    return float(lat + max(0.0, first - lat) / images) if images else float(lat)


def throughput_of(measurement: Measurement | None, latency: float | None) -> float | None:
    """Images per second of a call of ``images_per_call`` images that takes ``latency`` seconds."""
    n = (measurement.images_per_call if measurement is not None else None) or 1
    return float(n / latency) if latency else None


def _values(goal: Goal, latency: float, psnr: float, throughput: float) -> list[float]:
    if goal.objective == "latency":
        return [latency]
    if goal.objective == "quality":
        return [psnr]
    if goal.objective == "throughput":
        return [throughput]
    return [latency, psnr]


def score(goal: Goal, outcome: RunOutcome) -> Score:
    """Values and constraints of a finished trial (ok, oom or over budget)."""
    m, status = outcome.measurement, outcome.status
    latency = effective_latency(m, goal.images)
    peak = peak_of(m, goal.on_gpu)
    psnr = (outcome.quality or {}).get("psnr")
    constraints: dict[str, float] = {}
    if goal.budget_bytes is not None:
        if status in (Status.OOM, Status.OVER_BUDGET) and (peak is None or peak <= goal.budget_bytes):
            # It failed at the cap: the real need is unknown but above the budget.
            constraints["memory_gb"] = max(0.1, ((peak or goal.budget_bytes) - goal.budget_bytes) / GB + 0.5)
        else:
            constraints["memory_gb"] = ((peak or 0) - goal.budget_bytes) / GB
    if goal.min_psnr is not None:
        constraints["quality_db"] = goal.min_psnr - (psnr if psnr is not None else 0.0)
    if goal.max_latency is not None:
        constraints["latency_s"] = (latency if latency is not None else PENALTY_LATENCY) - goal.max_latency
    lat_value = latency if latency is not None and status != Status.OOM else PENALTY_LATENCY
    psnr_value = psnr if psnr is not None and math.isfinite(psnr) else 0.0
    tput = throughput_of(m, latency) if status != Status.OOM else None
    return Score(_values(goal, lat_value, psnr_value, tput or 0.0), constraints, latency, peak, psnr, tput)


def predicted_infeasible(goal: Goal, predicted_peak: int) -> Score:
    """The score of a trial skipped because the memory model says it cannot fit."""
    assert goal.budget_bytes is not None
    constraints = {"memory_gb": (predicted_peak - goal.budget_bytes) / GB}
    if goal.min_psnr is not None:
        constraints["quality_db"] = 0.0
    if goal.max_latency is not None:
        constraints["latency_s"] = 0.0
    return Score(_values(goal, PENALTY_LATENCY, 0.0, 0.0), constraints, None, predicted_peak, None)
