"""Measured-over-predicted ratios that correct the memory model for one machine and model (no torch)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fluxtune.errors import FluxtuneError

if TYPE_CHECKING:
    from fluxtune.memory.model import Prediction
    pass


@dataclass
class Calibration:
    """Corrections learnt from runs.

    Allocated peaks correct the *activations* of the phase that peaked (``measured - weights`` over the
    predicted activations): on the H200 replica every trial whose peak was the VAE decode missed by the
    same 0.6 GB whatever its resident weights (10 GB or 0.2 GB), an additive error in one term that a
    ratio on the whole peak cannot learn. Reserved/NVML peaks (or an allocated peak with negligible
    activations) give a multiplicative correction of the whole peak per offload family. Each correction
    is the median of its pairs (robust to the odd broken run).
    """

    pairs: list[tuple[str, float]] = field(default_factory=list)
    """(offload family, measured / predicted peak)."""
    activation_pairs: list[tuple[str, float]] = field(default_factory=list)
    """(phase, measured / predicted activations of that phase)."""
    min_ratio: float = 0.25
    max_ratio: float = 4.0

    def add(
        self, prediction: Prediction, measured: int | None,
        kind: Literal["allocated", "reserved", "vram"] = "allocated",
    ) -> float | None:
        """Learn from one run.

        Args:
            prediction: the *uncalibrated* prediction of the run's profile.
            measured: the measured peak in bytes (None: nothing is learnt).
            kind: what ``measured`` is: ``allocated`` (torch max_memory_allocated, the best signal),
                ``reserved`` (max_memory_reserved of a capped run) or ``vram`` (max of reserved and NVML).

        Returns:
            The ratio recorded, or None when nothing was learnt.
        """
        if measured is None or measured <= 0:
            return None
        base = prediction.peak_allocated / prediction.calibration_ratio
        act = prediction.breakdown.get(f"activations:{prediction.peak_phase}", 0)
        if kind == "allocated" and base > 0 and act > 0.05 * base:
            resident = base - act
            ratio = min(self.max_ratio, max(self.min_ratio, (measured - resident) / act))
            self.activation_pairs.append((prediction.peak_phase, ratio))
            return ratio
        if kind == "allocated":
            ratio = measured / base if base > 0 else math.nan
        elif kind == "reserved":
            ratio = measured / (prediction.peak_reserved / prediction.calibration_ratio)
        elif kind == "vram":
            predicted = prediction.peak_vram - prediction.overhead
            ratio = (measured - prediction.overhead) / (predicted / prediction.calibration_ratio)
        else:
            raise FluxtuneError(f"calibration kind={kind!r}; use allocated, reserved or vram")
        if not math.isfinite(ratio) or ratio <= 0:
            return None
        ratio = min(self.max_ratio, max(self.min_ratio, ratio))
        self.pairs.append((prediction.family, ratio))
        return ratio

    def ratio(self, family: str) -> float:
        """The correction for an offload family (see :func:`offload_family`)."""
        own = [r for f, r in self.pairs if f == family]
        pool = own or [r for _, r in self.pairs]
        return float(statistics.median(pool)) if pool else 1.0

    def activation_ratio(self, phase: str) -> float:
        """The correction of one phase's activations (1.0 until that phase has peaked in a run)."""
        own = [r for p, r in self.activation_pairs if p == phase]
        return float(statistics.median(own)) if own else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [[f, r] for f, r in self.pairs],
                "activation_pairs": [[p, r] for p, r in self.activation_pairs],
                "min_ratio": self.min_ratio, "max_ratio": self.max_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        try:
            return cls(pairs=[(str(f), float(r)) for f, r in data.get("pairs", [])],
                       activation_pairs=[(str(p), float(r)) for p, r in data.get("activation_pairs", [])],
                       min_ratio=float(data.get("min_ratio", 0.25)), max_ratio=float(data.get("max_ratio", 4.0)))
        except (TypeError, ValueError) as e:
            raise FluxtuneError(f"calibration: not a Calibration dump ({e})") from None

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration written by :meth:`save`; a missing file is an empty calibration.

        Raises:
            FluxtuneError: the file is not a calibration.
        """
        p = Path(path)
        if not p.exists():
            return cls()
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise FluxtuneError(f"calibration file {str(p)!r} is not JSON ({e}); delete it to start afresh") from None
        return cls.from_dict(data)
