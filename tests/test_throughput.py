"""The DiT search dimensions: batch size with the throughput objective, and the number of the most
quantization-sensitive layer groups kept unquantized (from a sensitivity scan)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial

from fluxtune.cli import main
from fluxtune.errors import ProfileError
from fluxtune.hardware import detect_hardware
from fluxtune.measure import Measurement
from fluxtune.presets import load_profile
from fluxtune.search import objective as obj
from fluxtune.search.space import SearchSpace
from fluxtune.search.study import directions
from fluxtune.worker import RunOutcome, Status

CPU = replace(detect_hardware(), gpu_index=None, gpu_name=None, total_memory_bytes=None, compute_capability=None)


def _outcome(result: dict) -> RunOutcome:
    """A worker's answer, as the tests below write it."""
    return RunOutcome(Status(result["status"]), measurement=Measurement.from_dict(result.get("measurement") or {}),
                      quality=result.get("quality"))


def score(goal: obj.Goal, result: dict) -> obj.Score:
    return obj.score(goal, _outcome(result))


def _space(narrow: dict | None = None, sensitivity: dict | None = None, batch: int = 2) -> SearchSpace:
    base = load_profile({"family": "dit", "generation": {"steps": 4, "images_per_prompt": batch}})
    return SearchSpace.create(CPU, "dit", base, narrow, sensitivity=sensitivity)


def _params(**extra: object) -> dict:
    return {"steps": 4, "size": "default", "transformer.quantize": "int8_weight", "transformer.offload": "none",
            "vae.tiling": False, "cache": "none", "attention": "native", "compile": "off", **extra}


def test_keep_sensitive_excludes_the_most_sensitive_groups_of_that_method():
    ranked = {"int8_weight": ["final", "blocks.0.attn", "blocks.3.mlp"]}
    space = _space(sensitivity=ranked)
    dims = {d.name: d for d in space.dims}
    assert dims["transformer.keep_sensitive"].choices == (0, 1, 2)  # no more than the scan ranks
    prof = space.suggest(FixedTrial(_params(**{"transformer.keep_sensitive": 2})))
    assert prof.transformer.quantize is not None and prof.transformer.quantize.exclude == ("final", "blocks.0.attn")
    # Only asked where the method has a ranking: int8_dynamic has none here, and no quantization needs none.
    for q in ("int8_dynamic", "none"):
        extra = {"transformer.layerwise_fp8": False} if q == "none" else {}
        prof = space.suggest(FixedTrial(_params(**{"transformer.quantize": q, **extra})))
        assert prof.transformer.quantize is None or prof.transformer.quantize.exclude == ()
    with pytest.raises(ProfileError, match="ranks only 3 groups"):
        space.profile(_params(**{"transformer.keep_sensitive": 8}))
    # Without a scan the dimension is never asked.
    assert "transformer.keep_sensitive" not in _space().suggest(FixedTrial(_params())).model_dump_json()


def test_batch_dimension_is_asked_only_when_narrowed_and_checked():
    plain = _space()
    study = optuna.create_study()
    plain.suggest(study.ask())
    assert "batch" not in study.trials[0].params
    space = _space({"batch": [2, 8, 32]})
    assert space.profile(_params(batch=8)).generation.images_per_prompt == 8
    for bad in (0, "four", [2, -1]):
        with pytest.raises(ProfileError, match="batch="):
            _space({"batch": bad})


def test_throughput_objective_maximises_images_per_second():
    goal = obj.Goal("throughput", budget_bytes=None, on_gpu=False)
    fast_small = score(goal, {"status": "ok", "measurement": {"latency_s": 1.0, "images_per_call": 2}})
    slow_big = score(goal, {"status": "ok", "measurement": {"latency_s": 2.0, "images_per_call": 8}})
    assert fast_small.values == [2.0] and slow_big.values == [4.0] and slow_big.throughput == 4.0
    oom = score(goal, {"status": "oom", "measurement": {"latency_s": None, "images_per_call": 64}})
    assert oom.values == [0.0]
    assert directions("throughput") == ["maximize"]


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def test_throughput_search_with_sensitivity_scan_on_tiny_dit(tmp_path: Path):
    home = tmp_path / "ft"
    code, out = cli("search", "--model", "tiny-dit", "--steps", "2", "--objective", "throughput", "--trials", "5",
                    "--pin", "batch=[2,4]", "--pin", "transformer.quantize=[int8_weight]", "--pin", "cache=none",
                    "--pin", "transformer.keep_sensitive=[2]",
                    "--min-psnr", "0", "--runs", "1", "--home", home, "--seed", "1")
    assert code == 0, out
    folder = home / "tiny-dit-nobudget-throughput"
    # Scanned when the first trial kept sensitive layers, then used: every quantized trial keeps 2 groups.
    assert "sensitivity: a trial keeps int8_weight's most sensitive layers" in out
    assert all("t.keep_sensitive=2" in r["config"] for r in json.loads((folder / "trials.json").read_text()))
    assert len(load_profile(folder / "best.yaml").transformer.quantize.exclude) == 2
    scan = json.loads((folder / "sensitivity-int8_weight.json").read_text())
    assert scan["groups"] and scan["method"] == "int8_weight"
    rows = json.loads((folder / "trials.json").read_text())
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["throughput"] == pytest.approx(r["images_per_call"] / r["latency_s"]) for r in ok)
    assert {r["images_per_call"] for r in ok} <= {2, 4}
    # Every trial's quality is judged on the reference's own workload, whatever its batch.
    assert all(r["psnr"] is not None for r in ok)
    best = load_profile(folder / "best.yaml")
    # The written profile is the finalist the interleaved re-timing ranked first: one of the 3 best trials,
    # with its own trial's throughput in its measured block.
    assert best.measured is not None and best.measured.trial is not None
    chosen = next(r for r in ok if r["trial"] == best.measured.trial)
    assert best.measured.throughput == pytest.approx(chosen["throughput"])
    distinct = [r for r in ok if r.get("duplicate_of") is None]  # a repeat returns its original's result
    assert chosen["throughput"] >= sorted((r["throughput"] for r in distinct), reverse=True)[:3][-1]
    assert "images/s at batch" in out
    # A scan already in the study folder is reused on resume, not redone.
    stamp = (folder / "sensitivity-int8_weight.json").stat().st_mtime_ns
    code, _ = cli("search", "--model", "tiny-dit", "--steps", "2", "--objective", "throughput", "--trials", "6",
                  "--pin", "batch=[2,4]", "--pin", "transformer.quantize=[int8_weight]", "--pin", "cache=none",
                  "--pin", "transformer.keep_sensitive=[2]",
                  "--min-psnr", "0", "--runs", "1", "--home", home, "--seed", "1")
    assert code == 0 and (folder / "sensitivity-int8_weight.json").stat().st_mtime_ns == stamp


def test_no_scan_until_a_trial_keeps_sensitive_layers(tmp_path: Path):
    """The DiT default --sensitivity auto scans lazily: trials that quantize every layer need no ranking."""
    home = tmp_path / "ft"
    code, out = cli("search", "--model", "tiny-dit", "--steps", "2", "--objective", "throughput", "--trials", "3",
                    "--pin", "batch=[2]", "--pin", "transformer.quantize=[int8_weight]", "--pin", "cache=none",
                    "--pin", "transformer.keep_sensitive=[0]", "--retime", "0", "--min-psnr", "0", "--runs", "1",
                    "--no-prune", "--home", home)
    assert code == 0, out
    assert "sensitivity:" not in out
    assert not list((home / "tiny-dit-nobudget-throughput").glob("sensitivity-*.json"))


def test_a_prompted_search_scans_with_its_prompts(tmp_path: Path):
    """--sensitivity auto on FLUX: the worker scans with the study's prompts and size, not class labels."""
    home = tmp_path / "ft"
    code, out = cli("search", "--model", "tiny-flux", "--sensitivity", "auto", "--trials", "2", "--runs", "1",
                    "--pin", "transformer.quantize=[int8_weight]", "--pin", "cache=none", "--retime", "0",
                    "--pin", "transformer.keep_sensitive=[1]", "--prompt", "a red circle", "--no-prune", "--home", home)
    assert code == 0, out
    scan = json.loads((home / "tiny-flux-nobudget-latency" / "sensitivity-int8_weight.json").read_text())
    assert scan["prompts"] == ["a red circle"] and scan["class_labels"] == [] and scan["groups"]
