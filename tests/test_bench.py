"""fluxtune bench on CPU: each candidate in its own process, the reference first, the table and JSON."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from fluxtune.cli import main


def test_bench_runs_profiles_against_the_reference(tmp_path: Path) -> None:
    prof = tmp_path / "int8.yaml"
    prof.write_text("name: int8\ntransformer:\n  quantize: int8_weight\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["bench", str(prof), "--model", "tiny-flux", "--steps", "2", "--runs", "3",
                     "--out", str(tmp_path / "b")])
    assert code == 0, out.getvalue()
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())}
    assert set(rows) == {"reference (bf16, no cap)", "int8"}
    ref, int8 = rows["reference (bf16, no cap)"], rows["int8"]
    assert ref["status"] == int8["status"] == "ok"
    # one warm-up and three timed calls, back to back; quantization time reported apart from apply
    assert int8["generations"] == 4 and 0 < int8["quantize_s"] <= int8["apply_s"]
    assert int8["psnr"] is not None and int8["psnr"] < 100 and int8["latency_spread"] is not None
    assert (tmp_path / "b" / "bench.png").exists() and "generations" in out.getvalue()


def test_bench_samples_give_a_distribution_shift_on_dit(tmp_path: Path) -> None:
    prof = tmp_path / "int8.yaml"
    prof.write_text("name: int8\nfamily: dit\ntransformer:\n  quantize: int8_weight\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["bench", str(prof), "--model", "tiny-dit", "--steps", "2", "--runs", "1", "--samples", "12",
                     "--out", str(tmp_path / "b")])
    assert code == 0, out.getvalue()
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())}
    assert rows["reference (bf16, no cap)"]["fd"] is None  # the reference is what the others are compared with
    assert rows["int8"]["fd"] is not None and rows["int8"]["fd"] >= 0 and rows["int8"]["kid"] is not None
    assert "KID" in out.getvalue()
    # A text-to-image model has no class-conditional samples: one line, exit 2.
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["bench", str(prof), "--model", "tiny-flux", "--samples", "8"])
    assert code == 2 and "--samples 8" in err.getvalue()
