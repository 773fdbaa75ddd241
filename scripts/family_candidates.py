"""Issue 19's candidate presets for the 2026 families, sized by the memory model (predicted, not measured).

    python scripts/family_candidates.py OUTDIR [NAME ...]    # writes OUTDIR/NAME.yaml, prints the predictions
    python scripts/family_candidates.py --which NAME         # prints "REPLICA BUDGET CARD" (for the bench)

Each candidate is the recipe the FLUX.1 presets measured best, carried over: transformer fp8 (row-wise;
the ada/ampere variants come with the shipped preset) with the largest resident share, in 0.25 GB steps,
that the memory model admits under the tier's budget (all of it when it fits), the LLM text encoder in
int8 and streamed block by block, cuDNN attention, regional compile. ``scripts/h200_issue19.sh`` then
measures each against the diffusers recipes that fit the same cap; only measured candidates ship.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fluxtune.memory.facts import ModelFacts
from fluxtune.memory.model import predict
from fluxtune.pipelines import builtin
from fluxtune.presets import load_profile
from fluxtune.units import format_bytes

GB = 10**9

CANDIDATES = {
    # name: (replica, budget GB, the tier card emulated in the bench; "none": no card of the tier can be
    # emulated on the H200 (the only 32 GB card is a Blackwell, SM 12.0), so the bench runs under the cap)
    "flux2-klein-4b-8gb": ("flux2-klein-4b-replica", 8, "RTX 4060"),
    "flux2-klein-9b-12gb": ("flux2-klein-9b-replica", 12, "RTX 4070"),
    "flux2-dev-24gb": ("flux2-dev-replica", 24, "RTX 4090"),
    "flux2-dev-32gb": ("flux2-dev-replica", 32, "none"),
    # The 4080 (PCIe 4.0 x16) rather than the x8 4060 Ti 16GB: half the device time for the same ranking.
    "qwen-image-16gb": ("qwen-image-replica", 16, "RTX 4080"),
    "qwen-image-24gb": ("qwen-image-replica", 24, "RTX 4090"),
}

# What the memory model misses on the GPU, measured (2026-12-04): FLUX.2 [dev] with 15 GB of its transformer
# resident was predicted at 23.8 GB and ran out of memory under 24 GB (the allocator's fragmentation between
# streamed blocks); at 12.5 GB it was predicted at 21.2 GB and NVML measured 23.7 GB.
MARGIN_GB = {"flux2-dev-replica": 2.6}

# The capability classes' variants, as in the FLUX.1 presets: fp8 needs SM 8.9 (tensor-wise scales
# before Hopper); Ampere keeps int8 weights and computes in bf16.
VARIANTS = [
    {"name": "ada", "classes": ["ada", "blackwell"],
     "description": "fp8 with tensor-wise scales (row-wise fp8 needs Hopper)",
     "set": {"transformer.quantize.granularity": "tensor"}},
    {"name": "ampere", "classes": ["ampere"],
     "description": "int8 weights, bf16 compute (no fp8 compute before SM 8.9; unmeasured)",
     "set": {"transformer.quantize.method": "int8_weight"}},
]


def candidate(name: str, replica: str, budget: int, resident: float | None, vae_tiling: bool = False) -> dict[str, Any]:
    spec = builtin(replica)
    assert spec is not None, replica
    gen = dict(spec.generation or {})
    t_off: dict[str, Any] = {"mode": "none"} if resident is None else {"mode": "partial", "resident": f"{resident}GB"}
    return {
        "name": name, "family": spec.family,
        "description": f"issue 19 candidate: {replica} under {budget} GB (memory-model sized, not yet measured)",
        "budget": {"vram": f"{budget}GB"},
        "transformer": {"quantize": {"method": "fp8_dynamic"}, "offload": t_off},
        "text_encoder": {"quantize": {"method": "int8_weight"}, "offload": {"mode": "partial", "resident_blocks": 0}},
        "vae": {"tiling": vae_tiling},
        "attention": {"backend": "_native_cudnn"},
        "compile": {"mode": "regional", "inductor_flags": False},
        "generation": {k: gen[k] for k in ("height", "width", "steps") if k in gen},
        "variants": VARIANTS,
    }


def main(out: Path, names: list[str]) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    for name in names or list(CANDIDATES):
        replica, budget, _card = CANDIDATES[name]
        facts = ModelFacts.for_builtin(replica)
        chosen, pred, tiled = None, None, False
        # The most resident transformer bytes, with the VAE whole or tiled (its decode can be the peak).
        for resident in [None, *(q / 4 for q in range(budget * 4, 0, -1))]:
            for vae_tiling in (False, True):
                prof = load_profile(candidate(name, replica, budget, resident, vae_tiling))
                p = predict(prof, facts)
                if p.peak_vram + MARGIN_GB.get(replica, 0.0) * GB <= budget * GB:
                    chosen, pred, tiled = prof, p, vae_tiling
                    break
            if chosen is not None:
                break
        if chosen is None or pred is None:
            p = predict(load_profile(candidate(name, replica, budget, 0.0)), facts)
            print(f"{name}: nothing fits {budget}GB (no resident block: {format_bytes(p.peak_vram)} in {p.peak_phase})")
            continue
        data = candidate(name, replica, budget, getattr(chosen.transformer.offload, "resident", None) and
                         round(chosen.transformer.offload.resident / GB, 2), tiled)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        off = data["transformer"]["offload"]
        print(f"{name}: {replica}, transformer {off.get('resident', 'all')} resident, VAE {'tiled' if tiled else 'whole'}; predicted peak "
              f"{format_bytes(pred.peak_vram)} in {pred.peak_phase} under {budget}GB, host {format_bytes(pred.host_ram)}")


if __name__ == "__main__":
    if sys.argv[1] == "--which":
        replica, budget, card = CANDIDATES[sys.argv[2]]
        print(replica, f"{budget}GB", card)
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
