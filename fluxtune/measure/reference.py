"""The lossless reference run quality is judged against, kept on disk (tensors + a JSON sidecar)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxtune.errors import FluxtuneError
from fluxtune.measure.quality import WORST, compare
from fluxtune.measure.result import Measurement, json_safe, one_line
from fluxtune.measure.workload import Workload


@dataclass
class Reference:
    """The images and latents of a reference run, its workload, and its noise floor.

    ``noise_floor`` is the quality of a second identical reference run against the first (GPU
    nondeterminism shows here; on CPU it is usually exact, 100 dB). ``compiled_floor`` may be set by
    the caller to the quality of a compiled but otherwise identical run; :attr:`floor` is the worse of
    the two per metric, the level a candidate is judged against.
    """

    images: torch.Tensor
    latents: torch.Tensor | None
    workload: Workload
    noise_floor: dict[str, float] = field(default_factory=dict)
    compiled_floor: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_runs(
        cls, first: Measurement, second: Measurement | None = None, *, workload: Workload,
        info: dict[str, Any] | None = None,
    ) -> Reference:
        """A reference from a measured run, with the noise floor from a second identical run.

        Raises:
            FluxtuneError: the first run has no images (failed, or ``keep_images=False``).
        """
        if first.images is None:
            raise FluxtuneError(f"reference run has no images (status {first.status}: {first.error}); "
                                "measure it with keep_images=True")
        ref = cls(images=first.images, latents=first.latents, workload=workload, info=dict(info or {}))
        if second is not None and second.images is not None:
            ref.noise_floor = compare(second, ref)
        return ref

    @property
    def floor(self) -> dict[str, float]:
        """Per metric, the worse of the noise floor and the compiled floor."""
        out = dict(self.noise_floor)
        for key, value in (self.compiled_floor or {}).items():
            pick = WORST.get(key)
            out[key] = pick(out[key], value) if pick is not None and key in out else value
        return out

    def compare(self, candidate: Measurement) -> dict[str, float]:
        """:func:`compare` of a candidate against this reference."""
        return compare(candidate, self)

    def save(self, path: str | Path) -> Path:
        """Write the tensors to ``path`` (``torch.save`` of plain tensors) and the rest to a JSON sidecar
        (``path`` with suffix ``.json``).

        Returns:
            The sidecar's path.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.detach().cpu().contiguous()}
        if self.latents is not None:
            tensors["latents"] = self.latents.detach().cpu().contiguous()
        torch.save(tensors, p)
        side = _sidecar(p)
        side.write_text(json.dumps(json_safe({
            "format": "fluxtune-reference", "version": 1, "tensors": p.name,
            "workload": self.workload.to_dict(), "noise_floor": self.noise_floor,
            "compiled_floor": self.compiled_floor, "info": self.info,
            "images_shape": list(self.images.shape),
        }), indent=1))
        return side

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a reference written by :meth:`save` (tensors loaded with ``weights_only=True``).

        Raises:
            FluxtuneError: a file is missing or not a fluxtune reference.
        """
        p = Path(path)
        side = _sidecar(p)
        if not p.exists() or not side.exists():
            missing = p if not p.exists() else side
            raise FluxtuneError(f"reference {str(p)!r}: {str(missing)!r} does not exist; save one with Reference.save")
        try:
            meta = json.loads(side.read_text())
            tensors = torch.load(p, map_location="cpu", weights_only=True)
        except (json.JSONDecodeError, RuntimeError, OSError, EOFError) as e:
            raise FluxtuneError(f"reference {str(p)!r} cannot be read ({one_line(e)})") from None
        if meta.get("format") != "fluxtune-reference" or "images" not in tensors:
            raise FluxtuneError(f"reference {str(p)!r} is not a fluxtune reference")
        return cls(
            images=tensors["images"], latents=tensors.get("latents"),
            workload=Workload.from_dict(meta["workload"]),
            noise_floor={k: float(v) for k, v in (meta.get("noise_floor") or {}).items()},
            compiled_floor=meta.get("compiled_floor"), info=meta.get("info") or {},
        )


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json") if path.suffix != ".json" else path.with_suffix(".meta.json")
