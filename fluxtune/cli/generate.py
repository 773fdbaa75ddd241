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
    p.add_argument("--class-label", type=int, action="append", help="DiT class id; repeat for several")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fluxtune.png", help="output PNG (several images get _0, _1 ... suffixes)")
    p.add_argument("--device", default=None, help="execution device (default: the GPU if there is one)")
    p.add_argument("--dtype", default=None, help="load dtype (default: bfloat16, or a built-in's own)")
    p.add_argument("--emulate", default=None, metavar="GPU",
                   help='emulate a named card on this GPU, e.g. "RTX 4060": the variant for its class runs under its '
                   "memory, streamed copies paced to its PCIe rate (compute is not emulated)")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from fluxtune import apply, pipelines
    from fluxtune.errors import ProfileError
    from fluxtune.presets import load_profile
    from fluxtune.units import format_bytes

    profile = load_profile(args.profile, args.overrides)
    if args.emulate:
        from fluxtune.hardware import activate_emulation, emulation_note

        print(emulation_note(activate_emulation(args.emulate)))
    spec = pipelines.builtin(args.model)
    dtype = args.dtype or (spec.dtype if spec is not None and spec.dtype else "bfloat16")
    pipe: Any = pipelines.load(args.model, dtype=dtype)
    report = apply(profile, pipe, device=args.device)
    print(report)
    family = pipelines.family(pipe)
    kwargs: dict[str, object] = {"generator": torch.Generator().manual_seed(args.seed)}
    if family == "dit":
        labels = list(args.class_label or [])
        if args.prompt:
            try:
                labels += pipe.get_label_ids(args.prompt)
            except (ValueError, KeyError) as e:
                raise ProfileError(f"--prompt {args.prompt!r} is not a class name of this model: {e}") from None
        kwargs["class_labels"] = labels or [0]
    else:
        kwargs["prompt"] = args.prompt or ["a photo"]
    device = report.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = pipe(**kwargs).images
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    peak = f"peak VRAM {format_bytes(torch.cuda.max_memory_reserved())} reserved" if cuda else "on CPU"
    emulated = " on an EMULATED card (compute is this GPU's)" if args.emulate else ""
    print(f"{len(images)} image(s) in {seconds:.2f}s{emulated} ({peak}) -> {', '.join(str(p) for p in paths)}")
    return 0
