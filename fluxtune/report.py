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
    import io

    from fluxtune.presets import write_atomic

    js = write_atomic(folder / "trials.json", json.dumps(list(table), indent=1, default=str))
    keys: list[str] = []
    for row in table:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(table)
    cs = write_atomic(folder / "trials.csv", buf.getvalue())
    return cs, js


def _save(fig: Any, path: Path, dpi: int) -> Path:
    """Save a figure whole (labels at the edges kept) through a temporary file."""
    import io

    from fluxtune.presets import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return write_atomic(path, buf.getvalue())


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
    max_latency: float | None = None,
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
    if max_latency is not None:
        ax.axhline(max_latency, color="#7a3db8", ls=":", lw=1.4, label=f"--max-latency {max_latency:g}s")
    ax.set_xlabel(f"{memory_label} [GB]")
    ax.set_ylabel("latency per call [s]")
    lats = [r["latency_s"] for r in ok] + [b["latency_s"] for b in baselines if b.get("latency_s")]
    if lats and max(lats) / max(1e-9, min(lats)) > 8:
        ax.set_yscale("log")  # one slow recipe would otherwise flatten the rest against the axis
    peaks = [r["peak"] for r in ok] + [b["peak"] for b in baselines if b.get("peak")] + list(budgets)
    if peaks and max(peaks) / max(1.0, min(peaks)) > 8:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "fluxtune search: latency vs memory")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    if not ok and not baselines:
        ax.text(0.5, 0.5, "no measured point yet", ha="center", va="center", transform=ax.transAxes, color="#888")
    fig.tight_layout()
    return _save(fig, path, 110)


def plot_latency_vs_quality(table: Sequence[dict[str, Any]], path: Path, *, front: Sequence[int] = (),
                            best: int | None = None, min_psnr: float | None = None,
                            max_latency: float | None = None, title: str = "") -> Path:
    """PSNR against latency for every measured trial: the trade-off the pareto and quality objectives
    search, with the front, the chosen trial, the quality floor and the latency cap."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = [r for r in table if r.get("latency_s") and r.get("psnr") is not None]
    cap = lambda v: min(float(v), 100.0)  # noqa: E731  (identical images read as PSNR inf; drawn at 100)
    feas = [r for r in ok if r.get("feasible")]
    infeas = [r for r in ok if not r.get("feasible")]
    if infeas:
        ax.scatter([r["latency_s"] for r in infeas], [cap(r["psnr"]) for r in infeas], c="#bbbbbb", s=22,
                   marker="x", label="infeasible trials")
    if feas:
        ax.scatter([r["latency_s"] for r in feas], [cap(r["psnr"]) for r in feas], c="#3b7dd8", s=26,
                   label="feasible trials")
    fr = sorted((r for r in ok if r["trial"] in set(front)), key=lambda r: r["latency_s"])
    if fr:
        ax.plot([r["latency_s"] for r in fr], [cap(r["psnr"]) for r in fr], "-o", c="#e07b00", ms=5,
                label="Pareto front")
    for r in ok:
        ax.annotate(f"#{r['trial']}", (r["latency_s"], cap(r["psnr"])), fontsize=7, xytext=(3, 3),
                    textcoords="offset points", color="#555")
    br = next((r for r in ok if r["trial"] == best), None)
    if br:
        ax.scatter([br["latency_s"]], [cap(br["psnr"])], s=160, facecolors="none", edgecolors="#1a9c3e",
                   linewidths=2, label=f"chosen (trial {best})")
    if min_psnr is not None:
        ax.axhline(min_psnr, color="#cc2222", ls="--", lw=1.2, label=f"quality floor {min_psnr:g} dB")
    if max_latency is not None:
        ax.axvline(max_latency, color="#7a3db8", ls=":", lw=1.4, label=f"--max-latency {max_latency:g}s")
    ax.set_xlabel("latency per call [s]")
    ax.set_ylabel("PSNR vs the lossless reference [dB] (identical: 100)")
    ax.margins(x=0.12, y=0.12)
    ax.grid(alpha=0.3)
    ax.set_title(title or "fluxtune search: latency vs quality")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path, 110)


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
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are counted, never fractional
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 110)


def image_grid(tiles: Sequence[tuple[Any, ...]], path: Path, *, cols: int = 4) -> Path | None:
    """A labelled grid of images (uint8 CxHxW or HxWxC tensors/arrays); a tile is (label, image) or
    (label, image, chosen), and the chosen one gets a green frame."""
    import numpy as np

    if not tiles:
        return None
    plt = _plt()
    rows = math.ceil(len(tiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, tiles, strict=False):
        label, img = tile[0], tile[1]
        chosen = len(tile) > 2 and bool(tile[2])
        arr = np.asarray(img)
        if arr.ndim == 4:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)
        ax.imshow(arr.squeeze(), interpolation="nearest")
        ax.set_title(label, fontsize=7.5, color="#1a9c3e" if chosen else "black",
                     fontweight="bold" if chosen else "normal")
        if chosen:  # a green frame around the profile the search chose
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("#1a9c3e")
                spine.set_linewidth(4)
    fig.tight_layout()
    return _save(fig, path, 100)


def knobs_that_differ(table: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Each trial's config reduced to the ``k=v`` words in which the given trials differ."""
    parsed = {r["trial"]: dict(w.split("=", 1) for w in str(r.get("config") or "").split() if "=" in w) for r in table}
    keys = list(dict.fromkeys(k for d in parsed.values() for k in d))
    varying = [k for k in keys if len({d.get(k, "") for d in parsed.values()}) > 1] if len(table) > 1 else keys
    return {n: " ".join(f"{k}={d[k]}" for k in varying if k in d) or "the same knobs" for n, d in parsed.items()}


def wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])
