"""fluxtune bench: profiles side by side with the plain diffusers recipes, same workload and caps."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profiles", nargs="*", help="profile YAML files or preset names")
    p.add_argument("--baselines", action="store_true", help="also run the diffusers recipes")
    p.add_argument("--recipes", default=None,
                   help="comma-separated words picking some recipes, e.g. model,leaf (default: all with --baselines)")
    p.add_argument("--budget", default=None,
                   help="memory cap for every candidate, e.g. 12GB; or several, e.g. 8GB,12GB,24GB,none: then each "
                   "profile runs under its own budget and each recipe under the smallest listed cap it fits")
    p.add_argument("--emulate", default=None, metavar="GPU",
                   help='emulate a named card on this GPU, e.g. "RTX 4060": only its capability class\'s knobs run, '
                   "streamed copies are paced to its PCIe rate, --budget defaults to its memory (compute is not emulated)")
    p.add_argument("--model", default="flux-mini", help="built-in name, local path or hub id")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: each profile's / the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps for every candidate")
    p.add_argument("--runs", type=int, default=3,
                   help="timed repeats after one warm-up, back to back under the cap (default 3; 10 checks that "
                   "ten consecutive generations never run out of memory)")
    p.add_argument("--recipe-runs", type=int, default=None,
                   help="timed repeats of the recipes and the reference (default: --runs)")
    p.add_argument("--recipe-warmup-steps", type=int, default=None,
                   help="steps of the recipes' and the reference's warm-up call (default: the full workload; the "
                   "uncompiled offloading recipes need no full warm-up)")
    p.add_argument("--recipe-time-box", type=float, default=None, metavar="SECONDS",
                   help="per recipe: no timed run starts that would end past this many seconds of timed runs (at "
                   "least one runs); keeps a slow recipe such as sequential offload from eating the bench")
    p.add_argument("--timeout", default=None,
                   help="wall-clock limit of the whole bench, e.g. 9m; re-running the same command continues")
    p.add_argument("--fresh", action="store_true", help="ignore the rows a previous run left in --out")
    p.add_argument("--write-measured", action="store_true",
                   help="write each profile's measurement into its YAML file's measured block")
    p.add_argument("--prompt", action="append", default=None, help="workload prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="true CFG for every candidate, recipes included (Qwen-Image, FLUX.1): two transformer passes "
                   "a step; default: the first profile's generation.negative_prompt")
    p.add_argument("--out", default=".fluxtune/bench", help="folder for bench.json, the table and the plot")
    p.add_argument("--no-reference", action="store_true", help="skip the bf16 reference run (no quality column)")
    p.add_argument("--samples", type=int, default=0,
                   help="DiT: also render N samples per candidate and report their distribution shift from the "
                   "reference's (FD/KID in a fixed random-feature space, not FID); a few hundred is typical")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: the GPU if there is one)")
    p.add_argument("--dtype", default=None, help="load dtype (default: bfloat16, or a built-in's own)")


def _budgets(text: str | None) -> list[int | None] | None:
    from fluxtune.errors import ProfileError
    from fluxtune.units import parse_bytes

    if not text:
        return None
    out: list[int | None] = []
    for word in (w.strip() for w in text.split(",")):
        if word.lower() in ("none", "nocap", "no-cap"):
            out.append(None)
            continue
        try:
            out.append(parse_bytes(word, field="--budget"))
        except ValueError as e:
            raise ProfileError(f"{e}; or 'none' for no cap, e.g. --budget 8GB,12GB,24GB,none") from None
    return out


def _positive(name: str, value: int | None) -> None:
    from fluxtune.errors import ProfileError

    if value is not None and value < 1:
        raise ProfileError(f"{name} {value}: must be at least 1")


def _machine(hw: Any) -> dict[str, str]:
    """What a bench's rows are measured on: a resumed bench must be on the same GPU (or emulated card) and
    library versions."""
    from fluxtune.hardware import library_versions

    out = {"gpu": hw.gpu_name or "cpu", "emulated_on": hw.emulated_on or ""}
    versions = library_versions()
    out.update({k: versions.get(k) or "" for k in ("torch", "diffusers", "torchao")})
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fluxtune import pipelines
    from fluxtune.bench import make_candidates, markdown, plot, run_bench
    from fluxtune.cli import checks
    from fluxtune.cli.search import default_workload
    from fluxtune.errors import ProfileError
    from fluxtune.hardware import detect_hardware, emulation_note
    from fluxtune.memory import default_host_budget
    from fluxtune.presets import load_profile
    from fluxtune.units import parse_duration, parse_image_size

    if not args.profiles and not args.baselines and not args.recipes:
        raise ProfileError("nothing to bench: give profiles and/or --baselines")
    checks.model(args.model)
    checks.dtype(args.dtype)
    checks.device(args.device)
    checks.positive_int("--steps", args.steps, example="28")
    checks.positive_int("--samples", args.samples, zero=True, example="256")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ProfileError("--prompt '': give a non-empty prompt, e.g. --prompt 'a red circle'")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ProfileError(f"--out {args.out!r} is a file; give a folder for bench.json, bench.md and the plot")
    checks.writable("--out", Path(args.out) / "bench.json")
    budgets = _budgets(args.budget)
    for name in ("--runs", "--recipe-runs", "--recipe-warmup-steps"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    if args.recipe_time_box is not None and not 0 < args.recipe_time_box < float("inf"):
        raise ProfileError(f"--recipe-time-box {args.recipe_time_box}: give a positive number of seconds, e.g. 60")
    try:
        size = parse_image_size(args.size, field="--size") if args.size else None
    except ValueError as e:
        raise ProfileError(str(e)) from None
    total = parse_duration(args.timeout) if args.timeout else None
    if args.emulate:
        from fluxtune.cli.search import _emulate

        own = _emulate(args.emulate, None)
        if budgets is None:
            budgets = [own]
        elif any(b is None or b > own for b in budgets):
            raise ProfileError(f"--budget {args.budget}: under --emulate every cap must be at most the card's "
                               f"{own / 1e9:g}GB")
    if total is not None and total <= 0:
        raise ProfileError(f"--timeout {args.timeout!r}: use a positive duration, e.g. 9m")
    if args.write_measured:
        for src in args.profiles:  # checked now, not after the bench: each file must be writable
            if Path(src).exists():
                checks.writable("--write-measured", src)
    hw = detect_hardware()
    device = checks.device_index(args.device, "cuda:0" if hw.has_cuda else "cpu")
    spec = pipelines.builtin(args.model)
    family = spec.family if spec else "flux"
    sources = list(args.profiles)
    profiles = [load_profile(p) for p in sources]
    generation: dict[str, object] = dict(spec.generation) if spec else {}
    if size:
        generation.update(height=size[0], width=size[1])
    if args.steps:
        generation["steps"] = args.steps
    if profiles and not (size or args.steps):
        g = profiles[0].generation
        generation = {k: v for k, v in (("height", g.height), ("width", g.width), ("steps", g.steps)) if v is not None}
    elif profiles:
        # --size / --steps are every candidate's: the profiles ran their own size and steps while the reference
        # and the recipes ran the flags' (a 1920x1088 preset measured as if at 1024x1024).
        forced = {k: v for k, v in generation.items() if k in ("height", "width", "steps")}
        profiles = [p.replace(generation={**p.generation.model_dump(), **forced}) for p in profiles]
    # The recipes and the reference render what the profiles render: true CFG is twice the work.
    g0 = profiles[0].generation if profiles else None
    cfg = {k: v for k in ("negative_prompt", "true_cfg_scale") if g0 is not None and (v := getattr(g0, k)) is not None}
    if args.negative_prompt is not None:
        cfg["negative_prompt"] = args.negative_prompt
        profiles = [p.replace(generation={**p.generation.model_dump(), "negative_prompt": args.negative_prompt})
                    for p in profiles]
    generation.update(cfg)
    from fluxtune.knobs import Generation

    for g in [p.generation for p in profiles] or [Generation(**cfg)]:
        checks.true_cfg(args.model, family, g)
    workload = default_workload(args.model, family, args.prompt, device.startswith("cuda"), args.runs)
    if family == "dit":
        # One workload for all: every candidate renders all the class labels in one call (its batch).
        n = len(workload["class_labels"])
        generation["images_per_prompt"] = max(int(generation.get("images_per_prompt") or 1), n)  # type: ignore[call-overload]
        profiles = [p.replace(generation={**p.generation.model_dump(), "images_per_prompt":
                                          max(p.generation.images_per_prompt, n)}) for p in profiles]
    recipe_workload = {**workload, "runs": args.recipe_runs or args.runs}
    if args.recipe_warmup_steps:
        recipe_workload["warmup_steps"] = args.recipe_warmup_steps
    dtype = args.dtype or (spec.dtype if spec and spec.dtype else "bfloat16")
    candidates = make_candidates(profiles, family, budgets, args.baselines or bool(args.recipes), generation,
                                 reference=not args.no_reference, dtype=dtype)
    if args.recipes:
        words = [w.strip().lower() for w in args.recipes.split(",") if w.strip()]
        names = [c.name for c in candidates if c.kind == "recipe"]
        candidates = [c for c in candidates if c.kind != "recipe" or any(w in c.name.lower() for w in words)]
        unmatched = [w for w in words if not any(w in n.lower() for n in names)]
        if unmatched or not words:
            raise ProfileError(f"--recipes {args.recipes!r}: {unmatched[0] if unmatched else 'no word'!r} names no "
                               f"recipe; recipes: {', '.join(names)}")
    folder = Path(args.out)
    if args.samples and family != "dit":
        raise ProfileError(f"--samples {args.samples}: distribution samples are for class-conditional (DiT) models; "
                           f"{args.model} is {family}")
    if args.samples == 1 or args.samples < 0:
        raise ProfileError(f"--samples {args.samples}: use 0 (off) or at least 2, typically a few hundred")
    rows = run_bench(candidates, model=args.model, device=device, workload=workload, folder=folder, dtype=dtype,
                     recipe_workload=recipe_workload, total_timeout_s=total, time_box_s=args.recipe_time_box,
                     samples=args.samples, resume=not args.fresh, machine=_machine(hw),
                     host_ram_budget=default_host_budget(hw.host_ram_bytes) if hw.host_ram_bytes else None)
    console = Console(width=200)
    title = f"{args.model}, {device}, {hw.gpu_name or 'cpu'}" + (f" EMULATED on {hw.emulated_on}" if hw.emulated_on else "")
    console.print(results_table(rows, title, samples=bool(args.samples)))
    console.print(summary_table(rows))
    caps = sorted({r.cap for r in rows if r.cap is not None})
    png = plot(rows, folder / "bench.png", caps, f"{args.model}: profiles vs diffusers recipes")
    from fluxtune.presets import write_atomic

    note = emulation_note(hw)
    write_atomic(folder / "bench.md", (f"{note}\n\n" if note else "")
                 + markdown(rows, command="fluxtune " + shlex.join(args.argv)))
    if note:
        console.print(note)
    console.print(f"table: {folder / 'bench.json'}, {folder / 'bench.md'}; plot: {png}")
    if args.write_measured:
        from fluxtune.bench import write_measured

        for src, prof in zip(sources, profiles, strict=True):
            path = write_measured(src, prof, rows, model=args.model, workload=workload, hardware=hw)
            if path is not None:
                console.print(f"measured block written: {path}")
    return 0


def results_table(rows: list[Any], title: str, *, samples: bool = False) -> Any:
    """Every measured (or refused) candidate, in run order."""
    from rich.table import Table

    from fluxtune.bench import ROW_COLUMNS, row_cells

    table = Table(*ROW_COLUMNS, *(("FD", "KID") if samples else ()), title=title)
    for r in rows:
        cells = row_cells(r, samples=samples)
        if not r.fits:
            cells[2] = f"[red]{cells[2]}[/]"
        table.add_row(*cells)
    return table


def summary_table(rows: list[Any]) -> Any:
    """Per budget: the profile against the fastest recipe that fits the same cap."""
    from rich.table import Table

    from fluxtune.bench import SUMMARY_COLUMNS, summary_cells

    table = Table(*SUMMARY_COLUMNS, title="per budget")
    for cells in summary_cells(rows):
        table.add_row(*cells)
    return table
