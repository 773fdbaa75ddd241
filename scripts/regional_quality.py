"""Issue 20: what regional denoising costs in quality, on the trained flux-mini at twice its native size.

    python scripts/regional_quality.py [OUT_DIR]     # CPU, a few minutes; default docs/results/regional

For each tile/overlap setting, every (prompt, seed) is drawn whole and regionally at 128x128 (flux-mini
draws 64x64 natively), 28 steps. Reported: PSNR/SSIM of regional against whole, and the seam ratio
(:func:`fluxtune.measure.quality.seam_ratio`: the picture's change across the tiles' blend lines over its
change across every line). The same ratio on the *whole* drawings, at the same lines, across prompts
and seeds is the model's own noise: a setting whose seam ratio stays within the whole drawings' mean +
2 standard deviations shows no seam beyond what the model draws there anyway.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.measure.quality import compare, seam_ratio
from fluxtune.minimodels.domain import EVAL_PROMPTS
from fluxtune.tuning import reset
from fluxtune.tuning.regional import seam_lines, token_px

SIZE, STEPS = 128, 28
SETTINGS = [(64, 0), (64, 16), (96, 0), (96, 16), (96, 32)]
PROMPTS, SEEDS = EVAL_PROMPTS[:4], (0, 1, 2)


def draw(pipe, prompt: str, seed: int) -> torch.Tensor:
    return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/regional")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = pipelines.load("flux-mini")
    t0 = time.time()
    whole = {(p, s): draw(pipe, p, s) for p in PROMPTS for s in SEEDS}
    whole_s = (time.time() - t0) / len(whole)
    rows = []
    for tile, overlap in SETTINGS:
        lines = seam_lines(SIZE, tile, overlap, token_px(pipe))
        fluxtune.apply({"tiling": {"mode": "regional", "tile": tile, "overlap": overlap}}, pipe)
        t0 = time.time()
        psnr, ssim, seams, base = [], [], [], []
        for (p, s), ref in whole.items():
            img = draw(pipe, p, s)
            q = compare(SimpleNamespace(images=img, latents=None), SimpleNamespace(images=ref, latents=None))
            psnr.append(q["psnr"])
            ssim.append(q["ssim"])
            seams.append(seam_ratio(img, lines))
            base.append(seam_ratio(ref, lines))
        seconds = (time.time() - t0) / len(whole)
        reset(pipe)
        noise = statistics.mean(base) + 2 * statistics.stdev(base)
        rows.append({"tile": tile, "overlap": overlap, "lines": lines, "psnr": statistics.mean(psnr),
                     "psnr_min": min(psnr), "ssim": statistics.mean(ssim), "seam": statistics.mean(seams),
                     "seam_max": max(seams), "whole_seam_mean": statistics.mean(base), "whole_seam_noise": noise,
                     "within_noise": max(seams) <= noise, "s_per_image": seconds, "whole_s_per_image": whole_s})
        print(json.dumps(rows[-1]))
    (out / "regional-quality.json").write_text(json.dumps({"model": "flux-mini", "size": SIZE, "steps": STEPS,
                                                           "prompts": list(PROMPTS), "seeds": list(SEEDS),
                                                           "rows": rows}, indent=1))
    lines = ["| tile / overlap (px) | PSNR vs whole (mean, min) | SSIM | seam ratio (mean, max) | "
             "whole drawings at the same lines: mean, +2 sd | seams within noise | s per image (whole) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tile']} / {r['overlap']} | {r['psnr']:.1f}, {r['psnr_min']:.1f} dB | {r['ssim']:.3f} | "
                     f"{r['seam']:.2f}, {r['seam_max']:.2f} | {r['whole_seam_mean']:.2f}, {r['whole_seam_noise']:.2f} | "
                     f"{'yes' if r['within_noise'] else 'no'} | {r['s_per_image']:.2f} ({r['whole_s_per_image']:.2f}) |")
    (out / "regional-quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
