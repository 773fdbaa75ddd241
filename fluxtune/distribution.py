"""A distribution-level shift measure for class-conditional (DiT) images, computable offline.

What it is: the distance between two *sets* of images, the candidate's samples and the unquantized
model's samples rendered on the same class labels and seeds, measured in a fixed random-feature
space. It measures how far quantization (or any other knob) moves the output distribution, which
per-image PSNR/SSIM (:func:`fluxtune.measure.compare`) cannot tell apart from harmless pixel noise.
Two numbers are reported:

* ``fd``: the Fréchet distance between Gaussians fitted to the two feature sets,
  ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. Biased upwards for small sets.
* ``kid``: the unbiased polynomial-kernel MMD^2 (the estimator behind KID), mean and spread over
  random subsets; sets of equal size are paired row by row (same label and seed). Unbiased, so it
  is the number to trust for a few hundred samples; it can be slightly negative.

The feature extractor (:func:`features`) is a small conv net whose weights are drawn from a seeded
CPU generator (never trained, never downloaded): images are resized to 64x64, passed through three
ReLU conv layers, each layer's activations are averaged over space (three scales of texture and
edge energy), and per-channel colour mean and standard deviation are appended. Everything runs on
the CPU in float64, so the same images and seed give the same features whatever device rendered
them: bit for bit with the same torch version and thread count, to float64 rounding otherwise.

What it is not: it is not FID and not KID in the published sense. There is no Inception network
and no real-data statistics; the reference is the unquantized model, not ImageNet. The numbers are
not comparable with published FID/KID, nor across seeds of the feature extractor (or fluxtune
versions that change it). A random-feature space responds to low-level statistics (colour,
contrast, texture, sharpness) far more than to semantics: it will see a colour cast or blur that
quantization introduces, but not that a dog became a cat with the same palette. Use it next to
PSNR/SSIM, to compare candidates of one workload with each other, not as an absolute score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluxtune.errors import ProfileError

__all__ = [
    "FEATURE_DIM",
    "RESIZE",
    "DistributionShift",
    "compare_features",
    "compare_sets",
    "features",
    "frechet_distance",
    "kernel_distance",
]

RESIZE = 64
"""Images are resized to RESIZE x RESIZE before feature extraction, so any resolution compares."""

_CHANNELS = (16, 32, 64)
# Kept small on purpose: with a few hundred samples a covariance of a much wider space is mostly
# estimation noise, which inflates the (biased) Fréchet distance without adding signal.

FEATURE_DIM = sum(_CHANNELS) + 6
"""Length of one image's feature vector: pooled conv activations plus colour mean/std per channel."""

_KID_SUBSET_CAP = 100


# ------------------------------------------------------------------------------------ validation


def _check_images(name: str, images: object) -> torch.Tensor:
    """The images as a tensor, or a ProfileError naming the argument and the offending value."""
    if not isinstance(images, torch.Tensor):
        raise ProfileError(f"{name}: expected a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.dim() != 4 or shape[1] != 3 or shape[2] < 1 or shape[3] < 1:
        raise ProfileError(f"{name} has shape {shape}; expected (N, 3, H, W) RGB images")
    if shape[0] < 2:
        raise ProfileError(f"{name} has {shape[0]} sample(s); a distribution needs at least 2")
    if not images.is_floating_point():
        raise ProfileError(f"{name} has dtype {images.dtype}; expected float images in [0, 1] "
                           "(divide uint8 images by 255)")
    lo, hi = float(images.min()), float(images.max())
    # Written as the valid range, not the invalid one: NaN makes every comparison false, so it fails here.
    if not (lo >= 0.0 and hi <= 1.0):
        raise ProfileError(f"{name} has values in [{lo:g}, {hi:g}]; expected finite values in [0, 1]")
    return images


def _check_feats(name: str, feats: object) -> torch.Tensor:
    """Feature matrix (N, D) with N >= 2, finite, as float64 on the CPU."""
    if not isinstance(feats, torch.Tensor):
        raise ProfileError(f"{name}: expected a torch.Tensor of shape (N, D), got {type(feats).__name__}")
    if feats.dim() != 2 or feats.shape[1] < 1:
        raise ProfileError(f"{name} has shape {tuple(feats.shape)}; expected (N, D) features")
    if feats.shape[0] < 2:
        raise ProfileError(f"{name} has {feats.shape[0]} sample(s); a distribution needs at least 2")
    out = feats.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ProfileError(f"{name} has non-finite values; features must be finite")
    return out


def _check_pair(a_feats: object, b_feats: object) -> tuple[torch.Tensor, torch.Tensor]:
    a = _check_feats("a_feats", a_feats)
    b = _check_feats("b_feats", b_feats)
    if a.shape[1] != b.shape[1]:
        raise ProfileError(f"a_feats has {a.shape[1]} features per sample but b_feats has {b.shape[1]}; "
                           "extract both with the same features() seed")
    return a, b


# -------------------------------------------------------------------------------------- features


def _weights(seed: int) -> list[torch.Tensor]:
    """The conv kernels for a seed, drawn from their own CPU generator (global RNG untouched)."""
    g = torch.Generator().manual_seed(seed)
    kernels = []
    c_in = 3
    for c_out in _CHANNELS:
        fan_in = c_in * 9
        # He scaling keeps activations of the same order through the ReLU layers, so no scale
        # dominates the Fréchet distance merely by magnitude.
        w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * math.sqrt(2.0 / fan_in)
        # Zero-mean kernels respond to edges and texture, not to overall brightness, which the
        # colour statistics already carry.
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        kernels.append(w)
        c_in = c_out
    return kernels


def _extract(x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """Features of one batch already resized to RESIZE x RESIZE, float64 in [0, 1]."""
    colour = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
    h = x * 2.0 - 1.0
    pooled = []
    for w in kernels:
        # Stride 2: each layer sees a twice larger neighbourhood (3, 7, 15 px at 64x64).
        h = F.relu(F.conv2d(h, w, stride=2, padding=1))
        pooled.append(h.mean(dim=(2, 3)))
    return torch.cat([*pooled, colour], dim=1)


def features(images: torch.Tensor, *, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """Fixed random-conv-net features of images, shape (N, FEATURE_DIM), float64 on the CPU.

    Args:
        images: (N, 3, H, W) float images in [0, 1], N >= 2, on any device and of any H, W.
        seed: picks the random weights; only features of the same seed are comparable.
        batch: images per forward pass (memory only; results agree to float64 rounding).

    Raises:
        ProfileError: wrong type, shape, dtype or value range, or a batch below 1.
    """
    images = _check_images("images", images)
    if not isinstance(batch, int) or batch < 1:
        raise ProfileError(f"batch={batch!r}; expected a positive integer")
    kernels = _weights(seed)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            # Everything on the CPU in float64: the same numbers whatever device rendered the images.
            x = images[start:start + batch].detach().to("cpu", torch.float64)
            if tuple(x.shape[-2:]) != (RESIZE, RESIZE):
                # antialias: downscaling a 256/512 px image must average, not alias, its fine texture.
                x = F.interpolate(x, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False,
                                  antialias=True).clamp(0.0, 1.0)
            out.append(_extract(x, kernels))
    return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------- distances


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0.0).sqrt()) @ vecs.T


def frechet_distance(a_feats: torch.Tensor, b_feats: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    The trace of (S_a S_b)^(1/2) is computed as the trace of (S_a^(1/2) S_b S_a^(1/2))^(1/2): the
    same eigenvalues, but of a symmetric matrix, so eigh applies and no complex parts appear
    (unlike the general eigenvalues of the non-symmetric product). Float64 throughout.

    Raises:
        ProfileError: not (N, D) tensors, fewer than 2 samples, non-finite, or different D.
    """
    a, b = _check_pair(a_feats, b_feats)
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    # reshape: torch.cov returns a 0-d tensor for one feature; keep it a 1x1 matrix.
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    mid = root_a @ cov_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0.0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * tr_sqrt
    # The true distance is >= 0; a negative value here is rounding (identical sets), not signal.
    return max(0.0, float(fd))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with the KID kernel k(u, v) = (u.v / D + 1)^3, for equal-sized x and y.

    The U-statistic over pairs i != j of z_i = (x_i, y_i): every diagonal term is left out, the
    cross one k(x_i, y_i) too. That keeps it unbiased when x_i and y_i are paired (same label and
    seed, so correlated), and makes it exactly 0 for identical sets.
    """
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    total = (k_xx + k_yy - k_xy - k_xy.T).sum() - (k_xx + k_yy - 2.0 * k_xy).diagonal().sum()
    return float(total / (m * (m - 1)))


def kernel_distance(
    a_feats: torch.Tensor,
    b_feats: torch.Tensor,
    *,
    subsets: int = 50,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID-style kernel distance: mean and standard deviation of unbiased MMD^2 over random subsets.

    Sets of equal size are taken as paired (row i of each rendered on the same label and seed):
    each subset draws the same rows from both, which cancels the per-sample variation the two sets
    share, so a small shift stands out. Sets of different sizes draw their rows independently.
    The estimator is unbiased either way (see :func:`_mmd2_unbiased`), so two samples of one
    distribution give values around 0, some below. The std is the spread of one subset's
    estimate, not the standard error of the mean.

    Args:
        subsets: how many subsets to average.
        subset_size: rows per subset, at least 2 and at most the smaller set; ``None`` takes half
            the smaller set (capped at 100) so subsets differ and the std is informative.
        seed: seeds the subset draws (own generator; the global RNG is untouched).

    Raises:
        ProfileError: bad features (see :func:`frechet_distance`), subsets < 1 or a subset_size
            outside [2, min(N_a, N_b)].
    """
    a, b = _check_pair(a_feats, b_feats)
    n = min(a.shape[0], b.shape[0])
    if not isinstance(subsets, int) or subsets < 1:
        raise ProfileError(f"subsets={subsets!r}; expected a positive integer")
    size = max(2, min(_KID_SUBSET_CAP, n // 2)) if subset_size is None else subset_size
    if not isinstance(size, int) or not 2 <= size <= n:
        raise ProfileError(f"subset_size={subset_size!r}; expected an integer in [2, {n}] (the smaller set)")
    paired = a.shape[0] == b.shape[0]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=g)[:size]
        ib = ia if paired else torch.randperm(b.shape[0], generator=g)[:size]
        values.append(_mmd2_unbiased(a[ia], b[ib]))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(correction=0))


# --------------------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class DistributionShift:
    """How far a candidate's image set lies from the reference set, in the random-feature space.

    ``fd`` is the Fréchet distance (>= 0, biased up for small n), ``kid_mean``/``kid_std`` the
    kernel distance over subsets (unbiased, may dip just below 0), ``n`` the images per set.
    Not FID/KID: see the module docstring.
    """

    fd: float
    kid_mean: float
    kid_std: float
    n: int


def compare_sets(candidate: torch.Tensor, reference: torch.Tensor, *, seed: int = 0) -> DistributionShift:
    """The distribution shift of the candidate's images from the reference (unquantized) images.

    Both are (N, 3, H, W) float images in [0, 1] rendered on the same labels and seeds, so N must
    match. ``seed`` picks the feature extractor's weights and the KID subsets.

    Raises:
        ProfileError: either set fails :func:`features`' checks, or the counts differ.
    """
    candidate = _check_images("candidate", candidate)
    reference = _check_images("reference", reference)
    if candidate.shape[0] != reference.shape[0]:
        raise ProfileError(f"candidate has {candidate.shape[0]} images but reference has {reference.shape[0]}; "
                           "render both on the same labels and seeds")
    return compare_features(features(candidate, seed=seed), features(reference, seed=seed), seed=seed)


def compare_features(candidate: torch.Tensor, reference: torch.Tensor, *, seed: int = 0) -> DistributionShift:
    """:func:`compare_sets` on features already extracted (with the same ``seed``), e.g. in worker
    processes that send back (N, FEATURE_DIM) features instead of images."""
    kid_mean, kid_std = kernel_distance(candidate, reference, seed=seed)
    return DistributionShift(fd=frechet_distance(candidate, reference), kid_mean=kid_mean, kid_std=kid_std,
                             n=int(candidate.shape[0]))
