"""Write the rows of scripts/h200_tier_bench.sh into the presets' measured blocks (issue 14).

    python scripts/tier_measured.py OUTDIR [--date 2026-12-02]

OUTDIR holds tier.jsonl (one line per case: ``{"case": "PRESET|CARD|WxH|STEPS", "row": <bench row>}``) and
versions.json. Each case lands in the measured block of the variant the card runs (``base`` for CARD none):
the 1024x1024 / 28-step run is the block itself, other workloads go to its ``workloads`` list. A case that did
not finish (an OOM, a crash) is written too, with its status, so a failure is never hidden.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from fluxtune.gpus import find_gpu
from fluxtune.hardware import HardwareInfo, emulated, emulation_note
from fluxtune.presets import list_presets, load_profile, save_profile

H200 = HardwareInfo(gpu_index=0, gpu_name="NVIDIA H200", total_memory_bytes=150754820096, compute_capability=(9, 0),
                    driver="580.159.04", cuda_version="13.0", torch_version="2.11.0", host_ram_bytes=0, cpu_count=16)
H100 = HardwareInfo(gpu_index=0, gpu_name="NVIDIA H100 80GB HBM3", total_memory_bytes=85520809984,
                    compute_capability=(9, 0), driver="580.159.04", cuda_version="13.0", torch_version="2.11.0",
                    host_ram_bytes=0, cpu_count=16)
LAB = {hw.gpu_name: hw for hw in (H200, H100)}
"""The lent GPUs a bench may have run on, by name (a bench.json's ``meta.machine``)."""


def measured_block(row: dict[str, Any], *, card: str, model: str, source: str, versions: dict[str, str], date: str,
                   workload: dict[str, Any], host_rss: bool = False, notes: str = "",
                   host: HardwareInfo = H200) -> dict[str, Any]:
    """A preset's measured block from one bench row run on ``host`` under ``card``'s emulation ("none": the
    host as it is).

    ``host_rss`` also records the row's peak host RSS; ``notes`` is appended to the generated notes."""
    hw = host if card == "none" else emulated(host, card)
    ok = row.get("status") == "ok"
    block: dict[str, Any] = {
        "status": "measured", "source": source + (f' --emulate "{card}"' if card != "none" else ""),
        "date": date, "hardware": hw.fingerprint(),
        "versions": {k: versions[k] for k in ("torch", "diffusers", "torchao", "transformers") if k in versions},
        "model": model,
        "workload": {"prompts": ["a photo of a red fox in the snow, detailed fur, morning light"], "seeds": [0],
                     "runs": row.get("runs"), "warmup": 1, **workload},
        "latency_s": round(row["latency_s"], 3) if ok and row.get("latency_s") else None,
        "first_call_s": round(row["first_call_s"], 2) if row.get("first_call_s") else None,
        "peak_allocated": row.get("peak_allocated"), "peak_reserved": row.get("peak_reserved"),
        "peak_nvml": row.get("peak_nvml"),
    }
    if host_rss:
        block["peak_host_rss"] = (row.get("extra") or {}).get("host_ram_peak")
    where = (f"the {card} budget" if card != "none" else
             f"a {row['cap'] / 1e9:g} GB cap on the {host.gpu_name} (no card emulated)" if row.get("cap") else
             f"the {host.gpu_name}'s memory")
    block["notes"] = (f"{row.get('generations', 0)} generations back to back under {where}, status {row.get('status')}" + (f": {row.get('error')}" if row.get("error") else "")
                      + (f"; apply {row['apply_s']:.2f} s" if row.get("apply_s") else "") + notes)
    block["emulation"] = emulation_note(hw)
    return block


def store_block(data: dict[str, Any], variant: str, block: dict[str, Any]) -> None:
    """Put ``block`` into profile ``data`` as the measurement of ``variant`` ("base": the profile itself)."""
    if variant == "base":
        data["measured"] = block
        return
    for v in data["variants"]:
        if v["name"] == variant:
            v["measured"] = block


def _entry(case: str, row: dict[str, Any], versions: dict[str, str], date: str) -> tuple[str, str, dict[str, Any]]:
    preset, card, size, steps = case.split("|")
    w, h = (int(x) for x in size.split("x"))
    variant = load_profile(preset).for_class(find_gpu(card).capability if card != "none" else "hopper").variant
    measured = measured_block(row, card=card, model="flux-dev-replica", source="fluxtune bench", versions=versions,
                              date=date, workload={"height": h, "width": w, "steps": int(steps)})
    return preset, str(variant), measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    folder = Path(args.outdir)
    versions = json.loads((folder / "versions.json").read_text())
    blocks: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in (folder / "tier.jsonl").read_text().splitlines():
        item = json.loads(line)
        preset, variant, measured = _entry(item["case"], item["row"], versions, args.date)
        blocks.setdefault((preset, variant), []).append(measured)
    for (preset, variant), runs in sorted(blocks.items()):
        main_run = next((r for r in runs if (r["workload"]["width"], r["workload"]["height"], r["workload"]["steps"])
                         == (1024, 1024, 28)), runs[0])
        others = [{"width": r["workload"]["width"], "height": r["workload"]["height"], "steps": r["workload"]["steps"],
                   "runs": r["workload"]["runs"], "latency_s": r["latency_s"], "first_call_s": r["first_call_s"],
                   "peak_reserved": r["peak_reserved"], "peak_nvml": r["peak_nvml"], "notes": r["notes"]}
                  for r in runs if r is not main_run]
        block = {**main_run, "workloads": others}
        path = list_presets()[preset]
        data = load_profile(path).to_dict(exclude_defaults=True)
        store_block(data, variant, block)
        save_profile(load_profile(data), path)
        print(f"{preset} [{variant}]: {block['latency_s']} s, NVML peak {(block['peak_nvml'] or 0) / 1e9:.2f} GB"
              f" (+{len(others)} other workload(s)) -> {path}")


if __name__ == "__main__":
    main()
