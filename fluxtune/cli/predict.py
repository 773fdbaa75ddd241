"""fluxtune predict: a profile's predicted latency on a named GPU (never a measurement)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="a YAML file or a preset name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted profile overrides")
    p.add_argument("--gpu", required=True, metavar="NAME", help='a card from the GPU table, e.g. "RTX 4060"')
    p.add_argument("--size", default=None, metavar="WxH", help="image size (default: the profile's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the profile's)")
    p.add_argument("--model", default=None,
                   help="built-in model whose shapes are counted (default: the profile's measured model, else "
                   "the family's full-size replica: flux-dev-replica, flux2-dev-replica, qwen-image-replica, dit-xl-2-256)")
    p.add_argument("--emulated-on", default=None, metavar="GPU",
                   help='predict what `--emulate CARD` measures on this bigger GPU (e.g. "H200"): its compute and '
                   "memory bandwidth, the card's capability class and host->device link")
    p.add_argument("--json", action="store_true", help="print JSON")


def _size(text: str | None) -> tuple[int | None, int | None]:
    from fluxtune.errors import ProfileError

    if text is None:
        return None, None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) % 16 or int(h) % 16 or int(w) < 16 or int(h) < 16:
        raise ProfileError(f"--size={text!r}: use WIDTHxHEIGHT in pixels, multiples of 16, e.g. 1024x1024")
    return int(w), int(h)


def run(args: argparse.Namespace) -> int:
    import json

    from fluxtune.gpus import find_gpu
    from fluxtune.predict import emulated_on, fastest_gemm_precision, predict_latency, resolve_for_card
    from fluxtune.presets import load_profile

    gpu = find_gpu(args.gpu)  # ProfileError (exit 2) with the closest names
    width, height = _size(args.size)
    if args.steps is not None and args.steps < 1:
        from fluxtune.errors import ProfileError

        raise ProfileError(f"--steps={args.steps}: use a positive number of steps")
    profile = resolve_for_card(load_profile(args.profile, args.overrides), gpu)
    card = gpu
    if args.emulated_on:
        gpu = emulated_on(card, find_gpu(args.emulated_on))
    r = predict_latency(profile, gpu, model=args.model, height=height, width=width, steps=args.steps)
    variant = getattr(profile, "variant", None)
    if args.json:
        print(json.dumps({
            "predicted": True, "gpu": card.name, "emulated_on": gpu.name if card is not gpu else None,
            "profile": r.profile, "variant": variant, "model": r.model,
            "width": r.width, "height": r.height, "steps": r.steps, "total_s": r.total_s,
            "text_encode_s": r.text_encode_s, "step_s": r.step.seconds, "passes_per_step": r.passes,
            "cfg_batched": r.cfg_batched, "computed_steps": r.computed_steps, "steps_s": r.steps_s, "decode_s": r.decode_s,
            "step_bound": r.step.bound, "compute_floor_s": r.floor_s, "assumptions": list(r.assumptions),
        }, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    name = r.profile + (f" (variant {variant})" if variant and variant != "base" else "")
    where = (f"{card.name} emulated on {gpu.name} ({gpu.name}'s compute, {card.name}'s {card.h2d_gbs:g} GB/s link)"
             if card is not gpu else f"{gpu.name} ({gpu.capability})")
    table = Table(title=f"predicted latency: {name} on {where}, {r.model} "
                        f"{r.width}x{r.height}, {r.steps} steps", title_justify="left")
    for col in ("phase", "predicted", "GEMM", "attention", "memory ops", "CPU launch", "host->device", "bound"):
        table.add_column(col, justify="left" if col in ("phase", "bound") else "right")

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"

    # FLUX.1 has CLIP and T5; FLUX.2 and Qwen-Image one LLM encoder (Qwen3, Mistral-3, Qwen2.5-VL).
    first = "text encoder (CLIP)" if "text_encoder_2" in r.phases else "text encoder (LLM)"
    enc = ", prompt + negative (per-encode columns)" if r.passes > 1 else ""
    step = "one denoising step" + (" (both CFG rows)" if r.cfg_batched else "")
    for phase_name, label, times in (("text_encoder", first + enc, r.passes),
                                     ("text_encoder_2", "text encoder 2 (T5)" + enc, r.passes),
                                     ("transformer", step, 1), ("vae", "VAE decode", 1)):
        p = r.phases.get(phase_name)
        if p is None:
            continue
        table.add_row(label, ms(p.seconds * times), ms(p.gemm_s), ms(p.attn_s), ms(p.memory_s), ms(p.launch_s),
                      ms(p.transfer_s), f"{p.bound} ({p.precision})")
    steps_label = f"{r.steps} steps" + (f" ({r.computed_steps} computed)" if r.computed_steps is not None else "") + (
        " (true CFG batched)" if r.cfg_batched else f" x {r.passes} passes (true CFG)" if r.passes > 1 else "")
    table.add_row(steps_label, ms(r.steps_s), "", "", "", "", "", "")
    table.add_row("total (predicted)", f"{r.total_s:.2f} s", "", "", "", "", "", "", style="bold")
    console = Console(width=140)
    console.print(table)
    fastest = fastest_gemm_precision(gpu)
    console.print(f"compute floor on {gpu.name}: {r.floor_s:.2f} s (GEMMs at the card's fastest precision, "
                  f"{fastest} at {gpu.rate(fastest) or 0:g} TFLOPS dense, "
                  f"attention at bf16, 100 % efficiency); predicted / floor = {r.total_s / r.floor_s:.2f}x"
                  + (f" (the floor counts all {r.steps} steps, the cache computes {r.computed_steps})"
                     if r.computed_steps is not None else ""))
    console.print("predicted, not measured. Assumptions:")
    for line in r.assumptions:
        console.print(f"  - {line}", highlight=False)
    return 0
