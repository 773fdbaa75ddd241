"""fluxtune bench: profiles side by side with the plain diffusers recipes, same workload and cap."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profiles", nargs="*", help="profile YAML files or preset names")
    p.add_argument("--baselines", action="store_true", help="also run the diffusers recipes")
    p.add_argument("--recipes", default=None,
                   help="comma-separated words picking some recipes, e.g. model,leaf (default: all with --baselines)")
    p.add_argument("--budget", default=None, help="memory cap for every candidate, e.g. 12GB")
    p.add_argument("--model", default="flux-mini", help="built-in name, local path or hub id")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: each profile's / the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps for every candidate")
    p.add_argument("--runs", type=int, default=3,
                   help="timed repeats after one warm-up, back to back under the cap (default 3; 10 checks that "
                   "ten consecutive generations never run out of memory)")
    p.add_argument("--prompt", action="append", default=None, help="workload prompt (repeatable)")
    p.add_argument("--out", default=".fluxtune/bench", help="folder for bench.json, the table and the plot")
    p.add_argument("--no-reference", action="store_true", help="skip the bf16 reference run (no quality column)")
    p.add_argument("--samples", type=int, default=0,
                   help="DiT: also render N samples per candidate and report their distribution shift from the "
                   "reference's (FD/KID in a fixed random-feature space, not FID); a few hundred is typical")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: the GPU if there is one)")
    p.add_argument("--dtype", default=None, help="load dtype (default: bfloat16, or a built-in's own)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fluxtune import pipelines
    from fluxtune.bench import make_candidates, plot, run_bench, speedups
    from fluxtune.cli.search import default_workload
    from fluxtune.errors import ProfileError
    from fluxtune.hardware import detect_hardware
    from fluxtune.presets import load_profile
    from fluxtune.units import format_bytes, parse_bytes, parse_image_size

    if not args.profiles and not args.baselines:
        raise ProfileError("nothing to bench: give profiles and/or --baselines")
    try:
        budget = parse_bytes(args.budget, field="--budget") if args.budget else None
        size = parse_image_size(args.size, field="--size") if args.size else None
    except ValueError as e:
        raise ProfileError(str(e)) from None
    hw = detect_hardware()
    device = args.device or ("cuda:0" if hw.has_cuda else "cpu")
    spec = pipelines.builtin(args.model)
    family = spec.family if spec else "flux"
    profiles = [load_profile(p) for p in args.profiles]
    generation: dict[str, object] = dict(spec.generation) if spec else {}
    if size:
        generation.update(height=size[0], width=size[1])
    if args.steps:
        generation["steps"] = args.steps
    if profiles and not (size or args.steps):
        g = profiles[0].generation
        generation = {k: v for k, v in (("height", g.height), ("width", g.width), ("steps", g.steps)) if v is not None}
    workload = default_workload(args.model, family, args.prompt, device.startswith("cuda"), args.runs)
    if family == "dit":
        # One workload for all: every candidate renders all the class labels in one call (its batch).
        n = len(workload["class_labels"])
        generation["images_per_prompt"] = max(int(generation.get("images_per_prompt") or 1), n)  # type: ignore[call-overload]
        profiles = [p.replace(generation={**p.generation.model_dump(), "images_per_prompt":
                                          max(p.generation.images_per_prompt, n)}) for p in profiles]
    candidates = make_candidates(profiles, family, budget, args.baselines or bool(args.recipes), generation)
    if args.recipes:
        words = [w.strip().lower() for w in args.recipes.split(",") if w.strip()]
        candidates = [c for c in candidates if c.kind != "recipe" or any(w in c.name.lower() for w in words)]
    if args.no_reference:
        candidates = [c for c in candidates if c.kind != "reference"]
    folder = Path(args.out)
    dtype = args.dtype or (spec.dtype if spec and spec.dtype else "bfloat16")
    if args.samples and family != "dit":
        raise ProfileError(f"--samples {args.samples}: distribution samples are for class-conditional (DiT) models; "
                           f"{args.model} is {family}")
    if args.samples == 1 or args.samples < 0:
        raise ProfileError(f"--samples {args.samples}: use 0 (off) or at least 2, typically a few hundred")
    rows = run_bench(candidates, model=args.model, device=device, workload=workload, folder=folder, dtype=dtype,
                     samples=args.samples)
    table = Table("candidate", "status", "latency (median)", "spread", "first call", "peak reserved", "PSNR",
                  "generations", "apply (quantize)", *(("FD", "KID") if args.samples else ()),
                  title=f"{args.model}, budget {format_bytes(budget) if budget else 'none'}, {device}")
    for r in rows:
        table.add_row(r.name, r.status if r.fits else f"[red]{r.status}[/]",
                      f"{r.latency_s:.2f}s" if r.latency_s else "-",
                      f"{r.latency_spread:.2f}s" if r.latency_spread is not None else "-",
                      f"{r.first_call_s:.1f}s" if r.first_call_s else "-",
                      format_bytes(r.peak_reserved) if r.peak_reserved else "-",
                      f"{min(r.psnr, 100):.1f}" if r.psnr is not None else "-",
                      str(r.generations) if r.generations else "-",
                      f"{r.apply_s:.2f}s ({r.quantize_s or 0:.2f}s)" if r.apply_s is not None else "-",
                      *((f"{r.fd:.3g}" if r.fd is not None else "-", f"{r.kid:.2g}" if r.kid is not None else "-")
                        if args.samples else ()))
    console = Console(width=160)
    console.print(table)
    for prof, recipe, ratio in speedups(rows):
        console.print(f"{prof}: {ratio:.2f}x faster than the fastest recipe that fits ({recipe})")
    png = plot(rows, folder / "bench.png", budget, f"{args.model}: profiles vs diffusers recipes")
    console.print(f"table: {folder / 'bench.json'}; plot: {png}")
    return 0
