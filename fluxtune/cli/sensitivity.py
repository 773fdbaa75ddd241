"""fluxtune sensitivity: rank a transformer's layer groups by the harm INT8/FP8 quantization does to its images."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dit-mini",
                   help="built-in name, local path or hub id of a DiT, FLUX.1, FLUX.2 or Qwen-Image pipeline")
    p.add_argument("--method", default="int8_weight", choices=["int8_weight", "int8_dynamic", "fp8_dynamic"],
                   help="quantization applied to one group at a time (fp8 needs a GPU of SM 8.9+)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the fixed workload (default 10)")
    p.add_argument("--labels", default="0,5,10,20", help="DiT: comma-separated class labels (default 0,5,10,20)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompted pipelines: a workload prompt (repeatable; default two fixed prompts)")
    p.add_argument("--size", default=None, metavar="WxH", help="prompted pipelines: image size (default: the model's)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each renders every label (default 1)")
    p.add_argument("--coarse", action="store_true", help="one group per kind across blocks (faster)")
    p.add_argument("--proxy", action="store_true",
                   help="the cheap one-forward per-layer output-error proxy instead of rendering images")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--out", default=None, help="JSON file for the result (default .fluxtune/sensitivity-MODEL-METHOD.json)")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: the GPU if there is one)")
    p.add_argument("--dtype", default=None, help="load dtype (default: bfloat16 on GPU, a built-in's own on CPU)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path
    from typing import Any

    import torch
    from rich.console import Console
    from rich.table import Table

    from fluxtune import pipelines
    from fluxtune.errors import ProfileError
    from fluxtune.sensitivity import check_method, proxy_scan, scan

    try:
        labels = [int(x) for x in args.labels.split(",") if x.strip()]
    except ValueError:
        raise ProfileError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    if not labels or args.steps < 1 or args.seeds < 1 or args.top < 0:
        raise ProfileError("--labels needs at least one label; --steps and --seeds must be >= 1, --top >= 0")
    if any(x < 0 for x in labels):
        raise ProfileError(f"--labels {args.labels!r}: class ids start at 0, e.g. --labels 0,5,10,20")
    from fluxtune.cli import checks
    from fluxtune.presets import check_writable

    checks.model(args.model)
    checks.dtype(args.dtype)
    checks.device(args.device)
    out = Path(args.out or f".fluxtune/sensitivity-{Path(args.model).name}-{args.method}.json")
    check_writable(out, "--out")  # before the scan, which takes minutes
    device = checks.device_index(args.device, "cuda:0" if torch.cuda.is_available() else "cpu")
    check_method(args.method, torch.device(device))  # fp8 on a CPU: one line before loading anything
    spec = pipelines.builtin(args.model)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else (spec.dtype if spec and spec.dtype else "float32"))
    size: dict[str, int] = {}
    if args.size is not None:
        from fluxtune.cli.predict import _size

        size["width"], size["height"] = _size(args.size)  # type: ignore[assignment]
    pipe: Any = pipelines.load(args.model, device=device, dtype=dtype)
    fam = pipelines.family(pipe)
    if fam == "dit" and (args.prompt or args.size):
        raise ProfileError(f"--prompt/--size: {args.model} is a class-conditional DiT pipeline of a fixed size; "
                           "give --labels instead")
    if fam == "dit":
        classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 0) or 0)
        if classes and max(labels) >= classes:
            raise ProfileError(f"--labels {args.labels!r}: {args.model} has classes 0..{classes - 1}")
    elif args.proxy:
        raise ProfileError(f"--proxy runs DiT's class-conditional forward; {args.model} is a {fam} pipeline: "
                           "leave --proxy out")
    if fam != "dit" and spec is not None and spec.generation:
        # The built-in's own call (a mini model's 64 px and 96 text tokens), --size over its size.
        size = {**{k: spec.generation[k] for k in ("height", "width", "max_sequence_length")
                   if k in spec.generation}, **size}
    pipe.set_progress_bar_config(disable=True)
    console = Console(width=140, stderr=True)
    if args.proxy:
        result = proxy_scan(pipe, args.method, class_labels=labels, per_block=not args.coarse, model=args.model)
    else:
        with console.status("scanning") as status:
            def progress(i: int, n: int, name: str) -> None:
                status.update(f"group {i + 1}/{n}: {name}")

            if fam == "dit":
                result = scan(pipe, args.method, class_labels=labels, seeds=list(range(args.seeds)), steps=args.steps,
                              per_block=not args.coarse, model=args.model, progress=progress)
            else:  # the pipeline's own guidance; the built-in's size unless --size
                result = scan(pipe, args.method, prompts=args.prompt, seeds=list(range(args.seeds)), steps=args.steps,
                              guidance_scale=None, per_block=not args.coarse, model=args.model, progress=progress,
                              call=size)
    result.save(out)
    table = Table("rank", "group", "layers", "PSNR", "SSIM", "rel. MSE",
                  title=f"{args.model} {args.method} sensitivity ({result.kind}, {len(result.groups)} groups, "
                        f"{result.seconds:.1f}s), most sensitive first")
    for i, g in enumerate(result.groups[: args.top], 1):
        table.add_row(str(i), g.name, str(g.layers), "-" if g.psnr != g.psnr else f"{g.psnr:.1f}",
                      "-" if g.ssim != g.ssim else f"{g.ssim:.4f}", f"{g.rel_mse:.2e}")
    if result.all_quantized:
        a = result.all_quantized
        table.add_row("", "[bold]all groups[/]", str(sum(g.layers for g in result.groups)), f"{a['psnr']:.1f}",
                      f"{a['ssim']:.4f}", f"{a['rel_mse']:.2e}")
    Console(width=140).print(table)
    n = min(args.top, len(result.groups)) or min(10, len(result.groups))
    patterns = list(result.exclude_patterns(n))
    print(f"exclude patterns that keep the {n} most sensitive groups in higher precision (most sensitive first):")
    for pat in patterns:
        print(f"  {pat}")
    shown = ", ".join(f"'{p}'" for p in patterns[:2])  # YAML single quotes: backslashes stay single
    print(f"in a profile: transformer: {{quantize: {{method: {args.method}, exclude: [{shown}{', ...' if n > 2 else ''}]}}}}")
    print(f"wrote {out}; a search reads it with --sensitivity {out} (and picks how many groups to keep)")
    return 0
