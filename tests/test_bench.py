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
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
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
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert rows["reference (bf16, no cap)"]["fd"] is None  # the reference is what the others are compared with
    assert rows["int8"]["fd"] is not None and rows["int8"]["fd"] >= 0 and rows["int8"]["kid"] is not None
    assert "KID" in out.getvalue()
    # A text-to-image model has no class-conditional samples: one line, exit 2.
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["bench", str(prof), "--model", "tiny-flux", "--samples", "8"])
    assert code == 2 and "--samples 8" in err.getvalue()


def test_bench_several_budgets_climbs_caps_skips_certain_misfits_and_resumes(tmp_path: Path) -> None:
    prof = tmp_path / "int8.yaml"
    prof.write_text("name: int8\nbudget: {vram: 12GB, enforce: true}\ntransformer:\n  quantize: int8_weight\n")
    args = ["bench", str(prof), "--baselines", "--recipes", "bf16", "--budget", "100KB,12GB,none", "--model",
            "tiny-flux", "--steps", "2", "--runs", "2", "--recipe-runs", "1", "--recipe-warmup-steps", "1",
            "--out", str(tmp_path / "b"), "--write-measured"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(args)
    assert code == 0, out.getvalue()
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = [(r["name"], r["cap"], r["status"]) for r in data["rows"]]
    # The reference, the profile under its own budget, then the bf16 recipe: its weights alone exceed 100 kB
    # (not run), so it climbs to 12 GB and runs there (the reference already is bf16 without a cap).
    assert rows == [("reference (bf16, no cap)", None, "ok"), ("int8", 12 * 10**9, "ok"),
                    ("bf16", 10**5, "no_fit"), ("bf16", 12 * 10**9, "ok")]
    assert "weights alone need" in data["rows"][2]["error"]
    ref, bf16 = data["rows"][0], data["rows"][3]
    assert ref["warmup_steps"] == 1 and ref["runs"] == 1 and data["rows"][1]["runs"] == 2
    (s,) = data["summary"]
    assert s["profile"] == "int8" and s["recipe"] == "bf16" and s["speedup"] == bf16["latency_s"] / s["latency_s"]
    assert (tmp_path / "b" / "bench.md").read_text().count("| bf16 |") == 3  # two rows, and the summary
    # --write-measured put the profile's row into its YAML, next to the recipe it was compared with.
    from fluxtune.presets import load_profile

    measured = load_profile(prof).measured
    assert measured is not None and measured.source == "fluxtune bench" and measured.model == "tiny-flux"
    assert measured.latency_s == round(s["latency_s"], 3) and "bf16 at" in (measured.notes or "")
    # The host peak of the candidate's own worker: at least the model it loaded and the interpreter.
    assert measured.peak_host_rss is not None and measured.peak_host_rss > 100e6
    assert load_profile(prof).transformer.quantize is not None  # the rest of the file is kept
    # Re-running the same command measures nothing again; a changed workload starts over.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    assert out.getvalue().count("kept from the previous run") == 4 and " ...\n" not in out.getvalue()
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["rows"] == data["rows"]
    # Another profile in the same folder: the old profile's row is no longer this bench's, so it is kept as an
    # earlier row, out of the rows and the summary (which then say what this bench printed).
    prof.write_text(prof.read_text().replace("name: int8", "name: int8-b"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    again = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["name"] for r in again["earlier_rows"]] == ["int8"]
    assert "int8" not in {r["name"] for r in again["rows"]} and [s["profile"] for s in again["summary"]] == ["int8-b"]
    # Rows measured on another GPU (or under another card's emulation) are not resumed as this bench's, nor
    # overwritten: one line, exit 2, the file untouched; --fresh replaces them.
    assert again["meta"]["machine"]["gpu"] == "cpu" and again["meta"]["machine"]["torch"]
    again["meta"]["machine"]["gpu"] = "NVIDIA H200"
    (tmp_path / "b" / "bench.json").write_text(json.dumps(again))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(args) == 2
    assert "holds rows of another bench (machine:" in err.getvalue() and "--fresh" in err.getvalue()
    assert json.loads((tmp_path / "b" / "bench.json").read_text()) == again


def test_bench_rejects_a_profile_budget_outside_the_list_in_one_line(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("name: p\nbudget: {vram: 16GB, enforce: true}\n")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["bench", str(prof), "--budget", "8GB,12GB", "--model", "tiny-flux"])
    assert code == 2 and "budget.vram=16GB is not in --budget 8GB,12GB" in err.getvalue()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()):
        code = main(["bench", str(prof), "--budget", "8GB,lots", "--model", "tiny-flux"])
    assert code == 2 and "'none' for no cap" in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1


def test_a_candidate_whose_host_copies_exceed_the_host_is_not_run() -> None:
    """FLUX.2 [dev] offloaded in bf16 needs ~112 GB of the H200 host's 128 GB: a worker would load for
    minutes and be killed by the OS. The bench says so in its row instead (as for weights over the cap)."""
    from fluxtune.bench import _cannot_fit
    from fluxtune.memory.facts import ModelFacts
    from fluxtune.presets import load_profile

    facts = ModelFacts.for_builtin("tiny-flux")
    plain = load_profile({"name": "plain"})
    assert _cannot_fit(plain, None, facts, 10**12) is None
    why = _cannot_fit(plain, None, facts, 10**6)
    assert why is not None and "of host memory" in why and why.endswith("not run")
    own = load_profile({"name": "own", "budget": {"host_ram": "1MB"}})  # a profile's own host budget wins
    assert _cannot_fit(own, None, facts, 10**12) is not None
    assert _cannot_fit(plain, None, None, 10**6) is None  # no facts yet (before the first worker): run it


def test_a_candidate_that_times_out_keeps_what_it_had_measured(tmp_path: Path) -> None:
    """On an H200 two candidates of 4.5 and 9 minutes came back as "timed out", peak 0 B, and nothing else.
    Now the row says where the worker was and keeps its finished runs (its worker here never starts its
    third timed call, as a call far slower than the others would not end); it still runs again on resume."""
    from fluxtune.bench import make_candidates, run_bench
    from fluxtune.presets import load_profile

    generation = {"steps": 1, "height": 64, "width": 64}
    cands = make_candidates([load_profile({"name": "slow", "generation": generation})], "flux", None, False,
                            generation, reference=False)
    lines: list[str] = []
    wl = {"prompts": ["a fox"], "steps": 1, "height": 64, "width": 64, "runs": 4, "warmup": 1}
    # The limit covers the worker's start too; the run itself always gets at least a second, ample for a
    # tiny model's apply, warm-up and two calls.
    (row,) = run_bench(cands, model="tiny-flux", device="cpu", workload=wl, folder=tmp_path / "b", dtype="float32",
                       timeout_s=3.0, say=lines.append, session="crashing:HangsAfterRun2")
    assert row.status == "timeout" and row.error is not None
    assert row.error.startswith("worker on cpu timed out ") and " s into run 3 of 4 (2 finished: " in row.error
    runs = row.extra["partial_latency_runs"]
    assert len(runs) == 2 and all(0 < s < 3 for s in runs) and row.latency_s is None
    assert row.extra["progress"]["stage"] == "run" and row.extra["progress"]["runs_total"] == 4
    assert row.first_call_s is not None and row.apply_s is not None and row.extra["host_ram_peak"]
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert saved["extra"]["partial_latency_runs"] == runs and saved["error"] == row.error
    # A profile candidate is not silent while it runs: apply, the warm-up and each timed call as they end.
    said = "\n".join(lines)
    assert "    apply: " in said and "    warm-up 1/1: " in said and "    run 2/4: " in said
    assert "run 3/4:" not in said and row.error in said


def test_bench_reference_renders_the_profiles_true_cfg(tmp_path: Path) -> None:
    """A profile with a negative prompt runs two transformer passes a step: the reference (and the recipes)
    must render the same call, or the quality column compares different images and the speedup is 2x off."""
    plain = tmp_path / "q.yaml"
    plain.write_text("name: q\nfamily: qwenimage\ngeneration: {height: 64, width: 64, steps: 2, max_sequence_length: 64}\n")
    cfg = tmp_path / "qcfg.yaml"
    cfg.write_text(plain.read_text().replace("name: q", "name: qcfg").replace("64}", "64, negative_prompt: ' '}"))

    def psnr(*argv: str) -> float:
        folder = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["bench", *argv, "--model", "tiny-qwen-image", "--runs", "1", "--out", str(folder)]) == 0
        rows = json.loads((folder / "bench.json").read_text())["rows"]
        return next(r["psnr"] for r in rows if r["kind"] == "profile")

    assert psnr(str(cfg)) >= 99  # the reference drew with the same negative prompt: the same image
    assert psnr(str(plain), "--negative-prompt", " ") >= 99  # --negative-prompt sets it for everyone
    # A pipeline without true CFG: one line, exit 2, before any model loads or anything is written.
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["bench", "--baselines", "--model", "tiny-flux2-klein", "--negative-prompt", "x",
                     "--out", str(tmp_path / "refused")])
    assert code == 2 and "Flux2Pipeline / Flux2KleinPipeline has no negative_prompt" in err.getvalue()
    assert not (tmp_path / "refused").exists()


def test_the_reference_is_named_for_the_dtype_it_runs_in() -> None:
    """A bench of the mini models loads them in float32: its reference said "bf16" all the same."""
    from fluxtune.bench import make_candidates

    generation = {"steps": 1, "height": 64, "width": 64}
    assert make_candidates([], "flux", None, False, generation)[0].name == "reference (bf16, no cap)"
    assert make_candidates([], "flux", None, False, generation, dtype="float32")[0].name == "reference (fp32, no cap)"


def test_size_and_steps_are_every_candidates(tmp_path: Path) -> None:
    """--size and --steps reached the reference and the recipes but not the profiles, which ran their own
    (a 1920x1088 preset benched with --size 1024x1024 ran at 1920x1088 beside a 1024x1024 reference)."""
    prof = tmp_path / "plain.yaml"
    prof.write_text("name: plain\ngeneration: {height: 96, width: 96, steps: 3}\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["bench", str(prof), "--model", "tiny-flux", "--size", "64x64", "--steps", "2", "--runs", "1",
                     "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert code == 0
    row = next(r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"] if r["name"] == "plain")
    assert row["status"] == "ok" and row["psnr"] is not None and row["psnr"] >= 99  # the reference's own image
