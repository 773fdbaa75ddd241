"""fluxtune presets: the shipped profiles, with what was measured for each."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from fluxtune.presets import list_presets, load_profile, preset_dir
    from fluxtune.units import format_bytes

    rows = []
    for name, path in sorted(list_presets().items(), key=lambda kv: load_profile(kv[1]).budget.vram or float("inf")):
        p = load_profile(path)
        m = p.measured
        measured = m is not None and m.status == "measured"
        rows.append({
            "name": name,
            "family": p.family,
            "budget": format_bytes(p.budget.vram) if p.budget.vram else "none",
            "latency_s": m.latency_s if measured and m else None,
            "peak": format_bytes(m.peak_reserved) if measured and m and m.peak_reserved else None,
            "measured_on": (m.hardware.get("name") if measured and m else None) or "unmeasured",
            "description": p.description,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no presets found in {preset_dir()}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("preset", "family", "budget", "latency", "peak VRAM", "measured on", "description")
    for r in rows:
        lat = f"{r['latency_s']:.2f}s" if r["latency_s"] else "-"
        table.add_row(*(str(x) for x in (r["name"], r["family"], r["budget"], lat, r["peak"] or "-",
                                           r["measured_on"], r["description"])))
    Console(width=160).print(table)
    return 0
