"""The Profile schema: validation messages, sizes, shorthands, round trips; no torch import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fluxtune.errors import ProfileError
from fluxtune.profile import Profile, validate_profile
from fluxtune.units import format_bytes, parse_bytes, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12GB", 12 * 10**9), ("11.5GiB", int(11.5 * 2**30)), ("800MB", 800 * 10**6), (1234, 1234), ("2g", 2 * 2**30)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["12XB", "-1GB", "0GB", "", "GB", True, "1.2.3GB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        parse_bytes(bad)


@pytest.mark.parametrize(("text", "expected"), [("30m", 1800), ("90", 90), ("1.5h", 5400), ("7m40s", 460),
                                              ("1h30m", 5400), ("1h5m30s", 3930)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "m", "7s40m", "1h1h", "ten minutes", "-5m"])
def test_parse_duration_rejects_in_one_line_naming_the_field(bad):
    with pytest.raises(ProfileError, match=r"--timeout .* is not a duration; use e.g. 30m"):
        parse_duration(bad)


def test_format_round_trips_exact_sizes():
    assert format_bytes(12 * 10**9) == "12GB"
    p = validate_profile({"budget": {"vram": "12GB"}})
    assert p.to_dict()["budget"]["vram"] == "12GB"
    q = validate_profile({"budget": {"vram": "11.5GiB"}})
    assert validate_profile(q.to_dict()).budget.vram == q.budget.vram


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"budget": {"vram": "12XB"}}, "budget.vram='12XB'"),
        ({"budget": {"vram": "-1GB"}}, "budget.vram='-1GB'"),
        ({"transformr": {}}, "unknown key 'transformr'"),
        ({"transformer": {"quantize": "int9"}}, "transformer.quantize.method='int9'"),
        ({"generation": {"steps": 0}}, "generation.steps=0"),
        ({"generation": {"steps": "many"}}, "generation.steps='many'"),
        ({"generation": {"height": 1000}}, "use 992 or 1008"),
        ({"transformer": {"offload": "teleport"}}, "transformer.offload"),
        ({"cache": {"kind": "first_block", "threshold": 2}}, "cache.threshold=2"),
        ({"compile": {"mode": "regional", "fullgraph": True}, "cache": "first_block"}, "compile.fullgraph"),
        ({"vae": {"offload": {"mode": "partial", "resident_blocks": 2}}}, "vae.offload.mode=partial"),
        ({"transformer": {"offload": "model"}, "text_encoder_2": {"offload": {"mode": "group"}}}, "do not combine"),
        ({"transformer": {"quantize": "int8_weight", "layerwise_casting": {}}}, "do not combine"),
        ({"transformer": {"offload": {"mode": "partial"}}}, "exactly one of resident"),
        ({"schema_version": 2}, "schema_version=2"),
        ({"vae": {"tile_size": 512}}, "tiling is false"),
    ],
)
def test_bad_input_gives_one_line(data, needle):
    with pytest.raises(ProfileError) as info:
        validate_profile(data)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_shorthands_expand():
    p = validate_profile({"transformer": {"quantize": "fp8_dynamic", "offload": "model"}, "cache": "first_block"})
    assert p.transformer.quantize is not None and p.transformer.quantize.method == "fp8_dynamic"
    assert p.transformer.offload.mode == "model"
    assert p.cache.kind == "first_block" and p.cache.threshold == 0.08  # type: ignore[union-attr]


def test_profile_is_frozen_and_round_trips():
    p = validate_profile({"name": "x", "transformer": {"offload": {"mode": "partial", "resident": "7GB"}}})
    with pytest.raises(ValueError):  # pydantic's ValidationError for a frozen model
        p.name = "y"  # type: ignore[misc]
    assert validate_profile(p.to_dict()) == p
    assert validate_profile(p.to_dict(exclude_defaults=True)) == p


def test_hardware_requirements():
    p = validate_profile({"transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"}}})
    assert p.min_compute_capability() == ((9, 0), "transformer.quantize.method=fp8_dynamic")
    q = validate_profile({"transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "tensor"}}})
    assert q.min_compute_capability()[0] == (8, 9)  # type: ignore[index]
    assert Profile().needs_gpu() is None
    assert validate_profile({"text_encoder_2": {"offload": "model"}}).needs_gpu() == "text_encoder_2.offload.mode=model"


def test_loading_profiles_does_not_import_torch(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("budget:\n  vram: 12GB\ntransformer:\n  quantize: int8_weight\n")
    code = (
        "import sys; from fluxtune.presets import load_profile; "
        f"p = load_profile({str(f)!r}); assert 'torch' not in sys.modules, 'torch imported'; print(p.budget.vram)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(12 * 10**9)


def test_minimal_dump_keeps_a_changed_tag():
    """A section whose only change is its tag (compile.mode=regional) must survive --minimal."""
    p = validate_profile({"compile": {"mode": "regional"}, "cache": {"kind": "first_block"}})
    d = p.to_dict(exclude_defaults=True)
    assert d["compile"] == {"mode": "regional"} and d["cache"] == {"kind": "first_block"}
    assert validate_profile(d) == p
