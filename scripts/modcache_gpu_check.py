"""modulation.cache on a CUDA device, before a long bench: the tiny Qwen-Image with the 16 GB preset's other
knobs (fp8, partial residency, regional compile) draws what it draws without the cache, fills once per schedule,
never falls back, and does not recompile on the second generation; and on the user's path (``fluxtune.load`` of a
save_pretrained directory, the layers read from the checkpoint onto the GPU) draws the same images.

    python scripts/modcache_gpu_check.py            # prints MODCACHE ok / exits 1
"""

from __future__ import annotations

import sys
import tempfile

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
    with tempfile.TemporaryDirectory() as d:
        pipelines.load("tiny-qwen-image", dtype="bfloat16").save_pretrained(d)
        prof = {**BASE, "modulation": {"cache": True}}
        applied = pipelines.load(d, dtype="bfloat16")
        fluxtune.apply(prof, applied)
        loaded = fluxtune.load(d, prof, dtype="bfloat16")
        user = (draw(applied, 0) - draw(loaded, 0)).abs().mean().item()
        lc = loaded.transformer._fluxtune_modulation_cache
        print(f"MODCACHE user path (fluxtune.load): mean |diff| against from_pretrained + apply {user:.4f}; "
              f"misses {lc.misses} fallbacks {lc.fallbacks}")
        ok = ok and user < 0.01 and (lc.misses, lc.fallbacks) == (1, 0)
    print("MODCACHE ok" if ok else "MODCACHE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
