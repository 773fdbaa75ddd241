"""fluxtune show: validate a profile and print it resolved (all fields, defaults filled in)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="a YAML file or a preset name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. transformer.quantize=int8_weight")
    p.add_argument("--minimal", action="store_true", help="print only fields that differ from the defaults")


def run(args: argparse.Namespace) -> int:
    from fluxtune.presets import load_profile, to_yaml

    profile = load_profile(args.profile, args.overrides)
    print(to_yaml(profile, full=not args.minimal), end="")
    need = profile.min_compute_capability()
    gpu = profile.needs_gpu()
    notes = []
    if gpu:
        notes.append(f"needs a CUDA GPU ({gpu})")
    if need:
        notes.append(f"needs compute capability >= {need[0][0]}.{need[0][1]} ({need[1]})")
    if profile.measured is None or profile.measured.status == "unmeasured":
        notes.append("unmeasured")
    if notes:
        print("# " + "; ".join(notes))
    return 0
