"""tiling: regional denoising (issue 20): FLUX's latent denoised tile by tile, predictions blended."""

from __future__ import annotations

import pytest
import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.errors import FluxtuneError, ProfileError
from fluxtune.profile import validate_profile
from fluxtune.tuning.regional import HOOK, ramp, tile_starts
from tests.conftest import gen


def test_tiles_cover_the_latent_with_equal_tiles_and_ramped_overlaps():
    assert tile_starts(8, 8, 2) == [0]
    assert tile_starts(16, 8, 2) == [0, 4, 8]  # spread evenly, the last ending at the edge: one shape for all
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(12, 8, 0) == [0, 4]
    w = ramp(8, 2, first=False, last=True)
    assert w.tolist()[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and w[-1] == 1.0
    assert ramp(8, 2, first=True, last=True).eq(1).all()


def _draw(pipe, size=128, steps=3):
    return pipe("a red circle", height=size, width=size, num_inference_steps=steps, generator=gen(0),
                output_type="pt").images


def test_regional_denoising_runs_tile_by_tile_and_undoes_cleanly(tiny_flux):
    whole = _draw(tiny_flux)
    report = fluxtune.apply({"tiling": {"mode": "regional", "tile": 64, "overlap": 16}}, tiny_flux)
    assert "regional denoising: 64px tiles overlapping by 16px" in str(report)
    hook = tiny_flux.transformer._diffusers_hook.get_hook(HOOK)
    tiled = _draw(tiny_flux)
    # 128 px = 8 tokens a side, 4-token tiles overlapping by at least 1: starts 0, 2, 4 -> 3 x 3 tiles, 3 steps.
    assert hook.calls == 9 * 3
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    small = _draw(tiny_flux, size=64)  # one tile covers it: the whole-image forward, untouched
    assert hook.calls == 27
    from fluxtune.tuning import reset

    reset(tiny_flux)
    assert torch.equal(_draw(tiny_flux), whole)
    assert small.shape[-1] == 64


def test_a_tile_as_large_as_the_image_changes_nothing(tiny_flux):
    whole = _draw(tiny_flux)
    fluxtune.apply({"tiling": {"mode": "regional", "tile": 128, "overlap": 16}}, tiny_flux)
    assert torch.equal(_draw(tiny_flux), whole)


@pytest.mark.parametrize("tiling,needle", [
    ({"mode": "regional", "tile": 100}, "tiling.tile=100: use a multiple of 16"),
    ({"mode": "regional", "tile": 64, "overlap": 32}, "tiling.overlap=32: use less than half the tile"),
])
def test_bad_tiles_are_one_line(tiling, needle):
    with pytest.raises(ProfileError, match=needle.replace(".", r"\.")):
        validate_profile({"tiling": tiling}, source="t")


def test_regional_is_refused_where_it_cannot_work(tiny_flux):
    with pytest.raises(FluxtuneError, match="cache.kind=first_block"):
        fluxtune.apply({"tiling": {"mode": "regional", "tile": 64, "overlap": 16}, "cache": {"kind": "first_block"}}, tiny_flux)
    dit = pipelines.load("tiny-dit")
    with pytest.raises(FluxtuneError, match="this is a dit pipeline"):
        fluxtune.apply({"tiling": {"mode": "regional", "tile": 64, "overlap": 16}}, dit)


def test_the_memory_model_sizes_activations_by_the_tile():
    from fluxtune.memory import ModelFacts, predict

    facts = ModelFacts.for_builtin("flux-dev-replica")

    def acts(tiling):
        prof = validate_profile({"family": "flux", "generation": {"height": 2048, "width": 2048}, "tiling": tiling},
                                source="t")
        return predict(prof, facts).activations

    whole, tiled = acts({"mode": "none"}), acts({"mode": "regional", "tile": 1024, "overlap": 128})
    assert tiled < 0.5 * whole


def test_the_search_tunes_tiles_only_for_large_images():
    from optuna.trial import FixedTrial

    from fluxtune.hardware import HardwareInfo
    from fluxtune.presets import load_profile
    from fluxtune.search.space import SearchSpace

    hw = HardwareInfo(gpu_index=0, gpu_name="test GPU", total_memory_bytes=int(80e9), compute_capability=(9, 0),
                      driver="570", cuda_version="12.8", torch_version="2.13.0", host_ram_bytes=int(64e9), cpu_count=8)
    base = load_profile({"name": "base", "family": "flux", "generation": {"steps": 28}})
    small = SearchSpace.create(hw, "flux", base, None)
    assert not any(d.when({"cache": "none"}) for d in small.dims if d.name == "tiling")
    large = SearchSpace.create(hw, "flux", base, {"size": ["2048x2048"]})
    params = {d.name: d.choices[0] if d.choices else d.low for d in large.dims}
    params.update({"size": "2048x2048", "tiling": "regional", "tiling.tile": 1024, "tiling.overlap": 128,
                   "cache": "none", "transformer.offload": "none", "compile": "off"})
    prof = large.suggest(FixedTrial(params))
    assert prof.tiling.mode == "regional" and prof.tiling.tile == 1024 and prof.generation.height == 2048


def test_seam_ratio_sees_a_hard_seam():
    from fluxtune.measure.quality import seam_ratio
    from fluxtune.tuning.regional import seam_lines

    assert seam_lines(128, 64, 16) == [32, 64, 96]  # tiles start at 0, 32, 64 px: where their ramps begin and end
    smooth = torch.linspace(0, 1, 128).repeat(1, 3, 128, 1)
    seam = smooth.clone()
    seam[..., 64:] += 0.3
    assert seam_ratio(smooth, [64]) == pytest.approx(1.0, abs=0.05)
    assert seam_ratio(seam.clamp(0, 1), [64]) > 3
