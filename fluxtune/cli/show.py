"""fluxtune show: validate a profile and print it resolved (all fields, defaults filled in)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help='resolve the variant a card runs (e.g. "RTX 4060") and check the profile against it')
    p.add_argument("profile", help="a YAML file or a preset name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. transformer.quantize=int8_weight")
    p.add_argument("--minimal", action="store_true", help="print only fields that differ from the defaults")


def run(args: argparse.Namespace) -> int:
    from fluxtune.presets import load_profile, to_yaml

    profile = load_profile(args.profile, args.overrides)
    card = None
    if args.gpu:
        from fluxtune.gpus import find_gpu
        from fluxtune.hardware import HardwareInfo
        from fluxtune.tuning import check_hardware

        card = find_gpu(args.gpu)
        profile = check_hardware(profile, HardwareInfo.of_card(card))  # the variant that card runs, checked against it
    print(to_yaml(profile, full=not args.minimal), end="")
    gpu = profile.needs_gpu()
    notes = []
    if card is not None:
        notes.append(f"variant {profile.variant or 'base'} for the {card.name} (class {card.capability}); it runs there")
    elif profile.variants:
        notes.append("variants by GPU class: " + "; ".join(
            f"{name}: {', '.join(classes)}" for name, classes, _ in profile.variant_table() if classes)
            + " (--gpu CARD shows one)")
    else:
        need = profile.min_compute_capability()
        if need:
            notes.append(f"needs compute capability >= {need[0][0]}.{need[0][1]} ({need[1]})")
    if gpu:
        notes.append(f"needs a CUDA GPU ({gpu})")
    if profile.measured is None or profile.measured.status == "unmeasured":
        notes.append("unmeasured")
    if notes:
        print("# " + "; ".join(notes))
    return 0
