"""What a non-editable install ships: the presets as package data, and the version."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_presets_and_reads_them_installed(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.append("--no-build-isolation")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("fluxtune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))
    assert sources and all(f"fluxtune/profiles/{n}" in names for n in sources), sorted(names)[:20]
    assert "fluxtune/data/gpus.yaml" in names  # the GPU table: env, predict, --emulate and the presets need it
    # Installed (unpacked) away from the repository, list_presets finds them in the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import fluxtune, json; from fluxtune.presets import list_presets, preset_dir; "
             "print(json.dumps([str(preset_dir()), sorted(list_presets()), fluxtune.__file__]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    folder, presets, module = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert module.startswith(str(site)) and folder == str(site / "fluxtune" / "profiles")
    assert presets == [n.removesuffix(".yaml") for n in sources]


def test_version_flag(capsys):
    import fluxtune
    from fluxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fluxtune {fluxtune.__version__}"
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        assert version("fluxtune") == fluxtune.__version__
