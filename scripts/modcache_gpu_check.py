"""modulation.cache on a CUDA device, before a long bench: the tiny Qwen-Image with the 16 GB preset's other
knobs (fp8, partial residency, regional compile) draws what it draws without the cache, fills once per schedule,
never falls back, and does not recompile on the second generation.

    python scripts/modcache_gpu_check.py            # prints MODCACHE ok / exits 1
"""

from __future__ import annotations

import sys

import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.measure.dynamo import DynamoWatch

BASE = {"name": "q", "family": "qwenimage", "generation": {"height": 64, "width": 64, "steps": 4},
        "transformer": {"quantize": "fp8_dynamic", "offload": {"mode": "partial", "resident_blocks": 1}},
        "compile": {"mode": "regional"}}


def draw(pipe, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt="a red circle", generator=g, output_type="pt").images.float()


def main() -> int:
    plain = pipelines.load("tiny-qwen-image", device="cuda", dtype="bfloat16")
    fluxtune.apply(BASE, plain)
    pipe = pipelines.load("tiny-qwen-image", device="cuda", dtype="bfloat16")
    print(fluxtune.apply({**BASE, "modulation": {"cache": True}}, pipe))
    cache = pipe.transformer._fluxtune_modulation_cache
    a, b = draw(plain, 0), draw(pipe, 0)
    with DynamoWatch() as again:
        draw(pipe, 1)
    diff = (a - b).abs().mean().item()
    print(f"MODCACHE mean |diff| {diff:.4f}; misses {cache.misses} filled {cache.filled} "
          f"fallbacks {cache.fallbacks}; second call frames {again.frames} recompiles {again.recompiles}")
    ok = diff < 0.05 and (cache.misses, cache.filled, cache.fallbacks) == (1, 4, 0) and again.recompiles == 0
    print("MODCACHE ok" if ok else "MODCACHE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
