"""How PSNR/SSIM against the reference relate to prompt adherence as knobs degrade flux-mini (CPU).

    python scripts/quality_vs_adherence.py

Each row applies one profile to a fresh flux-mini, renders the evaluation prompts with the same seeds as
the 28-step reference, and prints PSNR, SSIM (torchmetrics) and the mean adherence.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import fluxtune
from fluxtune.minimodels import load_flux_mini
from fluxtune.minimodels.adherence import mean_adherence
from fluxtune.minimodels.domain import EVAL_PROMPTS
from fluxtune.minimodels.training import generate_flux

ROWS: list[tuple[str, dict, int]] = [
    ("reference (28 steps)", {}, 28),
    ("12 steps", {}, 12),
    ("6 steps", {}, 6),
    ("2 steps", {}, 2),
    ("int8 weight-only (torchao)", {"transformer": {"quantize": "int8_weight"}}, 28),
    ("int8 dynamic (torchao)", {"transformer": {"quantize": "int8_dynamic"}}, 28),
    ("fp8 storage (layerwise casting)", {"transformer": {"layerwise_casting": {}}}, 28),
    ("first-block cache 0.1", {"cache": {"kind": "first_block", "threshold": 0.1}}, 28),
    ("first-block cache 0.2", {"cache": {"kind": "first_block", "threshold": 0.2}}, 28),
    ("first-block cache 0.5", {"cache": {"kind": "first_block", "threshold": 0.5}}, 28),
]


def main() -> None:
    torch.manual_seed(0)
    ref = None
    print(f"{'setting':<34} {'PSNR dB':>8} {'SSIM':>6} {'adherence':>9} {'shape':>6}")
    for label, profile, steps in ROWS:
        pipe = load_flux_mini()
        fluxtune.apply(profile, pipe)
        images = generate_flux(pipe, EVAL_PROMPTS, steps=steps, max_sequence_length=96)
        score = mean_adherence(list(images), list(EVAL_PROMPTS))
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if ref is None:
            ref = x
        psnr = min(100.0, float(peak_signal_noise_ratio(x, ref, data_range=1.0)))
        ssim = float(structural_similarity_index_measure(x, ref, data_range=1.0))
        print(f"{label:<34} {psnr:>8.1f} {ssim:>6.3f} {score.total:>9.3f} {score.shape or 0:>6.3f}")


if __name__ == "__main__":
    main()
