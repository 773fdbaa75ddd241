"""``fluxtune bench``: profiles side by side with the plain diffusers recipes, same workload, same cap.

Each candidate runs in its own worker process (a fresh CUDA context and allocator), under the same
memory cap; a recipe that does not fit is shown as such, not dropped. The first candidate measured is
the bf16 reference that quality is computed against.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtune.profile import COMPONENTS, Profile, validate_profile
from fluxtune.units import format_bytes

GB = 1e9


def _all(mode: dict[str, Any], *, vae: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {name: {"offload": dict(mode)} for name in COMPONENTS}
    if vae is not None:
        out["vae"] = {"offload": vae}
    return out


def recipes(family: str) -> dict[str, dict[str, Any]]:
    """The diffusers one-liners, as fluxtune profiles (what a user would write by hand)."""
    leaf = {"mode": "group", "level": "leaf", "use_stream": True}
    block = {"mode": "group", "level": "block", "blocks_per_group": 1, "use_stream": True}
    out = {
        "bf16": {},
        "enable_model_cpu_offload": _all({"mode": "model"}),
        "enable_sequential_cpu_offload": _all({"mode": "sequential"}),
        "group offload, block level, streams": _all(block, vae=leaf),
        "group offload, leaf level, streams": _all(leaf),
        "flux-fast core (fused QKV, fp8 rowwise, regional compile)": {
            "transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"}},
            "compile": {"mode": "regional", "fullgraph": True, "fuse_qkv": True},
        },
    }
    if family == "dit":
        # DiT has no text encoders; its transformer is small, so block-level grouping is per block.
        out.pop("flux-fast core (fused QKV, fp8 rowwise, regional compile)")
        out["fp8 rowwise + compile"] = {"transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"}},
                                        "compile": {"mode": "regional", "fullgraph": True}}
    return out


@dataclass
class Candidate:
    name: str
    profile: Profile
    kind: str  # "profile" | "recipe" | "reference"


@dataclass
class BenchRow:
    name: str
    kind: str
    status: str
    latency_s: float | None = None
    latency_spread: float | None = None
    first_call_s: float | None = None
    peak_reserved: int | None = None
    peak_allocated: int | None = None
    peak_nvml: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    apply_s: float | None = None
    quantize_s: float | None = None
    generations: int = 0
    """Calls that ran back to back under the cap (warm-up and timed), all without running out of memory."""
    fd: float | None = None
    kid: float | None = None
    """DiT ``--samples``: distribution shift from the reference's samples (:mod:`fluxtune.distribution`)."""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.status == "ok"


def make_candidates(profiles: list[Profile], family: str, budget: int | None, with_recipes: bool,
                    generation: dict[str, Any]) -> list[Candidate]:
    """The reference first, then the recipes (under the cap), then the user's profiles."""

    def prof(name: str, data: dict[str, Any]) -> Profile:
        data = {**data, "name": name, "generation": {**generation, **data.get("generation", {})}}
        if budget is not None:
            data["budget"] = {"vram": budget, "enforce": True}
        return validate_profile(data, source=f"recipe {name!r}")

    out = [Candidate("reference (bf16, no cap)", validate_profile({"name": "reference", "generation": generation}),
                     "reference")]
    if with_recipes:
        out += [Candidate(n, prof(n, d), "recipe") for n, d in recipes(family).items()]
    for p in profiles:
        data = p.to_dict()
        if budget is not None:
            data["budget"] = {"vram": budget, "enforce": True}
        out.append(Candidate(p.name, validate_profile(data), "profile"))
    return out


def run_bench(
    candidates: list[Candidate],
    *,
    model: str,
    device: str,
    workload: dict[str, Any],
    folder: Path,
    dtype: str = "bfloat16",
    timeout_s: float = 900.0,
    samples: int = 0,
    say: Callable[[str], None] = print,
) -> list[BenchRow]:
    """Run every candidate in a fresh worker process; the first is the quality reference.

    ``samples`` (class-conditional models): each candidate also renders that many samples on fixed
    labels and seeds, and its row gets their distribution shift from the reference's (FD and KID in
    :mod:`fluxtune.distribution`'s random-feature space; not FID)."""
    from fluxtune.search.runner import Worker, WorkerDied
    from fluxtune.search.worker import WorkerConfig

    folder.mkdir(parents=True, exist_ok=True)
    rows: list[BenchRow] = []
    ref_feats: list[list[float]] | None = None
    for i, cand in enumerate(candidates):
        budget = cand.profile.budget.vram
        cfg = WorkerConfig(model=model, device=device, dtype=dtype, workload=workload, budget_bytes=budget,
                           study_dir=str(folder), extra={"fixed_workload": True})
        t0 = time.monotonic()
        say(f"[{i + 1}/{len(candidates)}] {cand.name} ...")
        try:
            worker = Worker(cfg)
            try:
                result = worker.run(i, cand.profile.to_dict(), timeout_s, reference=cand.kind == "reference",
                                    samples=samples)
            finally:
                worker.stop()
        except WorkerDied as e:
            result = {"status": "crashed", "error": str(e)}
        rows.append(_row(cand, result))
        r = rows[-1]
        if result.get("features_error"):
            say(f"    samples failed: {result['features_error']}")
        feats = result.get("features")
        if feats is not None and cand.kind == "reference":
            ref_feats = feats
        elif feats is not None and ref_feats is not None and len(feats) == len(ref_feats):
            import torch

            from fluxtune.distribution import compare_features

            shift = compare_features(torch.tensor(feats, dtype=torch.float64),
                                     torch.tensor(ref_feats, dtype=torch.float64))
            r.fd, r.kid = shift.fd, shift.kid_mean
        lat = f"{r.latency_s:.2f}s" if r.latency_s else "-"
        say(f"    {r.status}: {lat}, peak {format_bytes(r.peak_reserved or 0)} ({time.monotonic() - t0:.0f}s)"
            + (f" - {r.error}" if r.error and r.status != "ok" else ""))
    (folder / "bench.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return rows


def _row(cand: Candidate, result: dict[str, Any]) -> BenchRow:
    m = result.get("measurement") or {}
    q = result.get("quality") or {}
    runs = m.get("latency_runs") or []
    spread = (max(runs) - min(runs)) if len(runs) > 1 else None
    return BenchRow(
        name=cand.name, kind=cand.kind, status=str(result.get("status")), latency_s=m.get("latency_s"),
        latency_spread=spread, first_call_s=m.get("first_call_s"), peak_reserved=m.get("peak_reserved"),
        peak_allocated=m.get("peak_allocated"), peak_nvml=m.get("peak_nvml"), psnr=q.get("psnr"), ssim=q.get("ssim"),
        apply_s=result.get("apply_s"), quantize_s=result.get("quantize_s"), error=result.get("error"),
        generations=(len(m.get("warmup_s") or []) + len(runs)) if result.get("status") == "ok" else 0,
        extra={k: m.get(k) for k in ("text_encode_s", "step_s", "decode_s", "host_ram_peak")},
    )


def speedups(rows: list[BenchRow]) -> list[tuple[str, str, float]]:
    """(profile, fastest recipe that fits, ratio) for each profile row."""
    fitting = [r for r in rows if r.kind == "recipe" and r.fits and r.latency_s]
    if not fitting:
        return []
    best = min(fitting, key=lambda r: r.latency_s or 0.0)
    return [(r.name, best.name, (best.latency_s or 0) / r.latency_s) for r in rows
            if r.kind == "profile" and r.fits and r.latency_s]


def plot(rows: list[BenchRow], path: Path, budget: int | None, title: str) -> Path:
    from fluxtune.report import plot_latency_vs_memory

    table = [{"trial": i, "latency_s": r.latency_s, "peak": r.peak_reserved, "feasible": r.fits}
             for i, r in enumerate(rows) if r.kind == "profile"]
    baselines = [{"name": r.name[:28], "latency_s": r.latency_s, "peak": r.peak_reserved}
                 for r in rows if r.kind != "profile" and r.fits]
    return plot_latency_vs_memory(table, path, budget=budget, baselines=baselines, title=title)
