"""Reports: trial tables (CSV/JSON), a latency-vs-VRAM plot with the budget line and the front, the
best-so-far curve, and an image grid of the finalists beside the reference."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxtune.units import format_bytes

GB = 1e9


def write_tables(table: Sequence[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    """``trials.csv`` and ``trials.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / "trials.json"
    js.write_text(json.dumps(list(table), indent=1, default=str))
    cs = folder / "trials.csv"
    keys: list[str] = []
    for row in table:
        keys += [k for k in row if k not in keys]
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)
    return cs, js


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def plot_latency_vs_memory(
    table: Sequence[dict[str, Any]],
    path: Path,
    *,
    budget: int | Sequence[int] | None,
    front: Sequence[int] = (),
    best: int | None = None,
    baselines: Sequence[dict[str, Any]] = (),
    title: str = "",
    memory_label: str = "peak VRAM (reserved)",
    label_points: bool = False,
    point_label: str = "feasible trials",
    baseline_label: str | None = None,
) -> Path:
    """Scatter of every measured trial (and baselines) by latency and peak memory, a line at each budget,
    the front; ``label_points`` writes each trial's ``name`` beside it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = [r for r in table if r.get("latency_s") and r.get("peak")]
    feas = [r for r in ok if r.get("feasible")]
    infeas = [r for r in ok if not r.get("feasible")]
    if infeas:
        ax.scatter([r["peak"] / GB for r in infeas], [r["latency_s"] for r in infeas], c="#bbbbbb", s=22,
                   label="infeasible trials", marker="x")
    if feas:
        ax.scatter([r["peak"] / GB for r in feas], [r["latency_s"] for r in feas], c="#3b7dd8", s=26,
                   label=point_label)
    fr = sorted((r for r in ok if r["trial"] in set(front)), key=lambda r: r["peak"])
    if fr:
        ax.plot([r["peak"] / GB for r in fr], [r["latency_s"] for r in fr], "-o", c="#e07b00", ms=5, label="Pareto front")
    for i, b in enumerate(baselines):
        if b.get("latency_s") and b.get("peak"):
            ax.scatter([b["peak"] / GB], [b["latency_s"]], c="#cc2222", marker="s", s=40,
                       label=baseline_label if i == 0 else None)
            ax.annotate(b["name"], (b["peak"] / GB, b["latency_s"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if best is not None:
        br = next((r for r in ok if r["trial"] == best), None)
        if br:
            ax.scatter([br["peak"] / GB], [br["latency_s"]], s=160, facecolors="none", edgecolors="#1a9c3e",
                       linewidths=2, label=f"best (trial {best})")
    if label_points:
        for r in feas:
            if r.get("name"):
                ax.annotate(r["name"], (r["peak"] / GB, r["latency_s"]), fontsize=7, color="#1f4f99",
                            xytext=(4, -10), textcoords="offset points")
    budgets = [budget] if isinstance(budget, int) else list(budget or [])
    names = ", ".join(format_bytes(x) for x in sorted(budgets))
    for i, cap in enumerate(sorted(budgets)):
        label = (f"budget{'s' if len(budgets) > 1 else ''} {names}") if i == 0 else None
        ax.axvline(cap / GB, color="#cc2222", ls="--", lw=1.2, label=label)
    ax.set_xlabel(f"{memory_label} [GB]")
    ax.set_ylabel("latency per call [s]")
    if ok and max(r["latency_s"] for r in ok) / max(1e-9, min(r["latency_s"] for r in ok)) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title or "fluxtune search: latency vs memory")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_best_so_far(curve: Sequence[tuple[int, float | None]], path: Path, *, baseline: float | None = None,
                     ylabel: str = "best feasible latency [s]", baseline_label: str = "baseline") -> Path:
    """The best feasible objective after each trial, with a baseline line when given."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [n + 1 for n, v in curve if v is not None]
    ys = [v for _, v in curve if v is not None]
    if xs:
        ax.step(xs, ys, where="post", c="#3b7dd8", label="best so far")
    if baseline is not None:
        ax.axhline(baseline, c="#cc2222", ls="--", label=f"{baseline_label} {baseline:.2f}")
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(tiles: Sequence[tuple[str, Any]], path: Path, *, cols: int = 4) -> Path | None:
    """A labelled grid of images (uint8 CxHxW or HxWxC tensors/arrays)."""
    import numpy as np

    if not tiles:
        return None
    plt = _plt()
    rows = math.ceil(len(tiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, img) in zip(axes.flat, tiles, strict=False):
        arr = np.asarray(img)
        if arr.ndim == 4:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)
        ax.imshow(arr.squeeze(), interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
