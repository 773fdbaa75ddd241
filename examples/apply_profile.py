"""Apply a profile (a shipped preset or your own YAML) to a loaded pipeline, then generate.

    python examples/apply_profile.py                                   # tiny built-in model, CPU
    python examples/apply_profile.py --model black-forest-labs/FLUX.1-dev --profile flux-dev-12gb
"""

from __future__ import annotations

import argparse

import torch

import fluxtune
from fluxtune import pipelines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux", help="built-in name, local path or hub id")
    parser.add_argument("--profile", default=None, help="preset name or YAML (default: a small CPU profile)")
    parser.add_argument("--prompt", default="a red circle at the top left on a blue background")
    parser.add_argument("--out", default="example.png")
    args = parser.parse_args(argv)

    # A profile is data: load it from YAML or build it from a dict, with dotted overrides.
    profile = fluxtune.load_profile(args.profile) if args.profile else fluxtune.load_profile(
        {"name": "cpu-example", "transformer": {"quantize": "int8_weight"}, "generation": {"steps": 8}},
        overrides=["cache=first_block", "cache.threshold=0.05"],
    )
    pipe = pipelines.load(args.model)
    report = fluxtune.apply(profile, pipe)  # validates everything first, then applies, in order
    print(report)

    # The profile's generation settings are now the pipeline's defaults; explicit arguments still win.
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
