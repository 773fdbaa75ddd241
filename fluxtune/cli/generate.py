"""fluxtune generate: apply a profile to a model and draw; prints latency and peak memory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="a YAML file or a preset name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted profile overrides")
    p.add_argument("--model", default="flux-mini", help="built-in name, local path or hub id (default flux-mini)")
    p.add_argument("--prompt", action="append", help="prompt (FLUX) or class name (DiT); repeat for several")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="true CFG's negative prompt (Qwen-Image, FLUX.1; same as generation.negative_prompt=TEXT): "
                   "two transformer passes a step")
    p.add_argument("--class-label", type=int, action="append", help="DiT class id; repeat for several")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fluxtune.png", help="output PNG (several images get _0, _1 ... suffixes)")
    p.add_argument("--device", default=None, help="execution device (default: the GPU if there is one)")
    p.add_argument("--dtype", default=None, help="load dtype (default: bfloat16, or a built-in's own)")
    p.add_argument("--emulate", default=None, metavar="GPU",
                   help='emulate a named card on this GPU, e.g. "RTX 4060": the variant for its class runs under its '
                   "memory, streamed copies paced to its PCIe rate (compute is not emulated)")


def run(args: argparse.Namespace) -> int:
    import io
    import time

    from fluxtune.cli import checks
    from fluxtune.errors import ProfileError
    from fluxtune.presets import check_writable, load_profile, write_atomic

    # Everything that can be checked is checked before the model loads and the images are drawn.
    profile = load_profile(args.profile, args.overrides)
    if args.negative_prompt is not None:  # verbatim: an override's value would be parsed as YAML ("1", "a: b")
        profile = profile.replace(generation={**profile.generation.model_dump(), "negative_prompt": args.negative_prompt})
    from fluxtune import pipelines

    spec = pipelines.builtin(args.model)  # a local directory's own class wins inside the check
    checks.true_cfg(args.model, spec.family if spec is not None else profile.family, profile.generation)
    checks.model(args.model)
    checks.dtype(args.dtype)
    checks.device(args.device)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ProfileError(f"--out {args.out!r}: fluxtune generate writes PNG files; give a name ending in .png")
    check_writable(out, "--out")
    if not 0 <= args.seed < 2**63:
        raise ProfileError(f"--seed {args.seed}: use 0 to {2**63 - 1}, e.g. --seed 0")
    for label in args.class_label or []:
        if label < 0:
            raise ProfileError(f"--class-label {label}: class ids start at 0, e.g. --class-label 1")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ProfileError("--prompt '': give a non-empty prompt, e.g. --prompt 'a red circle'")

    import torch

    from fluxtune import apply, pipelines
    from fluxtune.units import format_bytes

    if args.emulate:
        from fluxtune.hardware import activate_emulation, emulation_note

        print(emulation_note(activate_emulation(args.emulate)))
    spec = pipelines.builtin(args.model)
    dtype = args.dtype or (spec.dtype if spec is not None and spec.dtype else "bfloat16")
    if spec is None:
        from fluxtune.loading import skeleton

        # A directory or hub id: apply reads each block from the checkpoint to where the profile puts it.
        pipe: Any = skeleton(args.model, dtype=dtype)
    else:
        pipe = pipelines.load(args.model, dtype=dtype)
    family = pipelines.family(pipe)
    calls: list[dict[str, Any]] = []
    if family == "dit":
        labels = list(args.class_label or [])
        classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 0) or 0)
        bad = [x for x in labels if classes and x >= classes]
        if bad:
            raise ProfileError(f"--class-label {bad[0]}: {args.model} has classes 0..{classes - 1}")
        if args.prompt:
            try:
                labels += pipe.get_label_ids(args.prompt)
            except (ValueError, KeyError) as e:
                raise ProfileError(f"--prompt {args.prompt!r} is not a class name of this model: {e}") from None
        calls.append({"class_labels": labels or [0]})
    else:
        if args.class_label:
            raise ProfileError(f"--class-label is for class-conditional (DiT) models; {args.model} takes --prompt")
        # One call per prompt: the profile was validated for its images_per_prompt per call, and a
        # budget cap holds that limit.
        calls += [{"prompt": p} for p in (args.prompt or ["a photo"])]
    report = apply(profile, pipe, device=args.device, model=args.model)
    print(report)
    device = report.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    images = []
    t0 = time.perf_counter()
    for kwargs in calls:
        images += pipe(generator=torch.Generator().manual_seed(args.seed), **kwargs).images
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        write_atomic(path, buf.getvalue())  # a concurrent run or a reader never sees half a PNG
    peak = f"peak VRAM {format_bytes(torch.cuda.max_memory_reserved())} reserved" if cuda else "on CPU"
    emulated = " on an EMULATED card (compute is this GPU's)" if args.emulate else ""
    print(f"{len(images)} image(s) in {seconds:.2f}s{emulated} ({peak}) -> {', '.join(str(p) for p in paths)}")
    return 0
