"""fluxtune presets: the shipped profiles, their variants per GPU class, and the cards of each tier."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help='a card from the GPU table, e.g. "RTX 4060": which variant runs on it, and its predicted latency')
    p.add_argument("--json", action="store_true", help="print JSON")


def _measured(p: Any) -> tuple[float | None, int | None, str]:
    m = p.measured
    if m is None or m.status != "measured":
        return None, None, "unmeasured"
    where = m.hardware.get("name") or "?"
    if m.hardware.get("emulated_on"):
        where = f"{where} (emulated on {m.hardware['emulated_on']})"
    return m.latency_s, m.peak_nvml or m.peak_reserved, where


def rows(gpu: Any | None = None) -> list[dict[str, Any]]:
    """One row per preset and variant: the classes and tier cards it runs on, what was measured, and, for
    ``gpu``, whether it is the variant that card runs and the predicted latency there."""
    from fluxtune.gpus import gpu_table
    from fluxtune.presets import list_presets, load_profile, preset_for_card
    from fluxtune.units import format_bytes

    out: list[dict[str, Any]] = []
    presets = sorted(list_presets().items(), key=lambda kv: load_profile(kv[1]).budget.vram or float("inf"))
    for name, path in presets:
        profile = load_profile(path)
        cards = [s for s in gpu_table() if preset_for_card(s.memory_gib, profile.family) == name]
        for variant, classes, resolved in profile.variant_table():
            if not classes and variant == "base":
                continue  # every class has a variant of its own
            latency, peak, where = _measured(resolved)
            row: dict[str, Any] = {
                "preset": name, "variant": variant, "family": profile.family,
                "budget": format_bytes(profile.budget.vram) if profile.budget.vram else "none",
                "classes": list(classes),
                "tier_cards": [s.name for s in cards if s.capability in classes],
                "latency_s": latency, "peak": format_bytes(peak) if peak else None, "measured_on": where,
            }
            if gpu is not None:
                runs_here = gpu.capability in classes
                row["runs_on_gpu"] = runs_here
                row["predicted_s"] = _predicted(resolved, gpu) if runs_here else None
            out.append(row)
    return out


def _predicted(profile: Any, gpu: Any) -> float | None:
    try:
        from fluxtune.predict import predict_latency
    except ImportError:  # pragma: no cover - predict ships with fluxtune
        return None
    try:
        return float(predict_latency(profile, gpu).total_s)
    except Exception:  # a prediction is a convenience column: one that cannot be made stays empty
        return None


def run(args: argparse.Namespace) -> int:
    import json

    from fluxtune.presets import preset_dir

    gpu = None
    if args.gpu:
        from fluxtune.gpus import find_gpu

        gpu = find_gpu(args.gpu)
    table_rows = rows(gpu)
    if args.json:
        print(json.dumps(table_rows, indent=2))
        return 0
    if not table_rows:
        print(f"no presets found in {preset_dir()}")
        return 0
    from rich.console import Console
    from rich.table import Table

    cols = ["preset", "variant", "budget", "runs on (class: tier cards)", "measured latency", "peak (NVML)", "measured on"]
    if gpu is not None:
        cols.append(f"predicted on {gpu.name}")
    table = Table(*cols, title="shipped presets (fluxtune show NAME --gpu CARD prints one resolved)")
    for r in table_rows:
        if gpu is not None and not r["runs_on_gpu"]:
            continue
        lat = f"{r['latency_s']:.2f}s" if r["latency_s"] else "-"
        cards = r["tier_cards"][:6] + ([f"+{len(r['tier_cards']) - 6} more"] if len(r["tier_cards"]) > 6 else [])
        runs = ", ".join(r["classes"]) + (f": {', '.join(cards)}" if cards else "")
        cells = [r["preset"], r["variant"], r["budget"], runs, lat, r["peak"] or "-", r["measured_on"]]
        if gpu is not None:
            cells.append(f"{r['predicted_s']:.1f}s predicted" if r["predicted_s"] else "-")
        table.add_row(*cells)
    Console(width=200).print(table)
    if gpu is not None:
        from fluxtune.presets import preset_for_card

        tier = preset_for_card(gpu.memory_gib)
        print(f"{gpu.describe()}\nits tier's FLUX preset: {tier or 'none (less than 8 GB)'}")
    return 0
