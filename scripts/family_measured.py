"""Turn issue 19's benches (scripts/h200_issue19.sh) into shipped presets with their measured blocks.

    python scripts/family_measured.py BENCHDIR VERSIONS.json NAME[=BENCH.json] ... [--date 2026-12-04] [--note NAME:TEXT]

BENCHDIR holds ``candidates/NAME.yaml`` and ``NAME/bench.json`` for each candidate. ``NAME=PATH`` reads the
profile's row from another bench.json (a re-run of the candidate alone, e.g. with less resident, given as
``--set NAME:KEY=VALUE`` overrides of the candidate) and the recipes' rows still from ``NAME/bench.json``;
``--row NAME:ROW`` takes the profile row named ROW (an A/B profile beside the candidate in one bench). The GPU the
bench ran on (the H200 or the H100) is read from its bench.json.
The preset is written to ``profiles/NAME.yaml`` (blocks built as scripts/tier_measured.py builds them): the
candidate's knobs, a description, and the measurement in the variant the emulated card runs (the base for
an unemulated run), with the fastest diffusers recipe that fitted the same cap in the same bench. A row
that did not finish is written with its status, so a failure is never hidden.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import yaml

from fluxtune.gpus import find_gpu
from fluxtune.presets import load_profile, save_profile

DESCRIPTIONS = {
    "flux2-klein-4b-8gb": "FLUX.2 [klein] 4B on 8 GB cards (RTX 4060, 3070): fp8 transformer 3 GB resident, the rest "
                          "streamed; Qwen3-4B encoder int8 and streamed; regional compile (first call ~22 s)",
    "flux2-klein-9b-12gb": "FLUX.2 [klein] 9B on 12 GB cards (RTX 4070, 3060 12GB): fp8 transformer 5 GB resident, "
                           "the rest streamed; Qwen3-8B encoder int8 and streamed; regional compile",
    "flux2-dev-24gb": "FLUX.2 [dev] on 24 GB cards (RTX 4090, 3090): fp8 transformer 12.5 GB resident, the rest "
                      "streamed; Mistral-Small-3.1 encoder int8 and streamed; regional compile",
    "flux2-dev-32gb": "FLUX.2 [dev] on 32 GB cards (RTX 5090): fp8 transformer 20 GB resident, the rest streamed; "
                      "Mistral-Small-3.1 encoder int8 and streamed; regional compile",
    "qwen-image-24gb": "Qwen-Image on 24 GB cards (RTX 4090, 3090): fp8 transformer 18 GB resident, the rest "
                       "streamed; Qwen2.5-VL-7B encoder int8 and streamed; VAE tiled; regional compile",
    "qwen-image-16gb": "Qwen-Image on 16 GB cards (RTX 4080, 4070 Ti Super, 4060 Ti 16GB, 5060 Ti 16GB): fp8 "
                       "transformer 10.5 GB resident, the rest streamed; its 120 modulation layers (6.8 B weights) "
                       "in host memory, their outputs cached per timestep (modulation.cache); Qwen2.5-VL-7B encoder "
                       "int8 and streamed; VAE tiled; regional compile",
}


def _bench(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A bench.json's rows and the machine they ran on (empty for benches before it was recorded)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return list(data), {}
    return list(data["rows"]), (data.get("meta") or {}).get("machine") or {}


def _versus(row: dict[str, Any], recipes: list[dict[str, Any]]) -> str:
    """The notes' sentence on the fastest recipe that fitted the same cap in the same bench."""
    fitted = [r for r in recipes if r.get("status") == "ok" and r.get("latency_s")]
    best = min(fitted, key=lambda r: r["latency_s"], default=None)
    if best is None or row.get("status") != "ok":
        return ""
    return (f"; fastest diffusers recipe that fitted the same cap in the same bench: {best['name']}, "
            f"{best['latency_s']:.2f} s over {best.get('runs')} timed run(s) ({best['latency_s'] / row['latency_s']:.2f}x "
            "slower)")


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from family_candidates import CANDIDATES
    from tier_measured import H200, LAB, measured_block, store_block

    from fluxtune.presets import apply_overrides

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchdir", type=Path)
    ap.add_argument("versions", type=Path)
    ap.add_argument("names", nargs="+")
    ap.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE")
    ap.add_argument("--row", action="append", default=[], metavar="NAME:ROW", help="NAME's measurement is row ROW")
    ap.add_argument("--note", action="append", default=[], metavar="NAME:TEXT", help="appended to NAME's notes")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--out", type=Path, default=Path("profiles"))
    args = ap.parse_args()
    versions = json.loads(args.versions.read_text())
    for item in args.names:
        name, _, row_path = item.partition("=")
        replica, _budget, card = CANDIDATES[name]
        cand = yaml.safe_load((args.benchdir / "candidates" / f"{name}.yaml").read_text())
        cand = apply_overrides(cand, [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == name])
        cand["description"] = DESCRIPTIONS[name]
        bench_rows, machine = _bench(args.benchdir / name / "bench.json")
        rows, machine = _bench(Path(row_path)) if row_path else (bench_rows, machine)
        recipes = [r for r in bench_rows if r["kind"] == "recipe"]
        # The candidate's own row (a bench may hold an A/B profile beside it), else its first profile row.
        profiles = [r for r in rows if r["kind"] == "profile"]
        want = next((r.split(":", 1)[1] for r in args.row if r.split(":", 1)[0] == name), name)
        row = next((r for r in profiles if r["name"] == want), None)
        if row is None and want != name:
            raise SystemExit(f"--row {name}:{want}: no profile row {want!r} in {row_path or 'the bench'}; rows: "
                             f"{', '.join(r['name'] for r in profiles)}")
        row = row or profiles[0]
        host = LAB.get(machine.get("emulated_on") or machine.get("gpu") or "", H200)  # benches before 'machine': H200
        gen = cand.get("generation", {})
        block = measured_block(
            row, card=card, model=replica, source="fluxtune bench --baselines", versions=versions, date=args.date,
            workload={k: gen.get(k) for k in ("height", "width", "steps")}, host_rss=True,
            notes="; host RSS is the bench worker's, on the replica built on the GPU (not a save_pretrained load)"
            + _versus(row, recipes) + "".join(f"; {n.split(':', 1)[1]}" for n in args.note if n.split(":", 1)[0] == name),
            host=host)
        profile = load_profile(cand)
        variant = profile.for_class(find_gpu(card).capability if card != "none" else "hopper").variant
        data = profile.to_dict(exclude_defaults=True)
        store_block(data, str(variant), block)
        path = args.out / f"{name}.yaml"
        save_profile(load_profile(data), path)
        print(f"{name} [{variant}]: {block['latency_s']} s, NVML peak {(block['peak_nvml'] or 0) / 1e9:.2f} GB -> {path}")
        print(f"    {block['notes']}")


if __name__ == "__main__":
    main()
