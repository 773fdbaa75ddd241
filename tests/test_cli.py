"""The ``fluxtune`` command outside search: help, env, show, presets, generate, errors and --debug."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from fluxtune.cli import COMMANDS, main
from fluxtune.presets import list_presets, load_profile, preset_dir

PRESETS = {"flux-dev-8gb", "flux-dev-12gb", "flux-dev-24gb", "flux-dev-fast", "dit-xl-2-8gb"}


def cli(*argv: object) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def fluxtune_lines(err: str) -> list[str]:
    """fluxtune's own lines on stderr (libraries may log their import-time notices there)."""
    return [line for line in err.strip().splitlines() if line.startswith("fluxtune")]


def test_help_is_instant_and_imports_no_torch(tmp_path):
    probe = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "from fluxtune.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'torchao', 'optuna', 'matplotlib') if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'seconds': time.perf_counter() - t}), file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    info = json.loads(res.stderr.strip().splitlines()[-1])
    assert info["code"] == 0 and info["heavy"] == [], info
    assert info["seconds"] < 5.0, info  # about 0.3 s; generous for a loaded CI machine
    for name in COMMANDS:
        assert name in res.stdout
    # The installed entry point too (python -m fluxtune is the same main).
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fluxtune", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "search" in res.stdout
    assert time.perf_counter() - t0 < 15.0


def test_no_command_prints_help_and_exits_2():
    res = cli()
    assert res.code == 2 and "usage" in res.out


def test_env_on_cpu():
    from fluxtune.hardware import detect_hardware

    res = cli("env")
    assert res.code == 0 and "hardware" in res.out and "versions" in res.out
    assert "torch" in res.out and "offload" in res.out
    res = cli("env", "--json")
    assert res.code == 0
    data = json.loads(res.out)
    assert set(data) == {"hardware", "versions", "knobs"}
    assert data["versions"]["torch"].startswith("2.")
    if not detect_hardware().has_cuda:
        assert data["hardware"]["name"] is None
        assert data["knobs"]["offload (model/sequential/group/partial)"].startswith("no")
        assert data["knobs"]["quantize int8_weight / int8_dynamic"] == "yes"


def test_show_applies_overrides_and_prints_valid_yaml():
    res = cli("show", preset_dir() / "flux-dev-12gb.yaml", "transformer.quantize=int8_weight")
    assert res.code == 0, res.err
    data = yaml.safe_load(res.out)
    assert data["transformer"]["quantize"]["method"] == "int8_weight"
    prof = load_profile(data)  # what show prints loads back as the same profile
    assert prof.transformer.quantize is not None and prof.transformer.quantize.method == "int8_weight"
    assert prof.name == "flux-dev-12gb"
    # By preset name as well, and --minimal prints only what differs from the defaults.
    minimal = cli("show", "flux-dev-12gb", "--minimal")
    assert minimal.code == 0 and len(minimal.out) < len(res.out)
    assert load_profile(yaml.safe_load(minimal.out)) == load_profile("flux-dev-12gb")


@pytest.mark.parametrize(("override", "needle"), [
    ("transformer.quantize=int9", "int9"),
    ("transformer.nosuch=1", "nosuch"),
    ("generation.height=100", "multiple of 16"),
    ("noequals", "noequals"),
])
def test_show_with_a_bad_override_is_one_line_and_exit_2(override, needle):
    res = cli("show", "flux-dev-12gb", override)
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("fluxtune show: error:"), lines
    assert res.out == ""


def test_show_an_unknown_profile_names_the_presets():
    res = cli("show", "no-such-profile")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "flux-dev-12gb" in lines[0]


def test_presets_lists_the_shipped_profiles():
    assert set(list_presets()) == PRESETS
    res = cli("presets", "--json")
    assert res.code == 0
    rows = json.loads(res.out)
    assert {r["name"] for r in rows} == PRESETS
    assert [r["budget"] for r in rows] == ["8GB", "8GB", "12GB", "24GB", "none"]  # sorted by budget, uncapped last
    table = cli("presets")
    assert table.code == 0 and all(name in table.out for name in PRESETS)


@pytest.fixture
def small_profile(tmp_path):
    path = tmp_path / "cpu-small.yaml"
    path.write_text("name: cpu-small\nfamily: flux\ngeneration:\n  steps: 2\n")
    return path


def test_generate_writes_a_png_and_prints_latency(tmp_path, small_profile, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x.png"
    res = cli("generate", small_profile, "--model", "tiny-flux", "--prompt", "a red circle", "--out", out)
    assert res.code == 0, res.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 64)
    assert "applied profile 'cpu-small'" in res.out
    import re

    assert re.search(r"1 image\(s\) in [0-9.]+s", res.out), res.out


def test_generate_with_overrides_and_several_prompts(tmp_path, small_profile):
    out = tmp_path / "many.png"
    res = cli("generate", small_profile, "transformer.quantize=int8_weight", "--model", "tiny-flux",
              "--prompt", "a red circle", "--prompt", "a blue square", "--out", out)
    assert res.code == 0, res.err
    assert "quantize" in res.out and "int8_weight" in res.out
    assert (tmp_path / "many_0.png").exists() and (tmp_path / "many_1.png").exists()


@pytest.mark.parametrize(("preset", "field"), [
    ("flux-dev-12gb", "transformer.offload.mode=partial"),
    ("flux-dev-24gb", "transformer.quantize.method=fp8_dynamic"),
])
def test_generate_a_gpu_only_profile_on_cpu_is_one_line_exit_2(tmp_path, preset, field):
    from fluxtune.hardware import detect_hardware

    if detect_hardware().has_cuda:
        pytest.skip("this machine has a GPU")
    res = cli("generate", preset, "--model", "tiny-flux", "--out", tmp_path / "y.png")
    assert res.code == 2
    lines = fluxtune_lines(res.err)
    assert len(lines) == 1 and lines[0].startswith("fluxtune generate: error:") and field in lines[0], res.err
    assert "needs a CUDA GPU" in lines[0] and "Traceback" not in res.err
    assert not (tmp_path / "y.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    from fluxtune.hardware import detect_hardware

    if detect_hardware().has_cuda:
        pytest.skip("this machine has a GPU")
    res = subprocess.run([sys.executable, "-m", "fluxtune", "--debug", "generate", "flux-dev-12gb", "--model",
                          "tiny-flux", "--out", str(tmp_path / "y.png")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "UnsupportedHardwareError" in res.stderr and "transformer.offload.mode=partial" in res.stderr
    # Without --debug, the same failure is one line.
    res = cli("show", "flux-dev-12gb", "transformer.quantize=int9")
    assert "Traceback" not in res.err
    with pytest.raises(Exception, match="int9"):
        main(["--debug", "show", "flux-dev-12gb", "transformer.quantize=int9"])
