"""A study's report files (tables, plots, the finalists' grid), rebuilt from its Optuna storage.

The drawing lives in :mod:`fluxtune.report`, which knows nothing of Optuna; this module reads the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxtune.report import (
    image_grid,
    knobs_that_differ,
    plot_best_so_far,
    plot_latency_vs_memory,
    plot_latency_vs_quality,
    wrap,
    write_tables,
)
from fluxtune.search.results import best_so_far, best_trial, pareto_front, rows
from fluxtune.search.study import CONFIG_KEY

__all__ = ["build"]


def build(study: Any, folder: Path) -> dict[str, Path]:
    """Every report file of a study, (re)built from its storage and image folder."""
    import torch

    cfg = study.user_attrs.get(CONFIG_KEY, {})
    table = rows(study)
    out: dict[str, Path] = {}
    out["csv"], out["json"] = write_tables(table, folder)
    best = best_trial(study)
    if cfg.get("objective") == "pareto":
        front = [t.number + 1 for t in pareto_front(study)]  # as rows() number them: from 1
    else:
        front = _memory_front(table)
    on_gpu = any(str(d).startswith("cuda") for d in cfg.get("devices", []))
    chosen = best.number + 1 if best else None
    out["plot"] = plot_latency_vs_memory(
        table, folder / "latency_vs_memory.png", budget=cfg.get("budget_bytes"), front=front,
        best=chosen, title=f"{study.study_name}: {cfg.get('model')} ({cfg.get('objective')})",
        memory_label="peak VRAM (reserved)" if on_gpu else "peak host RAM", max_latency=cfg.get("max_latency"),
    )
    if cfg.get("objective") in ("pareto", "quality"):
        out["quality_plot"] = plot_latency_vs_quality(
            table, folder / "latency_vs_psnr.png", front=front if cfg.get("objective") == "pareto" else (),
            best=chosen, min_psnr=cfg.get("min_psnr"), max_latency=cfg.get("max_latency"),
            title=f"{study.study_name}: {cfg.get('model')} ({cfg.get('objective')})")
    ref = study.user_attrs.get("fluxtune_reference", {})
    out["progress"] = _progress_plot(study, table, ref, cfg.get("objective"), folder / "best_so_far.png")
    tiles: list[tuple[Any, ...]] = []
    ref_file = folder / "reference.pt"
    if ref_file.exists():
        ref_imgs = torch.load(ref_file, weights_only=True)
        if isinstance(ref_imgs, dict):
            ref_imgs = ref_imgs.get("images")
        if ref_imgs is not None:
            tiles.append(("reference", (ref_imgs[:1].clamp(0, 1) * 255).round().to(torch.uint8)))
    finalists = sorted((r for r in table if r["feasible"] and r.get("latency_s")), key=lambda r: r["latency_s"])[:7]
    if chosen is not None and all(r["trial"] != chosen for r in finalists):  # e.g. quality objective
        finalists = [r for r in table if r["trial"] == chosen] + finalists[:6]
    knobs = knobs_that_differ(finalists)
    for r in finalists:
        f = folder / "images" / f"trial_{r['trial'] - 1:04d}.pt"  # the worker names them by Optuna's number
        if f.exists():
            psnr = r.get("psnr")
            label = (f"{'chosen: ' if r['trial'] == chosen else ''}#{r['trial']} {r['latency_s']:.2f}s"
                     + (f" {min(psnr, 100):.1f}dB" if psnr else ""))
            label += "\n" + wrap(knobs.get(r["trial"], ""), 38)
            tiles.append((label, torch.load(f, weights_only=True), r["trial"] == chosen))
    grid = image_grid(tiles, folder / "finalists.png")
    if grid:
        out["grid"] = grid
    return out


def _progress_plot(study: Any, table: Sequence[dict[str, Any]], ref: dict[str, Any], objective: str | None,
                   path: Path) -> Path:
    """Best so far against the baseline that matters: the fastest diffusers recipe that fit, measured in
    this same study (else the lossless reference)."""
    if objective == "throughput":
        return plot_best_so_far(best_so_far(study), path, ylabel="best feasible throughput [images/s]")
    if objective == "quality":
        return plot_best_so_far(best_so_far(study), path, ylabel="best feasible PSNR [dB]")
    recipes = [r for r in table if str(r.get("source", "")).startswith("recipe") and r["feasible"] and r.get("latency_s")]
    if recipes:
        fastest = min(recipes, key=lambda r: r["latency_s"])
        return plot_best_so_far(best_so_far(study), path, baseline=fastest["latency_s"],
                                baseline_label=f"fastest recipe ({fastest['source'][7:]})")
    return plot_best_so_far(best_so_far(study), path, baseline=ref.get("latency_s"), baseline_label="reference")


def _memory_front(table: Sequence[dict[str, Any]]) -> list[int]:
    """Feasible trials no other feasible trial beats on both latency and peak memory."""
    pts = [r for r in table if r["feasible"] and r.get("latency_s") and r.get("peak")]
    front = [r["trial"] for r in pts if not any(
        o["latency_s"] <= r["latency_s"] and o["peak"] <= r["peak"] and (o["latency_s"] < r["latency_s"] or o["peak"] < r["peak"])
        for o in pts)]
    return front
