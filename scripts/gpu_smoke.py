"""Quick GPU checks before long benchmarks: partial residency and group offload on tiny-flux."""

from __future__ import annotations

import torch

import fluxtune
from fluxtune.pipelines import load


def main() -> None:
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for profile in (
        {"transformer": {"offload": {"mode": "partial", "resident_blocks": 1}}},
        {"transformer": {"offload": {"mode": "partial", "resident_blocks": 1}, "quantize": "int8_weight"}},
        {
            "transformer": {"offload": {"mode": "group", "level": "leaf"}},
            "text_encoder_2": {"offload": "model"},
        },
    ):
        pipe = load("tiny-flux", device="cuda", dtype="bfloat16")
        pipe.to("cuda")
        ref = pipe(prompt="a red circle", num_inference_steps=3, generator=g(), output_type="pt").images
        report = fluxtune.apply(profile, pipe)
        out = pipe(prompt="a red circle", num_inference_steps=3, generator=g(), output_type="pt").images
        out2 = pipe(prompt="a red circle", num_inference_steps=3, generator=g(), output_type="pt").images
        diff = (out.float() - ref.float()).abs().max().item()
        print(f"SMOKE {list(profile)} diff {diff:.4f} repeat {(out2 - out).abs().max().item():.4f}")
        print(report)


if __name__ == "__main__":
    main()
