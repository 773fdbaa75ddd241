"""YAML in and out, dotted overrides, safe loading, and the shipped presets."""

from __future__ import annotations

import pytest

from fluxtune.errors import ProfileError
from fluxtune.presets import apply_overrides, list_presets, load_profile, save_profile, to_yaml


def test_yaml_round_trip(tmp_path):
    p = load_profile({"name": "rt", "budget": {"vram": "12GB"}, "transformer": {"quantize": "int8_weight"},
                      "cache": {"kind": "taylorseer", "cache_interval": 4}})
    path = save_profile(p, tmp_path / "rt.yaml")
    assert load_profile(path) == p
    assert "12GB" in path.read_text()


def test_dotted_overrides():
    p = load_profile({}, ["transformer.quantize=int8_weight", "budget.vram=12GB", "cache=first_block",
                          "cache.threshold=0.12", "generation.steps=20", "transformer.offload.mode=group",
                          "transformer.offload.level=block", "vae.tiling=true"])
    assert p.transformer.quantize.method == "int8_weight"  # type: ignore[union-attr]
    assert p.cache.threshold == 0.12  # type: ignore[union-attr]
    assert p.generation.steps == 20 and p.vae.tiling
    assert p.transformer.offload.level == "block"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["transformer.quantize", "=3", "generation.steps=0", "nope.key=1"])
def test_bad_overrides(bad):
    with pytest.raises(ProfileError):
        load_profile({}, [bad])


def test_overrides_do_not_mutate_input():
    data = {"generation": {"steps": 28}}
    apply_overrides(data, ["generation.steps=4"])
    assert data["generation"]["steps"] == 28


def test_no_code_runs_on_load(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned > /tmp/fluxtune_pwned']\n")
    with pytest.raises(ProfileError, match="not a plain YAML profile"):
        load_profile(evil)
    interp = tmp_path / "interp.yaml"
    interp.write_text("name: ${oc.env:HOME}\n")
    with pytest.raises(ProfileError, match="interpolations are not allowed"):
        load_profile(interp)


def test_missing_file_names_presets():
    with pytest.raises(ProfileError, match="neither a file nor a preset"):
        load_profile("no-such-profile")


def test_shipped_presets_validate():
    presets = list_presets()
    assert {"flux-dev-8gb", "flux-dev-12gb", "flux-dev-24gb", "flux-dev-fast"} <= set(presets)
    budgets = {}
    for name, path in presets.items():
        p = load_profile(path)
        assert p.name == name
        # Measured for at least one GPU class (the tier presets for the cards of their tier, under emulation).
        assert any(r.measured is not None for _, _, r in p.variant_table()), name
        budgets[name] = p.budget.vram if p.budget.enforce else None
        assert to_yaml(p)
    # Every tier carries (and enforces) its card's budget; the fast preset is for 32 GB and larger cards.
    assert budgets["flux-dev-8gb"] == 8 * 10**9 and budgets["flux-dev-12gb"] == 12 * 10**9
    assert budgets["flux-dev-24gb"] == 24 * 10**9 and budgets["flux-dev-fast"] == 32 * 10**9
