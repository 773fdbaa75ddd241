"""fluxtune search: find the best profile for a budget and an objective by measuring real runs."""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path
from typing import Any

from fluxtune.errors import ProfileError, UnsupportedHardwareError
from fluxtune.status import Status

DEFAULT_MODEL = "flux-mini"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", help="VRAM budget such as 12GB: the whole process, as NVML sees it; a 12 GB card's "
                   "owner passes 12GB (on a CPU-only machine it bounds host memory)")
    p.add_argument("--emulate", default=None, metavar="GPU",
                   help='emulate a named card on this GPU, e.g. "RTX 4060": its memory is the budget, only its '
                   "capability class's knobs run, streamed copies are paced to its PCIe rate (compute is not emulated)")
    p.add_argument("--objective", choices=("latency", "quality", "pareto", "throughput"), default="latency",
                   help="latency: fastest above the quality floor; quality: best PSNR under --max-latency; "
                   "pareto: the whole front, with a knee proposed; throughput: most images per second, "
                   "batch size searched within the budget (default latency)")
    p.add_argument("--min-psnr", type=float, default=None,
                   help="quality floor in dB against the lossless reference (default 30; none for the random-weight "
                   "replicas, whose quality means nothing; 0 turns it off)")
    p.add_argument("--max-latency", type=float, default=None, help="latency cap in seconds (quality objective)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name, local path or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--profile", default=None, help="base profile whose fixed parts every trial keeps")
    p.add_argument("--size", default=None,
                   help="WIDTHxHEIGHT, e.g. 1024x1024, or several to search: 768x768,1024x1024 (default: the model's)")
    p.add_argument("--steps", default=None, help="steps, pinned (28) or a range to search (20-50)")
    p.add_argument("--trials", type=int, default=40, help="trials in the study, counting resumed ones (default 40)")
    p.add_argument("--timeout", default=None, help="wall-clock limit such as 30m, 1h, 90s")
    p.add_argument("--patience", type=int, default=15, help="stop after this many trials without improvement (0: never)")
    p.add_argument("--images", type=int, default=None, help="amortise compile time over this many images")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="do not start from the shipped presets' and recipes' configurations")
    p.add_argument("--no-descent", dest="descent", action="store_false",
                   help="do not try the best trial's one-knob moves before sampling (the sampler alone)")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="run every trial in full (default: stop one whose first warm steps project it 30%% "
                        "slower than the best so far)")
    p.add_argument("--prune-margin", type=float, default=1.3, metavar="X",
                   help="prune a trial whose projected latency is above X times the best so far (default 1.3)")
    p.add_argument("--retime", type=int, default=2, metavar="N",
                   help="at the end, re-time the 3 best trials and the fastest recipe interleaved, N rounds, and "
                        "name a winner only beyond their noise (default 2; 0: off)")
    p.add_argument("--floor-compiled", action="store_true",
                   help="also measure the reference compiled, and judge quality against that floor too")
    p.add_argument("--ram-budget", default=None, help="host RAM the process may use: its own memory and the host copies of offloaded weights "
                   "(default: the machine's memory less max(4 GiB, 1/8))")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: journal file in .fluxtune/)")
    p.add_argument("--study", default=None, help="study name (default derived from model, budget, objective)")
    p.add_argument("--gpus", default=None, help="GPU indices to run one worker each on, e.g. 0,1 (default 0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on CPU (default 1)")
    p.add_argument("--space", default=None, help="YAML file pinning or narrowing dimensions")
    p.add_argument("--pin", action="append", default=[], metavar="DIM=VALUE",
                   help="pin or narrow a dimension, e.g. --pin transformer.offload=partial or --pin cache=[none,first_block]")
    p.add_argument("--prompt", action="append", default=None, help="workload prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="true CFG in every trial and the reference (Qwen-Image, FLUX.1): two transformer passes a step "
                   "(same as generation.negative_prompt in --profile)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="tune with this LoRA (.safetensors) in place; repeatable; the profile's lora mode is auto")
    p.add_argument("--sensitivity", action="append", default=[], metavar="FILE|auto|off",
                   help="per-layer sensitivity scans (from `fluxtune sensitivity`, one per method) that let the search "
                   "keep the N most sensitive layer groups unquantized; auto (DiT default; any family) scans in the first "
                   "worker with the study's class labels or prompts")
    p.add_argument("--runs", type=int, default=None, help="timed repeats per trial (default 3 on GPU, 2 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--home", default=".fluxtune", help="folder for the journal, references and reports")
    p.add_argument("--out", default=None, help="where to write the best profile (default: the study folder)")
    p.add_argument("--dtype", default=None, help="load dtype (default: bfloat16; a built-in's own, e.g. float32 for the mini models)")


def parse_steps(text: str) -> Any:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise ProfileError(f"--steps {text!r}: use a positive count (28) or a range (20-50)")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi > 1000:
        raise ProfileError(f"--steps {text!r}: at most 1000 steps, e.g. 28 or 20-50")
    if hi < lo:
        raise ProfileError(f"--steps {text!r}: the range is reversed; use {hi}-{lo}")
    return lo if lo == hi else {"low": lo, "high": hi}


def _devices(args: argparse.Namespace, has_cuda: bool) -> list[str]:
    if args.gpus:
        if not has_cuda:
            raise UnsupportedHardwareError(f"--gpus {args.gpus}: this machine has no CUDA GPU; drop --gpus to search on CPU")
        try:
            return [f"cuda:{int(i)}" for i in args.gpus.split(",")]
        except ValueError:
            raise ProfileError(f"--gpus {args.gpus!r}: use comma-separated indices such as 0,1") from None
    if has_cuda:
        return ["cuda:0"]
    if args.workers < 1:
        raise ProfileError(f"--workers {args.workers}: use 1 or more")
    return ["cpu"] * args.workers


def _sensitivity(items: list[str], family: str) -> dict[str, Any] | str | None:
    """``--sensitivity``: scan files by method, ``"auto"`` (scan in the worker) or None (off)."""
    if not items:
        return "auto" if family == "dit" else None
    if items == ["off"]:
        return None
    if items == ["auto"]:
        return "auto"  # the worker scans with the study's class labels (DiT) or prompts (the others)
    from fluxtune.sensitivity import SensitivityResult

    out: dict[str, Any] = {}
    for item in items:
        if item in ("auto", "off"):
            raise ProfileError(f"--sensitivity {item} cannot be mixed with scan files")
        if not Path(item).is_file():
            raise ProfileError(f"--sensitivity {item!r}: no such file; give a scan written by `fluxtune sensitivity "
                               "--out FILE`, or auto, or off")
        res = SensitivityResult.load(item)
        out[res.method] = list(res.exclude_patterns(len(res.groups)))
    return out


def default_workload(model: str, family: str, prompts: list[str] | None, on_gpu: bool, runs: int | None) -> dict[str, Any]:
    """A small fixed prompt (or class) set: the same for every trial and the reference."""
    wl: dict[str, Any] = {"seeds": [0], "runs": runs or (3 if on_gpu else 2), "warmup": 1}
    if family == "dit":
        wl["class_labels"] = [1, 7] if "mini" in model else [207, 360]
        return wl
    if prompts:
        wl["prompts"] = list(prompts)
    elif "mini" in model:
        from fluxtune.minimodels.domain import EVAL_PROMPTS

        wl["prompts"] = list(EVAL_PROMPTS[:2])
    else:
        wl["prompts"] = ["a photo of a red fox in the snow, detailed fur, morning light"]
    return wl


def _emulate(card: str, budget: int | None) -> int:
    """Start emulating ``card`` (see :func:`fluxtune.hardware.activate_emulation`); returns the budget to use."""
    from fluxtune.hardware import activate_emulation, card_budget, emulation_note
    from fluxtune.units import format_bytes

    hw = activate_emulation(card)
    print(emulation_note(hw))
    own = card_budget(hw)
    assert own is not None  # an emulated card is always a table row
    if budget is not None and budget > own:
        raise ProfileError(f"--budget {format_bytes(budget)} is more than the emulated {hw.gpu_name} has; "
                           f"use at most {format_bytes(own)} or leave --budget out")
    return budget or own
def _local_family(model: str) -> str:
    """The family of a local save_pretrained directory from its model_index.json: ``any`` for a pipeline class
    of no family of fluxtune's (PixArt, SD3, ...), ``flux`` when there is no index to read (a hub id)."""
    import json

    from fluxtune.pipelines import family_of_class

    index = Path(model).expanduser() / "model_index.json"
    try:
        cls = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return "flux"
    found = family_of_class(cls)
    return found if found != "other" else "any"


def _transformer_caches(model: str) -> bool:
    """Whether a save_pretrained directory's transformer class takes diffusers' cache hooks (``enable_cache``);
    True where that cannot be read (the apply check has the last word)."""
    import json

    import diffusers

    try:
        entry = json.loads((Path(model).expanduser() / "model_index.json").read_text()).get("transformer")
        cls = getattr(diffusers, str(entry[1]), None)
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return True
    return cls is None or hasattr(cls, "enable_cache")


def _local_generation(model: str, on_gpu: bool) -> dict[str, Any]:
    """Call settings for a model that is not a built-in: a local DiT's native size (its transformer's
    sample_size x 8 pixels, the only size it draws); otherwise diffusers' default (FLUX: 1024x1024),
    which on CPU would take minutes per image, so there the search asks for --size instead of running
    it silently."""
    import json

    cfg_path = Path(model).expanduser() / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        cfg = {}
    sample = cfg.get("sample_size")
    if _local_family(model) == "dit" and isinstance(sample, int) and sample > 0:
        return {"height": sample * 8, "width": sample * 8}  # a DiT draws its native size only
    if not on_gpu:
        raise ProfileError(f"--model {model}: on CPU give --size (and --steps): diffusers' default for this model "
                           "is 1024x1024, minutes per image on a CPU; e.g. --size 256x256 --steps 8")
    return {}


def run(args: argparse.Namespace) -> int:
    from fluxtune import pipelines
    from fluxtune.cli import checks
    from fluxtune.hardware import detect_hardware
    from fluxtune.presets import load_profile
    from fluxtune.search import Search, SearchConfig, SearchSpace, load_space_file, parse_pins
    from fluxtune.search.study import check_study_name
    from fluxtune.units import format_bytes, parse_bytes, parse_duration, parse_image_size

    try:
        budget = parse_bytes(args.budget, field="--budget") if args.budget else None
        ram_budget = parse_bytes(args.ram_budget, field="--ram-budget") if args.ram_budget else None
    except ValueError as e:
        raise ProfileError(str(e)) from None
    # Every value is checked before anything is loaded, created or written (DESIGN.md: bad input is
    # one line and exit 2, and leaves nothing behind).
    if args.objective == "quality" and args.max_latency is None:
        raise ProfileError("--objective quality needs --max-latency SECONDS (the cap under which quality is maximised)")
    if args.trials < 1:
        raise ProfileError(f"--trials {args.trials}: use 1 or more")
    if args.emulate:
        budget = _emulate(args.emulate, budget)
    checks.positive_int("--trials", args.trials, example="40")
    checks.positive_int("--patience", args.patience, zero=True, example="15")
    checks.positive_int("--images", args.images, example="100")
    checks.positive_int("--runs", args.runs, example="2")
    checks.positive_float("--prune-margin", args.prune_margin, example="1.3")
    checks.positive_int("--retime", args.retime, zero=True, example="2")
    checks.positive_int("--workers", args.workers, example="1")
    if not 0 <= args.seed < 2**32:
        raise ProfileError(f"--seed {args.seed}: use 0 to {2**32 - 1}, e.g. --seed 0")
    checks.positive_float("--max-latency", args.max_latency, example="5")
    checks.positive_float("--min-psnr", args.min_psnr, zero=True, example="30")
    if args.timeout is not None and parse_duration(args.timeout) <= 0:
        raise ProfileError(f"--timeout {args.timeout!r}: use a positive duration, e.g. 30m")
    checks.model(args.model)
    checks.dtype(args.dtype)
    args.storage = checks.storage(args.storage)
    if args.study is not None:
        check_study_name(args.study)
    if Path(args.home).exists() and not Path(args.home).is_dir():
        raise ProfileError(f"--home {args.home!r} is a file; give a folder for the journal and reports")
    checks.writable("--home", Path(args.home) / "journal.log")
    checks.writable("--out", args.out)
    for f in args.lora:
        checks.lora_file(f)
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ProfileError("--prompt '': give a non-empty prompt, e.g. --prompt 'a red circle'")
    hw = detect_hardware()
    devices = _devices(args, hw.has_cuda)
    on_gpu = devices[0].startswith("cuda")
    spec = pipelines.builtin(args.model)
    if spec is not None and spec.needs_gpu and not on_gpu:
        raise UnsupportedHardwareError(f"--model {args.model} is built on a GPU; on this machine use flux-mini or tiny-flux")
    family = spec.family if spec is not None else _local_family(args.model)
    if args.lora and family != "flux":
        raise ProfileError(f"--lora: {args.model} is a {family} model; LoRAs apply to FLUX pipelines")
    base = load_profile(args.profile) if args.profile else load_profile(
        {"name": "search-base", "family": family,
         "generation": dict(spec.generation) if spec else _local_generation(args.model, on_gpu or bool(args.size))})
    data = base.to_dict()
    data["family"] = family
    if args.size:
        try:
            sizes = [parse_image_size(s, field="--size") for s in args.size.split(",")]
        except ValueError as e:
            raise ProfileError(str(e)) from None
        h, w = max(sizes, key=lambda hw: hw[0] * hw[1])  # the budget is validated for the largest
        data["generation"].update(height=h, width=w)
        narrow_sizes = [f"{sw}x{sh}" for sh, sw in sizes] if len(sizes) > 1 else []
    else:
        narrow_sizes = []
    if budget is not None:
        data["budget"] = {"vram": budget, "enforce": True, **({"host_ram": ram_budget} if ram_budget else {})}
    if args.lora:
        data["loras"] = [{"path": str(Path(f).resolve())} for f in args.lora]
    narrow: dict[str, Any] = {}
    if args.space:
        narrow.update(load_space_file(args.space))
    narrow.update(parse_pins(args.pin))
    if narrow_sizes:
        narrow["size"] = narrow_sizes
    if args.steps:
        steps = parse_steps(args.steps)
        narrow["steps"] = steps
        data["generation"]["steps"] = steps if isinstance(steps, int) else steps["high"]
    if args.negative_prompt is not None:
        data["generation"]["negative_prompt"] = args.negative_prompt
    if family == "any" and "cache" not in narrow and not _transformer_caches(args.model):
        narrow["cache"] = "none"  # every cache trial would be refused at check time
        print("cache: none (diffusers has no cache hooks for this model's transformer)")
    workload = default_workload(args.model, family, args.prompt, on_gpu, args.runs)
    if family == "dit":
        # For DiT, images_per_prompt is the batch: every class label of a call is one image.
        data["generation"]["images_per_prompt"] = max(data["generation"].get("images_per_prompt") or 1,
                                                      len(workload["class_labels"]))
    base = load_profile(data)
    checks.true_cfg(args.model, family, base.generation)
    if args.objective == "throughput" and "batch" not in narrow:
        b0 = base.generation.images_per_prompt
        narrow["batch"] = sorted({b0, *(b for b in ((4, 8, 16, 32, 64) if family == "dit" else (2, 4)) if b > b0)})
        print(f"throughput: searching batch sizes {narrow['batch']} (narrow with --pin batch=[...])")
    sensitivity = _sensitivity(args.sensitivity, family)
    # Check --pin/--space now: a typo should cost one line, not a model load and a study in the journal.
    SearchSpace.create(hw if on_gpu else hw.without_gpu(), family, base, narrow,
                       sensitivity=sensitivity if isinstance(sensitivity, dict) else None)
    min_psnr = args.min_psnr
    if min_psnr is None and not (spec is not None and spec.needs_gpu):
        min_psnr = 30.0
    if min_psnr == 0:
        min_psnr = None
    print(f"quality floor: {f'PSNR >= {min_psnr:g} dB against the lossless reference' if min_psnr else 'none'}")
    name = args.study or f"{Path(args.model).name}-{format_bytes(budget) if budget else 'nobudget'}-{args.objective}"
    check_study_name(name)
    cfg = SearchConfig(
        model=args.model, base=base, workload=workload, budget_bytes=budget, objective=args.objective,
        min_psnr=min_psnr, max_latency=args.max_latency, images=args.images, trials=args.trials,
        timeout_s=parse_duration(args.timeout) if args.timeout else None, patience=args.patience or None,
        storage=args.storage, study=name, devices=devices,
        dtype=args.dtype or (spec.dtype if spec and spec.dtype else "bfloat16" if on_gpu else "float32"),
        narrow=narrow, seed=args.seed,
        home=Path(args.home), ram_budget_bytes=ram_budget, floor_compiled=args.floor_compiled,
        warm_start=args.warm_start, descent=args.descent, prune=args.prune, prune_margin=args.prune_margin,
        sensitivity=sensitivity, retime_rounds=args.retime,
    )
    from fluxtune.search.study import study_dir

    home, folder = Path(args.home), study_dir(name, Path(args.home))
    created = (None if home.exists() else home, None if folder.exists() else folder)
    search = Search(cfg)
    from fluxtune.search import build_report, profile_of

    try:
        result = search.run()
    except Exception:
        if getattr(search, "study", None) is None:
            _remove_created(created)  # failed before the study existed: leave nothing behind
        raise
    except KeyboardInterrupt:
        # Keep what was measured visible: the report of the finished trials, then the resume hint.
        study = getattr(search, "study", None)
        if study is not None:
            try:
                files = build_report(study, search.dir)
                _print_table(study, budget, on_gpu)
                print(f"interrupted; report of the finished trials: {files.get('csv', search.dir)}")
            except Exception as e:  # never let the report hide the interrupt
                print(f"interrupted; the report could not be built: {type(e).__name__}: {e}")
            print("run the same command again to resume the study")
        raise

    files = build_report(result.study, search.dir)
    print(f"\nstopped: {search.stop_reason or 'done'}; {result.trials_run} trials run in {result.elapsed_s / 60:.1f} min")
    _print_table(result.study, budget, on_gpu)
    for key, path in files.items():
        print(f"  {key}: {path}")
    if result.best is None:
        return _no_feasible(search, cfg)
    if args.objective == "pareto":
        from fluxtune.search import pareto_front

        front_dir = search.dir / "front"
        for t in pareto_front(result.study):
            save_searched(profile_of(t, result.study, name=f"{name}-front-trial{t.number + 1}"),
                          front_dir / f"trial{t.number + 1:04d}.yaml", args, cfg.dtype,
                          getattr(search, "facts", None))
        print(f"  front: {front_dir} (the knee is written to --out)")
    prof = profile_of(result.best, result.study, name=f"{name}")
    out = Path(args.out) if args.out else search.dir / "best.yaml"
    save_searched(prof, out, args, cfg.dtype, getattr(search, "facts", None))
    m = prof.measured
    assert m is not None
    # No speed-up against the lossless reference here: it is timed once, for its images; the baseline
    # line below compares with a recipe timed like every trial, noise included.
    peak = m.peak_reserved if on_gpu else result.best.user_attrs.get("peak")
    tput = (f", {m.throughput:.2f} images/s at batch {prof.generation.images_per_prompt}"
            if m.throughput and args.objective == "throughput" else "")
    print(f"best: trial {result.best.number + 1}: {m.latency_s:.3f}s per call{tput}, "
          f"peak {format_bytes(peak or 0)}, PSNR {min(m.quality.get('psnr', float('nan')), 100):.1f} dB -> {out}")
    _print_summary(result.study, m.latency_s if args.objective == "latency" else None)
    return 0


def _remove_created(created: tuple[Path | None, Path | None]) -> None:
    """Remove the folders this run created: the study folder, and --home when this run made it."""
    import shutil

    home, folder = created
    if folder is not None and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
    if home is not None and home.is_dir():  # made by this run, which created no study: all of it is ours
        shutil.rmtree(home, ignore_errors=True)


def save_searched(prof: Any, out: Path, args: argparse.Namespace, dtype: str, facts: Any = None) -> Path:
    """Write a searched profile with the call it was validated for spelled out (size, steps, batch, the
    load dtype) and a comment header saying where it came from and how to use it. ``facts`` (the
    model's, from the search) give the size the trials ran at when the profile left it to the model."""
    from fluxtune.presets import write_atomic

    g = prof.generation
    if (g.height is None or g.width is None) and getattr(facts, "default_height", None):
        g = g.model_copy(update={"height": g.height or facts.default_height, "width": g.width or facts.default_width})
        prof = prof.replace(generation=g.model_dump(mode="json"))
        g = prof.generation
        m = prof.measured
        if m is not None and "height" not in m.workload:
            prof = prof.replace(measured={**m.model_dump(mode="json"),
                                          "workload": {**m.workload, "height": g.height, "width": g.width}})
    m = prof.measured
    size = f"{g.width}x{g.height}" if g.height and g.width else "the model's default size"
    where = (m.hardware or {}).get("name") or "cpu" if m is not None else "?"
    header = (
        f"# {prof.name}: found by `fluxtune search` on {args.model} ({where}), {m.date if m else ''}\n"
        f"# Measured at {size}, {g.steps} steps, {g.images_per_prompt} image(s) per call, {dtype} weights"
        f"{', true CFG (negative prompt ' + repr(g.negative_prompt) + ')' if g.negative_prompt is not None else ''}"
        f"{', budget ' + args.budget if args.budget else ''}.\n"
        f"# Use: fluxtune generate {out} --model {args.model} --prompt '...'   or in Python:\n"
        f"#      fluxtune.apply('{out}', pipelines.load('{args.model}', dtype='{dtype}'))\n"
        "# Another model or GPU was not validated: apply warns; re-run the search (or fluxtune bench) there.\n"
    )
    from omegaconf import OmegaConf

    data = prof.to_dict(exclude_defaults=True)
    data["generation"] = {k: v for k, v in g.model_dump(mode="json").items() if v is not None}  # defaults too
    text = OmegaConf.to_yaml(OmegaConf.create(data), sort_keys=False)
    return write_atomic(out, header + text)


def _print_summary(study: Any, best_latency: float | None) -> None:
    """The best against the fastest diffusers recipe measured in this same study, and how well the
    memory model predicted the peaks it was checked against."""
    from fluxtune.search import rows
    from fluxtune.search.retime import RECORD_KEY

    table = rows(study)
    recipes = [r for r in table if str(r.get("source", "")).startswith("recipe") and r["feasible"] and r.get("latency_s")]
    retimed = study.user_attrs.get(RECORD_KEY)
    if retimed:
        # Interleaved rounds measured the finalists and the baseline side by side: that comparison stands.
        print(f"{retimed['verdict']} ({retimed['rounds']} interleaved round(s))")
    elif recipes and best_latency:
        fastest = min(recipes, key=lambda r: r["latency_s"])
        best = next((r for r in table if r.get("latency_s") == best_latency and r["feasible"]), None)
        # The noise: the larger of the two trials' spreads between their timed runs.
        noise = max((x for x in (fastest.get("latency_spread"), (best or {}).get("latency_spread")) if x), default=0.0)
        line = (f"baseline: fastest recipe that fits, measured in this study: {fastest['source'][7:]} "
                f"{fastest['latency_s']:.2f}s (trial {fastest['trial']}); ")
        if best is not None and best["trial"] != fastest["trial"] and fastest["latency_s"] - best_latency <= noise:
            line += (f"the best ({best_latency:.2f}s) is within the runs' noise ({noise:.2f}s) of it: nothing beat "
                     "the baseline beyond noise")
        else:
            line += f"the best is {fastest['latency_s'] / best_latency:.2f}x faster" + (
                f" (runs' spread up to {noise:.2f}s)" if noise else "")
        print(line)
    pruned = [r["wall_s"] for r in table if r.get("status") == Status.PRUNED and r.get("wall_s")
              and r.get("duplicate_of") is None]
    full = [r["wall_s"] for r in table if r.get("state") == "COMPLETE" and r.get("status") == Status.OK
            and r.get("wall_s") and r.get("duplicate_of") is None]
    if pruned and full:
        a, b = statistics.median(pruned), statistics.median(full)
        print(f"pruning: {len(pruned)} trial(s) stopped after their first warm steps, {a:.1f}s each (median) against "
              f"{b:.1f}s for a trial run in full: {a / b:.0%} of its cost")
    ok = [r for r in table if r.get("status") == Status.OK]
    pairs = [(r["predicted_allocated"], r["peak_allocated"]) for r in ok if r.get("predicted_allocated") and r.get("peak_allocated")]
    what = "allocated peak"
    if not pairs:  # CPU: host memory
        pairs = [(r["predicted_peak"], r["peak"]) for r in ok if r.get("predicted_peak") and r.get("peak")]
        what = "peak"
    if pairs:
        close = sum(abs(p - m) <= 0.10 * m for p, m in pairs)
        worst = max(abs(p - m) / m for p, m in pairs)
        print(f"memory model: predicted {what} within 10% of the measured one for {close} of {len(pairs)} measured "
              f"trials (worst {worst:.0%}; each prediction made before its trial ran)")


def _no_feasible(search: Any, cfg: Any) -> int:
    from fluxtune.search import rows
    from fluxtune.units import format_bytes

    table = rows(search.study)
    measured = [r for r in table if r.get("status") == Status.OK]
    if cfg.min_psnr is not None and measured:
        budget = search.goal.budget_bytes
        fits = [r for r in measured if budget is None or (r.get("peak") or 0) <= budget] or measured
        top = max(fits, key=lambda r: r.get("psnr") or 0)
        print(f"no trial reached --min-psnr {cfg.min_psnr} dB within the budget; the best quality found was "
              f"{min(top.get('psnr') or 0, 100):.1f} dB (trial {top['trial']}); lower the floor or raise the budget")
        return 1
    pruned = [r for r in table if r.get("status") == Status.PRUNED]
    if pruned and not measured:
        ref = search.study.user_attrs.get("fluxtune_reference") or {}
        print(f"every trial that ran was pruned: its first warm steps projected it more than {cfg.prune_margin:g}x "
              f"slower than the lossless reference ({ref.get('latency_s') or 0:.2f}s per call), so nothing "
              "here beats it; run more trials, or raise --prune-margin")
        return 1
    peaks = [int(p) for p in (r.get("predicted_peak") or r.get("peak") for r in table) if p]
    smallest = min(peaks) if peaks else None
    hint = f"; the smallest peak the memory model predicts among the trials is {format_bytes(smallest)}" if smallest else ""
    print(f"no profile fits the budget {format_bytes(cfg.budget_bytes or 0)}{hint}")
    return 1


def _print_table(study: Any, budget: int | None, on_gpu: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from fluxtune.search import rows
    from fluxtune.units import format_bytes

    shown = [r for r in rows(study) if r["state"] != "WAITING"]  # enqueued warm starts the run ended before
    differ = _differing(shown)
    table = Table("#", "knobs that differ" if len(shown) > 1 else "config", "status", "latency", "first call", "peak",
                  "allocated", "predicted", "PSNR", title="trials")
    for r in shown:
        lat = f"{r['latency_s']:.3f}s" if r.get("latency_s") else "-"
        first = f"{r['first_call_s']:.2f}s" if r.get("first_call_s") else "-"
        peak = format_bytes(r["peak"]) if r.get("peak") else "-"
        pred_b = r.get("predicted_allocated") or r.get("predicted_peak")
        pred = format_bytes(pred_b) if pred_b else "-"
        alloc = format_bytes(r["peak_allocated"]) if r.get("peak_allocated") else "-"
        psnr = f"{min(r['psnr'], 100):.1f}" if r.get("psnr") is not None else "-"
        status = r["status"] + ("" if r["feasible"] or r["status"] != Status.OK else " (infeasible)")
        if r["status"] == Status.PRUNED and r.get("projected_s"):
            status += f" (>= {r['projected_s']:.2f}s)"
        table.add_row(str(r["trial"]), differ[id(r)], status, lat, first, peak, alloc, pred, psnr)
    Console(width=200).print(table)


def _differing(table: list[dict[str, Any]]) -> dict[int, str]:
    """Each row's config reduced to the knobs in which the trials differ (``k=v`` words), so that two
    different trials never look the same; the whole config when there is only one trial."""
    parsed = {id(r): dict(w.split("=", 1) for w in str(r.get("config") or "").split() if "=" in w) for r in table}
    keys = list(dict.fromkeys(k for d in parsed.values() for k in d))
    varying = [k for k in keys if len({d.get(k, "") for d in parsed.values()}) > 1] if len(table) > 1 else keys
    out = {}
    for r in table:
        d = parsed[id(r)]
        words = [f"{k}={d[k]}" for k in varying if k in d]
        out[id(r)] = " ".join(words) or ("(same knobs as the others)" if len(table) > 1 else "defaults")
    return out


def print_best(study: Any) -> None:
    """One line on the study's best trial (or why there is none)."""
    from fluxtune.search import best_trial
    from fluxtune.units import format_bytes

    best = best_trial(study)
    if best is None:
        print("best: no feasible trial yet")
        return
    a = best.user_attrs
    psnr = (a.get("quality") or {}).get("psnr")
    bits = [f"best: trial {best.number + 1}: {a.get('latency_s') or 0:.3f}s per call"]
    if a.get("throughput") and study.user_attrs.get("fluxtune_config", {}).get("objective") == "throughput":
        bits.append(f"{a['throughput']:.2f} images/s")
    if a.get("peak"):
        bits.append(f"peak {format_bytes(a['peak'])}")
    if psnr is not None:
        bits.append(f"PSNR {min(psnr, 100):.1f} dB")
    print(", ".join(bits) + f"; knobs: {a.get('config') or 'defaults'}")
