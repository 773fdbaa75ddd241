"""Image quality against a reference: PSNR, SSIM, latent error, and drops from a noise floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fluxtune.errors import FluxtuneError
from fluxtune.measure.result import Measurement

if TYPE_CHECKING:
    from fluxtune.measure.reference import Reference

PSNR_CAP = 100.0
"""PSNR of identical images (infinite) is reported as this, so JSON and YAML stay finite."""



def _ssim_kernel(height: int, width: int) -> tuple[int, float] | None:
    # torchmetrics' SSIM pads by (kernel-1)/2 with reflection, so the kernel must fit the image.
    side = min(height, width)
    if side >= 11:
        return 11, 1.5
    k = side if side % 2 else side - 1
    return (k, 1.5 * k / 11) if k >= 3 else None


def compare(candidate: Measurement | Reference, reference: Measurement | Reference) -> dict[str, float]:
    """Full-reference quality of a candidate's images against a reference's (same workload).

    Returns:
        ``psnr`` (dB, per image then averaged, identical = 100), ``ssim``, ``max_abs`` (largest pixel
        difference in [0, 1]), ``resized`` (1.0 when the candidate was resized bilinearly to the
        reference size first), and ``latent_rmse`` (``|a - b| / |b|`` of the final latents) when both
        have latents of one shape. Empty when either side has no images.

    Raises:
        FluxtuneError: the two hold different numbers of images (different workloads).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    out: dict[str, float] = {}
    a, b = candidate.images, reference.images
    if a is not None and b is not None:
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[1]:
            raise FluxtuneError(
                f"compare: candidate has images {tuple(a.shape)} and the reference {tuple(b.shape)}; "
                "measure both with the same workload"
            )
        resized = a.shape[-2:] != b.shape[-2:]
        if resized:
            a = torch.nn.functional.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=False)
        a = a.clamp(0.0, 1.0)
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
        psnr = torch.nan_to_num(psnr.reshape(-1), posinf=PSNR_CAP).clamp(max=PSNR_CAP)
        out["psnr"] = float(psnr.mean())
        kernel = _ssim_kernel(int(b.shape[-2]), int(b.shape[-1]))
        if kernel is not None:
            k, sigma = kernel
            # One image at a time bounds the memory of the Gaussian filtering at 1024x1024.
            values = []
            for i in range(b.shape[0]):
                ssim = structural_similarity_index_measure(a[i:i + 1], b[i:i + 1], data_range=1.0,
                                                           kernel_size=k, sigma=sigma)
                values.append(float(ssim[0] if isinstance(ssim, tuple) else ssim))
            out["ssim"] = float(sum(values) / len(values))
        out["max_abs"] = float((a - b).abs().max())
        out["resized"] = 1.0 if resized else 0.0
    la, lb = candidate.latents, reference.latents
    if la is not None and lb is not None and la.shape == lb.shape:
        la, lb = la.detach().float().cpu(), lb.detach().float().cpu()
        norm = float(lb.norm())
        if norm > 0:
            out["latent_rmse"] = float((la - lb).norm()) / norm
    return out


def seam_ratio(images: torch.Tensor, lines: list[int]) -> float:
    """How much sharper the picture changes across the given pixel lines (tile borders, as rows and
    columns) than across every line: mean |difference| of neighbouring pixels across ``lines`` over the
    mean across all lines. About 1 for a picture with no seam there; a hard seam raises it."""
    x = images.detach().float().cpu()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()  # dx[..., j]: across the line between columns j and j+1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    at = [line - 1 for line in lines if 0 < line < x.shape[-1]]
    if not at:
        return 1.0
    border = (dx[..., at].mean() + dy[..., at, :].mean()) / 2
    overall = (dx.mean() + dy.mean()) / 2
    return float(border / overall) if overall > 0 else 1.0


WORST = {"psnr": min, "ssim": min, "latent_rmse": max, "max_abs": max}


def quality_drop(quality: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """How much worse than the noise floor a candidate is.

    Returns:
        ``psnr_drop`` = floor psnr - psnr (dB), ``ssim_drop`` = floor ssim - ssim, ``latent_rmse_excess``
        and ``max_abs_excess`` = value - floor value; a missing floor value counts as perfect (100 dB,
        SSIM 1, 0). Negative means better than the floor (noise).
    """
    out: dict[str, float] = {}
    if "psnr" in quality:
        out["psnr_drop"] = floor.get("psnr", PSNR_CAP) - quality["psnr"]
    if "ssim" in quality:
        out["ssim_drop"] = floor.get("ssim", 1.0) - quality["ssim"]
    if "latent_rmse" in quality:
        out["latent_rmse_excess"] = quality["latent_rmse"] - floor.get("latent_rmse", 0.0)
    if "max_abs" in quality:
        out["max_abs_excess"] = quality["max_abs"] - floor.get("max_abs", 0.0)
    return out
