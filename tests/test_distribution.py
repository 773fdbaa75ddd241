"""fluxtune.distribution: the offline random-feature distribution shift (not FID), on CPU in seconds."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fluxtune.distribution import (
    FEATURE_DIM,
    DistributionShift,
    compare_sets,
    features,
    frechet_distance,
    kernel_distance,
)
from fluxtune.errors import ProfileError


def _images(n: int, seed: int, *, coarse: int = 8, size: int = 48) -> torch.Tensor:
    """A synthetic image distribution: smooth random colour fields (coarse grid, upsampled) plus grain.

    ``coarse`` sets the scale of the structure, so two values give two different distributions
    with the same colour statistics; the size is not 64 so the resize path is exercised.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, coarse, coarse, generator=g)
    x = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0.0, 1.0)


def _noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


@pytest.fixture(scope="module")
def ref() -> torch.Tensor:
    return _images(128, seed=0)


# -------------------------------------------------------------------------------------- features


def test_features_are_deterministic_and_seeded(ref):
    rng_before = torch.random.get_rng_state()
    first = features(ref)
    second = features(ref)
    # The extractor draws its weights from its own generator: the caller's seeds stay untouched.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert first.shape == (128, FEATURE_DIM) and first.dtype == torch.float64
    assert torch.equal(first, second)
    # Batching is a memory knob only.
    torch.testing.assert_close(features(ref, batch=5), first, rtol=0, atol=1e-12)
    # Another seed is another feature space.
    assert not torch.allclose(features(ref, seed=1), first)
    # Any resolution and aspect ratio is accepted (resized to 64x64 first).
    assert features(torch.rand(3, 3, 30, 70)).shape == (3, FEATURE_DIM)


@pytest.mark.slow  # a second interpreter importing torch: a few seconds
def test_features_identical_in_a_fresh_process(ref, tmp_path):
    # Determinism across runs, not only across calls: the weights must come from the seed alone.
    torch.save(ref, tmp_path / "images.pt")
    code = ("import sys, torch; from fluxtune.distribution import features; torch.set_num_threads(1); "
            "torch.save(features(torch.load(sys.argv[1])), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "images.pt"), str(tmp_path / "feats.pt")],
                   check=True, timeout=60)
    assert torch.equal(torch.load(tmp_path / "feats.pt"), features(ref))


def test_colour_statistics_are_the_last_six_features():
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # 64x64: no resize
    f = features(x)
    torch.testing.assert_close(f[:, -6:-3], x.double().mean(dim=(2, 3)))
    torch.testing.assert_close(f[:, -3:], x.double().std(dim=(2, 3)))



def test_downscaling_averages_fine_grain():
    # A 512 px DiT image must be averaged down to 64 px, not point-sampled: aliased grain would show
    # up as full-strength texture and colour spread that is not visible at the compared scale.
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert float((features(x)[:, -3:] / x.double().std(dim=(2, 3))).max()) < 0.3


# ------------------------------------------------------------------------------------- distances


def test_identical_sets_are_at_distance_zero(ref):
    shift = compare_sets(ref, ref.clone())
    assert isinstance(shift, DistributionShift) and shift.n == 128
    assert 0.0 <= shift.fd < 1e-9
    # Paired U-statistic: identical sets give exactly 0, not merely something small.
    assert shift.kid_mean == 0.0 and shift.kid_std == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        shift.fd = 1.0  # type: ignore[misc]


def test_distance_grows_with_noise(ref):
    shifts = [compare_sets(_noisy(ref, sigma), ref) for sigma in (0.01, 0.03, 0.1, 0.3)]
    fds = [s.fd for s in shifts]
    kids = [s.kid_mean for s in shifts]
    assert fds == sorted(fds) and len(set(fds)) == 4, fds
    assert kids == sorted(kids) and len(set(kids)) == 4, kids
    # Slight noise is small against heavy noise, by orders of magnitude, not a few percent.
    assert fds[0] < 1e-2 * fds[-1] and kids[0] < 1e-2 * kids[-1]
    assert kids[0] > 0.0  # paired, so even a slight shift is resolved above 0


def test_colour_shift_is_seen(ref):
    def tinted(amount: float) -> torch.Tensor:
        x = ref.clone()
        x[:, 0] = (x[:, 0] + amount).clamp(0.0, 1.0)
        return x

    slight = compare_sets(_noisy(ref, 0.01), ref)
    small, large = compare_sets(tinted(0.02), ref), compare_sets(tinted(0.2), ref)
    assert slight.fd < small.fd < large.fd and slight.kid_mean < small.kid_mean < large.kid_mean
    assert large.fd > 100 * slight.fd
    assert large.kid_mean > 10 * large.kid_std


def test_same_distribution_near_zero_different_distribution_not(ref):
    a = features(ref)
    same = features(_images(128, seed=7))
    other = features(_images(128, seed=7, coarse=16))  # finer structure, same colour statistics

    for b in (same, same[:100]):  # paired (equal sizes) and independent (unequal) subset draws
        mean, std = kernel_distance(a, b)
        assert std > 0.0 and abs(mean) < 3 * std, (mean, std)
    mean_other, std_other = kernel_distance(a, other)
    assert mean_other > 10 * std_other > 0.0, (mean_other, std_other)
    # The Fréchet distance is biased upwards for small sets, but still orders the two.
    assert frechet_distance(a, same) < 0.2 * frechet_distance(a, other)


def test_kid_std_is_the_spread_of_one_subset(ref):
    a, b = features(ref), features(_noisy(ref, 0.1))
    # One subset per seed: independent draws of the very estimate whose spread kid_std reports.
    singles = torch.tensor([kernel_distance(a, b, subsets=1, seed=s)[0] for s in range(40)], dtype=torch.float64)
    mean, std = kernel_distance(a, b, subsets=200)
    assert kernel_distance(a, b, subsets=1)[1] == 0.0
    assert 0.6 < std / float(singles.std()) < 1.6, (std, float(singles.std()))
    # Both means are estimates of one value: their difference has error std * sqrt(1/40 + 1/200).
    assert abs(mean - float(singles.mean())) < 4 * std * (1 / 40 + 1 / 200) ** 0.5


def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    # 1-D: |m_a - m_b|^2 + (s_a - s_b)^2 with the sample (N - 1) statistics.
    x, y = torch.randn(40, 1, generator=g), 3.0 + 0.5 * torch.randn(60, 1, generator=g)
    expected = float((x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    # b = 2 a + c with a centred: S_b = 4 S_a commutes with S_a, so FD = |c|^2 + tr(S_a).
    # Also with fewer samples than dimensions (singular covariances: the PSD clamp is exercised).
    for n, d in ((50, 8), (10, 20)):
        a = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                               dtype=torch.float64)
        a = a - a.mean(dim=0)
        c = torch.randn(d, generator=g, dtype=torch.float64)
        expected = float(c.square().sum() + torch.cov(a.T).trace())
        assert frechet_distance(a, 2 * a + c) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance(2 * a + c, a) == pytest.approx(expected, rel=1e-6)


def test_kernel_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5

    def k(u: torch.Tensor, v: torch.Tensor) -> float:
        return float((u @ v / 3 + 1) ** 3)

    m = 7
    expected = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
                   for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    # Subsets of the full size hold every row, so each subset gives the full-set statistic.
    mean, std = kernel_distance(x, y, subsets=3, subset_size=7)
    assert mean == pytest.approx(expected, rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)
    # Seeded: the same seed gives the same subsets.
    assert kernel_distance(x, y, subset_size=3, seed=4) == kernel_distance(x, y, subset_size=3, seed=4)


# ------------------------------------------------------------------------------------ validation

_GOOD = torch.rand(4, 3, 8, 8)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: features(torch.rand(3, 64, 64)), "images has shape (3, 64, 64)"),
        (lambda: features(torch.rand(4, 1, 8, 8)), "images has shape (4, 1, 8, 8)"),
        (lambda: features(torch.rand(1, 3, 8, 8)), "images has 1 sample(s)"),
        (lambda: features((_GOOD * 255).to(torch.uint8)), "images has dtype torch.uint8"),
        (lambda: features(_GOOD * 2 - 1), "images has values in ["),
        (lambda: features(torch.full((2, 3, 4, 4), float("nan"))), "images has values in [nan"),
        (lambda: features([_GOOD]), "images: expected a torch.Tensor"),  # type: ignore[arg-type]
        (lambda: features(_GOOD, batch=0), "batch=0"),
        (lambda: frechet_distance(torch.rand(1, 5), torch.rand(4, 5)), "a_feats has 1 sample(s)"),
        (lambda: frechet_distance(torch.rand(4), torch.rand(4, 5)), "a_feats has shape (4,)"),
        (lambda: frechet_distance(torch.rand(4, 5), torch.rand(4, 6)),
         "a_feats has 5 features per sample but b_feats has 6"),
        (lambda: kernel_distance(torch.rand(4, 5), torch.rand(3, 5), subset_size=4), "subset_size=4"),
        (lambda: kernel_distance(torch.rand(4, 5), torch.rand(4, 5), subsets=0), "subsets=0"),
        (lambda: compare_sets(torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)),
         "candidate has 2 images but reference has 3"),
        (lambda: compare_sets(torch.rand(1, 3, 8, 8), _GOOD), "candidate has 1 sample(s)"),
        (lambda: compare_sets(_GOOD, torch.rand(4, 3, 8)), "reference has shape (4, 3, 8)"),
    ],
)
def test_bad_input_raises_one_clear_line(call, needle):
    with pytest.raises(ProfileError) as info:
        call()
    message = str(info.value)
    assert needle in message and "\n" not in message, message
