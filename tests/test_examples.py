"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_apply_profile_example(tmp_path):
    out = tmp_path / "x.png"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "apply_profile.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.exists() and out.stat().st_size > 0
    assert "int8_weight" in res.stdout
    # A real picture: flux-mini at its native 64x64 and 96 tokens draws what the prompt asks for.
    assert "(64x64)" in res.stdout and "max_sequence_length=96" in res.stdout
    import re

    m = re.search(r"prompt adherence .*: ([0-9.]+)", res.stdout)
    assert m and float(m.group(1)) > 0.6, res.stdout[-1000:]


def test_search_from_python_example(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "search_from_python.py"), "--trials", "3",
                          "--home", str(tmp_path / "ft")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "measured:" in res.stdout and "applied profile 'example-best'" in res.stdout
