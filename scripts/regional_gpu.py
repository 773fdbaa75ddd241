"""Issue 20 on a CUDA machine: regional denoising against whole-image at large sizes, at equal budget.

    python scripts/regional_gpu.py OUTDIR      # writes OUTDIR/profiles/*.yaml and prints the bench commands

Each case starts from a shipped FLUX.1-dev preset (the 12 GB tier's ``flux-dev-12gb`` at 2048x2048 /
28 steps; the >12 GB tier's ``flux-dev-24gb`` at 1920x1088 / 50 steps) and gets the largest resident
transformer share, in 0.25 GB steps, that the memory model admits under the budget at that size with
its tiling: activations follow the tile, so a regional profile may keep more blocks resident. The bench
(``fluxtune bench --budget ... PROFILES``) then measures each in its own worker on the replica.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fluxtune.memory.facts import ModelFacts
from fluxtune.memory.model import predict
from fluxtune.presets import load_profile
from fluxtune.units import format_bytes

GB = 10**9

CASES = {
    # name: (preset, budget GB, width, height, steps, tiling)
    "t12-1024-whole": ("flux-dev-12gb", 12, 1024, 1024, 28, None),
    "t12-2048-whole": ("flux-dev-12gb", 12, 2048, 2048, 28, None),
    "t12-2048-regional-1024": ("flux-dev-12gb", 12, 2048, 2048, 28, {"mode": "regional", "tile": 1024, "overlap": 128}),
    "t12-2048-regional-1152": ("flux-dev-12gb", 12, 2048, 2048, 28, {"mode": "regional", "tile": 1152, "overlap": 128}),
    "t24-1080-whole": ("flux-dev-24gb", 24, 1920, 1088, 50, None),
    "t24-1080-regional-1024": ("flux-dev-24gb", 24, 1920, 1088, 50, {"mode": "regional", "tile": 1024, "overlap": 128}),
}


def main(out: Path) -> None:
    import yaml

    facts = ModelFacts.for_builtin("flux-dev-replica")
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    for name, (preset, budget, w, h, steps, tiling) in CASES.items():
        base = load_profile(preset)
        over = [f"name={name}", f"generation.width={w}", f"generation.height={h}", f"generation.steps={steps}"]
        over += [f"tiling.{k}={v}" for k, v in (tiling or {"mode": "none"}).items()]
        if w * h > 1024 * 1024 and budget <= 12:
            over += ["vae.tiling=true", "vae.tile_size=512"]  # a whole 2048x2048 decode alone needs > 12 GB
        off = base.transformer.offload
        chosen = None
        if getattr(off, "mode", None) == "partial":
            for quarter in range(int(budget * 4), 0, -1):
                trial = load_profile(base, [*over, f"transformer.offload.resident={quarter / 4}GB"])
                p = predict(trial, facts)
                if p.peak_vram <= budget * GB:
                    chosen, pred = trial, p
                    break
        else:
            chosen = load_profile(base, over)
            pred = predict(chosen, facts)
        if chosen is None:
            p = predict(load_profile(base, [*over, "transformer.offload.resident=0GB"]), facts)
            print(f"{name}: nothing fits {budget}GB: {format_bytes(p.peak_vram)} with no resident block, "
                  f"in phase {p.peak_phase}")
            continue
        data = chosen.model_dump(mode="json", exclude_none=True)
        data["description"] = (f"issue 20: {preset} at {w}x{h}, {steps} steps, regional denoising "
                               f"{'off' if not tiling else str(tiling['tile']) + ' px tiles, ' + str(tiling['overlap']) + ' px overlap'}; "
                               "resident share from the memory model")
        data.pop("variants", None)
        data.pop("measured", None)
        (out / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        resident = getattr(chosen.transformer.offload, "resident", None)
        print(f"{name}: {w}x{h}, {steps} steps, tiling {tiling or 'none'}, resident "
              f"{format_bytes(resident) if resident else 'all'}; predicted peak {format_bytes(pred.peak_vram)} "
              f"(activations {format_bytes(pred.activations)}) under {budget}GB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
