"""The GPU table, capability classes, preset variants, the budget as the card, and card emulation (CPU)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from fluxtune.errors import ProfileError, UnsupportedHardwareError
from fluxtune.gpus import capability_class, class_allows, find_gpu, gpu_table, match_gpu
from fluxtune.hardware import (
    EMULATE_ENV,
    HardwareInfo,
    activate_emulation,
    card_budget,
    emulated,
    emulation_note,
)
from fluxtune.presets import list_presets, load_profile, preset_for_card
from fluxtune.profile import validate_profile
from fluxtune.tuning import check_hardware

REQUIRED = ["RTX 3060", "RTX 3090", "RTX 4060", "RTX 4060 Ti 16GB", "RTX 4070", "RTX 4070 Ti Super", "RTX 4080",
            "RTX 4090", "RTX 5060 Ti 16GB", "RTX 5070", "RTX 5080", "RTX 5090", "L4", "A10G", "L40S", "A100 40GB",
            "A100 80GB", "H100", "H200"]


def card(name: str, *, nvml_total_fraction: float = 0.995) -> HardwareInfo:
    """A machine with the named card, as detect_hardware would describe it (NVML reports a little less memory)."""
    return HardwareInfo.of_card(find_gpu(name), memory_fraction=nvml_total_fraction, host_ram_bytes=32 * 2**30,
                                cpu_count=8)


def test_table_has_the_cards_people_own_with_sane_figures() -> None:
    names = {s.name for s in gpu_table()}
    assert not set(REQUIRED) - names
    for s in gpu_table():
        assert s.sources, s.name
        assert s.rate("bf16") and s.h2d_gbs > 0 and s.memory_gib >= 8, s.name
        assert (s.rate("fp8") is None) == (s.sm < (8, 9)), s.name  # fp8 tensor cores from Ada on
        assert s.pcie_gen in (3, 4, 5), s.name
    assert find_gpu("RTX 4060").pcie_lanes == 8  # an x8 card: half the host->device rate of an x16 one
    assert find_gpu("RTX 4060").h2d_gbs < find_gpu("RTX 4090").h2d_gbs


def test_find_gpu_accepts_user_spellings_and_names_the_closest_on_a_typo() -> None:
    assert find_gpu("rtx4060").name == "RTX 4060"
    assert find_gpu("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    with pytest.raises(ProfileError, match=r"--gpu='RTX 4606'.*closest: RTX 4060"):
        find_gpu("RTX 4606")
    # Two memory sizes under one NVML name: the detected total picks the row.
    assert match_gpu("NVIDIA GeForce RTX 4060 Ti", int(15.9 * 2**30)).name == "RTX 4060 Ti 16GB"
    assert match_gpu("NVIDIA GeForce RTX 4060 Ti", int(7.9 * 2**30)).name == "RTX 4060 Ti 8GB"
    assert match_gpu("Some Future GPU", 2**34) is None


def test_capability_classes() -> None:
    assert [capability_class(sm) for sm in [(8, 6), (8, 9), (9, 0), (12, 0)]] == ["ampere", "ada", "hopper", "blackwell"]
    assert not class_allows("ampere", "fp8_dynamic", "tensor")
    assert class_allows("ada", "fp8_dynamic", "tensor") and not class_allows("ada", "fp8_dynamic", "row")
    assert not class_allows("blackwell", "fp8_dynamic", "row")  # not assumed: unmeasured here
    assert class_allows("ampere", "int8_dynamic") and class_allows("hopper", "fp8_dynamic", "row")
    with pytest.raises(ProfileError, match="older than Ampere"):
        capability_class((7, 5))


def _tier_cards(preset: str, family: str) -> list[str]:
    return [s.name for s in gpu_table() if preset_for_card(s.memory_gib, family) == preset]


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_validates_for_every_card_of_its_tier(preset: str) -> None:
    profile = load_profile(preset)
    cards = _tier_cards(preset, profile.family)
    assert cards, f"{preset} is no card's preset"
    for name in cards:
        resolved = check_hardware(profile, card(name))  # raises if a knob or the budget does not fit the card
        assert not resolved.variants
        for comp in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            q = resolved.component(comp).quantize
            assert q is None or class_allows(find_gpu(name).capability, q.method, q.granularity), (preset, name)


def test_tiers_follow_the_card_memory() -> None:
    assert preset_for_card(find_gpu("RTX 4060").memory_gib) == "flux-dev-8gb"
    assert preset_for_card(find_gpu("RTX 3060").memory_gib) == "flux-dev-12gb"
    assert preset_for_card(find_gpu("RTX 4060 Ti 16GB").memory_gib) == "flux-dev-12gb"
    assert preset_for_card(find_gpu("RTX 4090").memory_gib) == "flux-dev-24gb"
    assert preset_for_card(find_gpu("RTX 5090").memory_gib) == "flux-dev-fast"
    assert preset_for_card(6) is None


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_measured_whole_process_peak_fits_the_tier_card(preset: str) -> None:
    """What NVML measured for the whole process (context included) is within the budget, so within every
    card of the tier: a card sold as N GB has N GiB > N GB."""
    profile = load_profile(preset)
    for variant, _, resolved in profile.variant_table():
        m = resolved.measured
        if m is None or m.status != "measured" or profile.budget.vram is None:
            continue
        peaks = [m.peak_nvml] + [w.get("peak_nvml") for w in m.workloads]
        for peak in peaks:
            assert peak is not None, f"{preset}/{variant}: a measured block without the NVML peak"
            assert peak <= profile.budget.vram, f"{preset}/{variant}: {peak / 1e9:.2f} GB > {profile.budget.vram / 1e9:g} GB"
        for name in _tier_cards(preset, profile.family):
            assert m.peak_nvml <= find_gpu(name).memory_bytes


def test_a_variant_is_chosen_by_class_and_overrides_go_on_top() -> None:
    p = load_profile("flux-dev-12gb")
    assert p.for_class("hopper").transformer.quantize.granularity == "row"
    ada = p.for_class("ada")
    assert (ada.variant, ada.transformer.quantize.granularity) == ("ada", "tensor")
    assert p.for_class("ampere").transformer.quantize.method == "int8_weight"
    # The caller's override wins over the variant's.
    resolved = check_hardware(load_profile(p.for_class("ada"), ["transformer.quantize=int8_weight"]), card("RTX 4070"))
    assert resolved.transformer.quantize.method == "int8_weight"


def test_bad_variants_fail_when_the_file_is_read() -> None:
    base = {"name": "x", "transformer": {"quantize": "fp8_dynamic"}}
    with pytest.raises(ProfileError, match="class 'ada' is in variants 'a' and 'b'"):
        validate_profile({**base, "variants": [{"name": "a", "classes": ["ada"]}, {"name": "b", "classes": ["ada"]}]})
    with pytest.raises(ProfileError, match=r"variants\[bad\]: transformer.quantize.granularity='diagonal'"):
        validate_profile({**base, "variants": [{"name": "bad", "classes": ["ada"],
                                                "set": {"transformer.quantize.granularity": "diagonal"}}]})
    with pytest.raises(ProfileError, match="classes"):
        validate_profile({**base, "variants": [{"name": "v", "classes": ["pascal"]}]})


def test_a_knob_the_card_cannot_run_is_refused_with_the_fix() -> None:
    row = load_profile("flux-dev-12gb").for_class("hopper")  # fp8 row-wise, as measured on the H200
    with pytest.raises(UnsupportedHardwareError, match=r"granularity=row.*RTX 4070.*SM 8\.9.*granularity=tensor"):
        check_hardware(row, card("RTX 4070"))
    with pytest.raises(UnsupportedHardwareError, match=r"RTX 3060.*int8_dynamic"):
        check_hardware(row.replace(transformer={"quantize": {"method": "fp8_dynamic", "granularity": "tensor"}}),
                       card("RTX 3060"))
    with pytest.raises(UnsupportedHardwareError, match=r"budget.vram=24GB is more than the NVIDIA GeForce RTX 4070"):
        check_hardware("flux-dev-24gb", card("RTX 4070"))


H200 = dataclasses.replace(card("H200"), gpu_name="NVIDIA H200", total_memory_bytes=150754820096)


def test_emulating_a_card_describes_it_and_says_what_is_not_emulated() -> None:
    hw = emulated(H200, "RTX 4060")
    assert (hw.compute_capability, hw.capability, hw.h2d_gbs) == ((8, 9), "ada", 12.6)
    assert hw.total_memory_bytes == 8 * 2**30 and hw.emulated_on == "NVIDIA H200"
    assert card_budget(hw) == 8 * 10**9
    assert hw.fingerprint()["emulated_on"] == "NVIDIA H200"
    note = emulation_note(hw)
    assert note is not None and "EMULATED" in note and "NOT emulated: compute speed" in note
    assert emulation_note(H200) is None
    # The variant for the emulated card's class runs, with its budget.
    assert check_hardware("flux-dev-8gb", hw).variant == "ada"


def test_emulating_a_bigger_or_newer_card_or_on_no_gpu_is_refused() -> None:
    with pytest.raises(UnsupportedHardwareError, match=r"RTX 5090 is SM 12\.0, newer than this NVIDIA H200"):
        emulated(H200, "RTX 5090")
    small = dataclasses.replace(card("RTX 4060"))
    with pytest.raises(UnsupportedHardwareError, match="has 24 GiB, more than"):
        emulated(small, "RTX 4090")
    cpu = dataclasses.replace(H200, gpu_index=None, gpu_name=None, total_memory_bytes=None, compute_capability=None)
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU"):
        emulated(cpu, "RTX 4060")
    with pytest.raises(ProfileError, match=r"--emulate='RTX 4606'.*closest"):
        emulated(H200, "RTX 4606")


def test_activate_emulation_sets_nothing_when_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    with pytest.raises(UnsupportedHardwareError):  # this CPU machine has no GPU to emulate on
        activate_emulation("RTX 4060")
    assert EMULATE_ENV not in os.environ


def test_the_allocator_cap_leaves_room_for_context_workspaces_and_display() -> None:
    from fluxtune.tuning.budget import FIRST_CALL_GROWTH, allocator_cap

    assert allocator_cap(12 * 10**9, 500 * 2**20, None) == 12 * 10**9 - 500 * 2**20 - FIRST_CALL_GROWTH
    assert allocator_cap(12 * 10**9, 0, 10**9) == 11 * 10**9 - FIRST_CALL_GROWTH


def test_expandable_segments_switch_and_report_what_was_there_before() -> None:
    from fluxtune.tuning.budget import set_expandable_segments

    first = set_expandable_segments(True)
    try:
        assert first is not None, "this torch cannot switch expandable segments at run time"
        assert set_expandable_segments(True) is True
        assert set_expandable_segments(False) is True
        assert set_expandable_segments(False) is False
    finally:
        set_expandable_segments(bool(first))


def test_expandable_segments_are_switched_before_weights_are_quantized_or_placed() -> None:
    # Segments keep the kind they were made with: switched after placement, the resident weights and the
    # holes between them stay in fixed segments (the H200 run that this ordering answers).
    from fluxtune.tuning.base import HANDLERS

    order = [h.name for h in HANDLERS]
    assert order.index("allocator") < min(order.index(n) for n in ("precision", "quantize", "layerwise", "offload"))
